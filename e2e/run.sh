#!/usr/bin/env bash
# Runs on the e2e cluster (make cluster-up images first; make e2e does both):
#   e2e/run.sh [cargo test args]    the e2e suite: every ignored test of graceful-e2e, one at a time,
#                                   each test's figures shown (e2e/run.sh --test smoke prestop: one
#                                   file, the tests whose name has "prestop")
#   e2e/run.sh baseline [args]      the baseline measurement (--rollouts N --rate R --connections C)
set -euo pipefail
here=$(dirname "$0")
source "$here/scripts/common.sh"
source "$here/scripts/daemons.sh"

export KUBECONFIG=${KUBECONFIG:-$KUBECONFIG_ADMIN}
cluster_healthy || die "the e2e cluster is not up or not healthy: make cluster-up (make cluster-status tells more)"
for t in vegeta kubectl; do [[ -x $BIN/$t ]] || die "$t missing in $BIN: run make deps / make cluster-up"; done
cd "$REPO"
if [[ ${1:-} == baseline ]]; then
  shift
  exec cargo run --locked -q -p graceful-e2e --bin baseline -- "$@"
fi
# tests/plugin.rs runs the kubectl plugin as kubectl finds it: built next to the tests.
cargo build --locked -q -p kubectl-graceful
# cargo's arguments first, the test binary's after a `--` (e2e/run.sh --test smoke -- --nocapture).
cargo_args=() test_args=()
while (($#)); do
  if [[ $1 == -- ]]; then shift; test_args=("$@"); break; fi
  cargo_args+=("$1"); shift
done
# --nocapture: every test prints what it measured (sent, failed, p99), so a CI log carries the
# figures, not only "ok".
[[ " ${test_args[*]} " == *" --nocapture "* ]] || test_args+=(--nocapture)
exec cargo test --locked -p graceful-e2e "${cargo_args[@]}" -- --ignored --test-threads=1 "${test_args[@]}"
