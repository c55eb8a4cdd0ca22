#!/usr/bin/env bash
# make demo: a real local cluster, the chart installed, graceful-demo rolled out three ways
# under the same load, and one table of dropped requests. Every step says what it does and how
# long it took; a second run reuses everything cached and starts in seconds.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/scripts/common.sh"
export KUBECONFIG=${KUBECONFIG:-$KUBECONFIG_ADMIN}
t0=$(date +%s)

step "[1/5] cluster up (first run builds Kubernetes, helm and Traefik from source: about 35 min on 2 cores)"
"$here/scripts/cluster-up.sh"
done_step

step "[2/5] static release binaries, images pushed to the cluster's registry ($E2E_REGISTRY)"
make -C "$REPO" --no-print-directory build-static
"$here/scripts/images.sh"
done_step

step "[3/5] helm install oci://$E2E_REGISTRY/charts/graceful (release graceful, namespace graceful-system)"
"$here/scripts/deploy.sh"
done_step

step "[4/5] build the demo driver"
(cd "$REPO" && cargo build --locked -q -p graceful-e2e --bin demo)
done_step

step "[5/5] roll out graceful-demo three ways under load (about 5 min)"
"${CARGO_TARGET_DIR:-$REPO/target}/debug/demo" "$@" | tee "$STATE/demo-report.md"
done_step

cat <<MSG

Done in $(( $(date +%s) - t0 ))s. The table is also in $STATE/demo-report.md.
Look around:
  export KUBECONFIG=$KUBECONFIG
  kubectl get grro -A                       # GracefulRollouts: phase, progress, last rollout
  kubectl -n graceful-system logs deploy/graceful-operator
  kubectl get pods -A
  make demo ARGS=--keep                     # keep the demo namespaces to inspect them
Tear down:
  make cluster-down
MSG
