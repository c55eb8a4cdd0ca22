#!/usr/bin/env bash
# make test: lint, unit and process tests, then the e2e suite on the real cluster.
#
# On a fresh machine most of the time is building, on 2 cores. What the cluster needs first is
# built first, both cores busy: Kubernetes, helm, etcd and kwok (scale.rs) with Go beside the
# workspace's unit tests and static release binaries with cargo. Then the cluster comes up without its ingress and the
# suite starts. What only the last tests need, Traefik (ingress.rs), and clippy build meanwhile
# at the lowest CPU and I/O priority: the suite waits on rollouts and drains most of the time,
# and a niced build takes only the CPU it leaves idle. Warm, every build is a stamp check and
# cargo finds everything fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/scripts/common.sh

mkdir -p "$CACHE"
bg_pids=()
# A process group of its own for each background job, so that a failed step stops them all.
# shellcheck disable=SC2154 # j is the trap's own loop variable (SC2154 misreads the string)
trap 'for j in "${bg_pids[@]}"; do kill -- "-$j" 2>/dev/null || true; done' EXIT
background() { # log-file command...: runs the command in its own process group
  local log=$1
  shift
  setsid "$@" >"$log" 2>&1 &
  bg_pids+=($!)
}
finish() { # pid log-file what: waits for a background job, shows its log, fails with it
  if ! wait "$1"; then
    cat "$2" >&2
    die "$3 failed (above)"
  fi
  cat "$2" >&2
}

cargo fmt --all --check
# Clean builds, as in CI: incremental compilation only adds work to a build from nothing. The
# images' release binaries are built without cross-crate (thin) LTO here: the same code, a
# shorter build; `make build-static` and `make deploy` outside the tests keep it, and the
# benchmark (make bench-sidecar) measures what ships.
export CARGO_INCREMENTAL=0 CARGO_PROFILE_RELEASE_LTO=false

# The cluster comes up as soon as Kubernetes is built, while cargo still builds; not before
# `make deps` has installed the Debian packages (two apt-get at once would fight for its lock).
go_log=$CACHE/test-kube-build.log deps_done=$CACHE/test-deps-done.$$
rm -f "$deps_done"
step "background: Kubernetes, helm, etcd and kwok with Go, then the cluster (log: $go_log)"
background "$go_log" bash -c "e2e/scripts/build-kube.sh && e2e/scripts/build-etcd.sh && e2e/scripts/build-kwok.sh \
  && until [[ -e $deps_done ]]; do sleep 1; done \
  && GRACEFUL_NO_INGRESS=1 e2e/scripts/cluster-up.sh"
kube_build=$!
make --no-print-directory deps
touch "$deps_done"
make --no-print-directory unit build-static
finish "$kube_build" "$go_log" "the Kubernetes build or the cluster"
rm -f "$deps_done"
done_step

make --no-print-directory deploy

traefik_log=$CACHE/test-traefik-build.log lint_log=$CACHE/test-clippy.log
log "background at idle priority: the Traefik build ($traefik_log), then clippy ($lint_log)"
background "$traefik_log" nice -n 19 ionice -c 3 e2e/scripts/build-traefik.sh
traefik_build=$!
# Its own target directory: cargo locks one for a whole command, and the suite's run in it.
background "$lint_log" nice -n 19 ionice -c 3 env CARGO_TARGET_DIR="$REPO/target/lint" \
  bash -c "while kill -0 $traefik_build 2>/dev/null; do sleep 5; done; exec make --no-print-directory lint"
lint=$!

# Every e2e test file but the ingress's, in cargo's order, then the ingress once Traefik is up.
suite=()
for f in e2e/tests/*.rs; do
  name=$(basename "$f" .rs)
  [[ $name == ingress ]] || suite+=(--test "$name")
done
e2e/run.sh "${suite[@]}"

step "ingress for ingress.rs (the Traefik build started with the suite)"
finish "$traefik_build" "$traefik_log" "the Traefik build"
make --no-print-directory cluster-up
done_step
e2e/run.sh --test ingress

step "clippy (built beside the suite)"
finish "$lint" "$lint_log" "clippy"
done_step
trap - EXIT
