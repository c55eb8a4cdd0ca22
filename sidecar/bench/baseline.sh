#!/usr/bin/env bash
# Builds graceful-sidecar as of another commit (default: the last one touching sidecar/ before
# HEAD's), the same way make build-static does, into its own target dir under the cache, and
# prints the binary's path: BASELINE=$(sidecar/bench/baseline.sh REV) make bench-sidecar.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${GRACEFUL_CACHE:-$HOME/.cache/graceful}
rev=${1:-HEAD~1}
sha=$(git -C "$REPO" rev-parse --verify "$rev^{commit}")
dir=$CACHE/bench-baseline/$sha
bin=$dir/target/x86_64-unknown-linux-gnu/release/graceful-sidecar
if [[ ! -x $bin ]]; then
  rm -rf "$dir/src"
  mkdir -p "$dir"
  git -C "$REPO" worktree add --detach -f "$dir/src" "$sha" >&2
  trap 'git -C "$REPO" worktree remove --force "$dir/src" >&2' EXIT
  (cd "$dir/src" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$dir/target" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu -p graceful-sidecar --bin graceful-sidecar >&2)
fi
echo "$bin"
