#!/usr/bin/env bash
# Tells whether the e2e cluster is up: each daemon's pid, the apiserver, the node, the ingress
# (Traefik instances), the network rule's routes, the images. Exits 0 only when all are healthy.
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
source "$here/daemons.sh"
source "$here/traefik.sh"

status=0
echo "daemons (pids in $PIDS, logs in $LOGS):"
daemons_running | sed 's/^/  /' || status=1
if apiserver_ready; then echo "apiserver: ready at $APISERVER_URL"; else echo "apiserver: not ready"; status=1; fi
if node_ready; then
  echo "node: $NODE_NAME Ready ($NODE_IP)"
  kubectl_admin get pods -A --no-headers 2>/dev/null | awk '{n[$1]++} END {for (ns in n) printf "  %s: %d pods\n", ns, n[ns]}'
else
  echo "node: $NODE_NAME not Ready"; status=1
fi
if apiserver_ready; then
  echo "ingress: traefik $TRAEFIK_VERSION in namespace $TRAEFIK_NAMESPACE (curl -H 'Host: <host>' $INGRESS_URL/)"
  traefik_status || status=1
fi
echo "routes: $(ip -o route get "$SERVICE_IP_APISERVER" 2>/dev/null | awk '{print $1, "via dev", $3}'); pod net $(ip -br addr show "$BRIDGE" 2>/dev/null || echo "$BRIDGE missing")"
if [[ -S $CONTAINERD_SOCK ]]; then
  echo "images on the node (pulled from the registry $E2E_REGISTRY, and their localhost/ names):"
  ctr_k8s images ls 2>/dev/null | awk -v r="$E2E_REGISTRY/" \
    'NR > 1 && (index($1, r) == 1 || $1 ~ /^localhost\//) && $1 !~ /@sha256:/ {print "  " $1, substr($3, 1, 19)}'
fi
if ((status == 0)); then echo "cluster: up"; echo "export KUBECONFIG=$KUBECONFIG_ADMIN"; else echo "cluster: down or unhealthy (make cluster-up)"; fi
exit $status
