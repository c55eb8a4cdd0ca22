#!/usr/bin/env bash
# make test: lint, unit and process tests, then the e2e suite on the real cluster.
# On a fresh machine most of the time is building: Kubernetes and Traefik with Go, oha and the
# workspace with cargo. The Go builds start first, in the background, and run while cargo
# installs oha, builds and tests the workspace and builds the static release binaries: each
# fills the other's single-threaded stretches (big crates, links, downloads) on a 2-core
# machine. Warm, the Go builds are stamp checks and cargo finds everything fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/scripts/common.sh

mkdir -p "$CACHE"
go_log=$CACHE/test-go-builds.log
step "background: Go builds for the cluster (log: $go_log)"
# A process group of its own, so that a failed cargo step stops the go builds with it.
setsid bash -c 'e2e/scripts/build-kube.sh && e2e/scripts/build-traefik.sh' >"$go_log" 2>&1 &
go_builds=$!
trap 'kill -- "-$go_builds" 2>/dev/null || true' EXIT

make --no-print-directory deps lint unit build-static

if ! wait "$go_builds"; then
  cat "$go_log" >&2
  die "the cluster's Go builds failed (above)"
fi
trap - EXIT
cat "$go_log" >&2
done_step
make --no-print-directory e2e
