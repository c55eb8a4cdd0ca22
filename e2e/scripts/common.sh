# Shared settings for the e2e scripts: versions, paths and the progress log. Sourced, not run.
# One place for each fact: addresses and versions live here and nowhere else.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KUBE_VERSION=v1.33.13
HELM_VERSION=v3.21.4

# Everything built or downloaded lives outside the repo so a fresh clone starts warm.
CACHE=${GRACEFUL_CACHE:-$HOME/.cache/graceful}
BIN=$CACHE/bin
# Runtime state of the cluster (certs, configs, logs, pids, data).
STATE=${GRACEFUL_STATE:-/var/lib/graceful-e2e}

export PATH="$BIN:$PATH"

_step_start=0
_step_name=""
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
step() { _step_name=$*; _step_start=$(date +%s); log "-> $*"; }
done_step() { log "   done: $_step_name ($(( $(date +%s) - _step_start ))s)"; }
die() { log "error: $*"; exit 1; }
