#!/usr/bin/env bash
# Fake nodes for the scale measurement: the kwok controller ($KWOK_VERSION, build-kwok.sh) as a
# host process against the e2e cluster's apiserver, playing the kubelet of every node labelled
# $KWOK_NODE_LABEL, and of no other node (never $NODE_NAME). Pods scheduled there become Running
# and Ready at once, without containers, with an IP from $KWOK_POD_CIDR; a deleted pod is gone
# at once (grace period 0). So the real apiserver, scheduler, Deployment/ReplicaSet/EndpointSlice
# controllers, kube-proxy and the operator see a big cluster.
#
#   kwok.sh start          RBAC, client certificate, config; starts kwok (pid and log with the
#                          cluster's daemons: cluster-down.sh stops it); waits for /healthz.
#                          Safe with fake nodes in place: it resets their Leases first
#   kwok.sh nodes N        makes fake nodes kwok-node-000 .. N-1 exist (creates the missing
#                          ones) and waits until every one is Ready
#   kwok.sh delete-nodes   deletes every fake node; waits until they and their pods are gone
#   kwok.sh stop           stops the kwok process (fake nodes go NotReady 40-50 s later)
#   kwok.sh down           delete-nodes, stop, and the fake pod CIDR's route removed
#   kwok.sh status         kwok's pid, RSS, the fake nodes Ready / all; fails when kwok is down
#   kwok.sh deployment NS NAME REPLICAS   prints a Deployment and its Service for fake nodes
#
# A pod goes to a fake node only if it tolerates and selects it (kwok_placement prints both).
# Stop kwok only after the fake nodes are gone: the node lifecycle controller marks nodes
# without a Lease renewal NotReady and, 300 s later, evicts their pods (which then stay
# Terminating, since nothing plays their kubelet).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/daemons.sh"
source "$(dirname "${BASH_SOURCE[0]}")/pki.sh"

KWOK_DIR=$STATE/kwok
KWOK_KUBECONFIG=$STATE/kwok.kubeconfig
KWOK_STAGES=$CACHE/kwok-$KWOK_VERSION/stages.yaml
KWOK_NODE_PREFIX=kwok-node-
# What the node lifecycle controller sees: a Lease of this duration, renewed every quarter of it
# (as the kubelet's 40 s).
KWOK_LEASE_SECONDS=40
# The client certificate's CN: the user the RBAC below binds.
KWOK_USER=graceful-e2e:kwok
KWOK_FIELD_MANAGER=graceful-e2e

kubectl_kwok() { kubectl --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# What kwok does to the API, and no more (pkg/kwok/controllers at $KWOK_VERSION):
# - nodes: informer (list, watch) on the selected ones; stages patch their status.
# - pods: informer on every bound pod (it filters by node itself); pod-ready patches status,
#   pod-delete deletes with grace period 0.
# - leases in kube-node-lease: one per fake node, created, then updated every 10 s.
# - events, from its recorder; /openapi/v3 (patch metadata) comes with system:discovery.
kwok_rbac_manifests() {
  cat <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: graceful-e2e-kwok
rules:
  - apiGroups: [""]
    resources: [nodes, pods]
    verbs: [get, list, watch]
  - apiGroups: [""]
    resources: [nodes/status, pods/status]
    verbs: [patch, update]
  - apiGroups: [""]
    resources: [pods]
    verbs: [delete]
  - apiGroups: ["", events.k8s.io]
    resources: [events]
    verbs: [create, patch, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: graceful-e2e-kwok
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: graceful-e2e-kwok}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: $KWOK_USER}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: graceful-e2e-kwok
  namespace: kube-node-lease
rules:
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    verbs: [get, list, watch, create, update, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: graceful-e2e-kwok
  namespace: kube-node-lease
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: graceful-e2e-kwok}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: $KWOK_USER}
YAML
}

# The KwokConfiguration, then the Stages (build-kwok.sh lays them out from the module).
kwok_config() {
  cat <<YAML
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
metadata:
  name: graceful-e2e
# A KwokConfiguration read from a file gets none of kwok's defaults (only a missing one does):
# every option it needs is here, with kwok's default unless said otherwise.
options:
  cidr: $KWOK_POD_CIDR
  manageAllNodes: false
  # No exec, logs, port-forward or attach on fake pods: kwok serves only /healthz and /metrics.
  enableDebuggingHandlers: false
  enableContentionProfiling: false
  enableProfilingHandler: false
  # Pod stage workers (kwok's default 4): each waits for its PATCH or DELETE (0.2-0.5 s with a
  # busy apiserver on 2 cores), so 4 made pods Ready at ~15/s. At 16, rolling 100 Deployments
  # left no backlog; 300 at once still queued up to ~1,300 pods behind the apiserver.
  podPlayStageParallelism: 16
  nodePlayStageParallelism: 4
  nodeLeaseParallelism: 4
  podsOnNodeSyncParallelism: 1
  enablePodsOnNodeSyncListPager: true
  enablePodsOnNodeSyncStreamWatch: false
YAML
  cat "$KWOK_STAGES"
  # What a kubelet does and kwok's fast stages do not: when a node was NotReady for a while (its
  # Lease not renewed in time), the node lifecycle controller set its pods' Ready to False; once
  # the node is back, its pods are Ready again. Without this they stay NotReady until deleted.
  cat <<'YAML'
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: graceful-pod-ready-again
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values:
      - 'Running'
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'In'
      values:
      - 'False'
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
YAML
}

kwok_start() {
  local pid
  if pid=$(daemon_pid kwok); then
    log "kwok: already running ($pid)"
    return
  fi
  apiserver_ready || die "the cluster is not up (make cluster-up)"
  "$(dirname "${BASH_SOURCE[0]}")/build-kwok.sh"
  step "kwok $KWOK_VERSION: nodes labelled $KWOK_NODE_LABEL, pod IPs from $KWOK_POD_CIDR"
  mkdir -p "$KWOK_DIR"
  kwok_rbac_manifests | kubectl_kwok apply --server-side --field-manager="$KWOK_FIELD_MANAGER" \
    --force-conflicts -f - >/dev/null
  # Its own identity, from the cluster's CA (a new cluster has a new CA: made again then).
  if [[ ! -s $PKI/kwok.crt || ! -s $KWOK_KUBECONFIG ]] \
    || ! openssl verify -CAfile "$PKI/ca.crt" "$PKI/kwok.crt" >/dev/null 2>&1; then
    pki_cert kwok "/CN=$KWOK_USER" clientAuth
    pki_kubeconfig "$KWOK_KUBECONFIG" kwok "$APISERVER_URL"
  fi
  kwok_config > "$KWOK_DIR/kwok.yaml"
  # Every kwok process has a new identity (hostname_uuid) and takes over a Lease held by another
  # only once it expired: 40 s after the last renewal, just when the node lifecycle controller
  # gives up on the node. A restart with fake nodes in place then left some NotReady (3 of 100
  # seen). No kwok runs now: their Leases go, the new one creates them at once.
  # (Leases have no labels to delete them by at once: 8 kubectl at a time, 20 names each; one
  # kubectl deleting 100 one by one took 20 s with a busy apiserver.)
  kubectl_kwok get nodes -l "$KWOK_NODE_LABEL" -o name | sed 's|^node/||' \
    | xargs -r -P 8 -n 20 kubectl --kubeconfig "$KUBECONFIG_ADMIN" delete lease \
      -n kube-node-lease --ignore-not-found --wait=false >/dev/null
  # Whatever goes to a fake pod IP stays on this host (the sink drops it).
  ip route replace "$KWOK_POD_CIDR" dev "$SVC_SINK" src "$NODE_IP"
  # KWOK_WORKDIR: kwok also reads \$WORKDIR/kwok.yaml (default ~/.kwok) when it exists.
  # No --node-ip: fake nodes get no address, so nothing (the apiserver's logs or exec
  # included) can ever connect to one.
  KWOK_WORKDIR=$KWOK_DIR daemon_start kwok "$BIN/kwok" \
    --kubeconfig="$KWOK_KUBECONFIG" --config="$KWOK_DIR/kwok.yaml" \
    --manage-all-nodes=false --manage-nodes-with-label-selector="$KWOK_NODE_LABEL" \
    --cidr="$KWOK_POD_CIDR" --node-lease-duration-seconds="$KWOK_LEASE_SECONDS" \
    --server-address="$KWOK_ADDR" -v=WARN
  wait_daemon kwok 60 "/healthz" curl -fsS --max-time 1 "http://$KWOK_ADDR/healthz"
  done_step
}

kwok_stop() { daemon_stop kwok; }

# The toleration and nodeSelector of a pod template for fake nodes, as YAML at the indent given.
kwok_placement() { # indent
  local pad
  pad=$(printf '%*s' "$1" '')
  cat <<YAML | sed "s/^/$pad/"
nodeSelector: {${KWOK_NODE_LABEL%%=*}: ${KWOK_NODE_LABEL#*=}}
tolerations:
  - {key: ${KWOK_NODE_LABEL%%=*}, operator: Equal, value: ${KWOK_NODE_LABEL#*=}, effect: NoSchedule}
YAML
}

kwok_node_manifest() { # name
  local key=${KWOK_NODE_LABEL%%=*} value=${KWOK_NODE_LABEL#*=}
  # Status on create is kept for nodes (the kubelet registers that way); node-initialize keeps
  # a node's own allocatable and capacity.
  cat <<YAML
apiVersion: v1
kind: Node
metadata:
  name: $1
  labels:
    $key: $value
    kubernetes.io/hostname: $1
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
spec:
  taints:
    - {key: $key, value: $value, effect: NoSchedule}
status:
  allocatable: {cpu: "64", memory: 256Gi, pods: "1000", ephemeral-storage: 1Ti}
  capacity: {cpu: "64", memory: 256Gi, pods: "1000", ephemeral-storage: 1Ti}
YAML
}

kwok_nodes_ready() { # prints "ready total" of the fake nodes
  kubectl_kwok get nodes -l "$KWOK_NODE_LABEL" --no-headers \
    -o custom-columns='R:.status.conditions[?(@.type=="Ready")].status' 2>/dev/null \
    | awk '{t++} $1 == "True" {r++} END {print r + 0, t + 0}'
}

kwok_nodes() { # count
  local n=$1 i name have missing=() start=$SECONDS
  [[ $n =~ ^[0-9]+$ ]] || die "kwok_nodes: not a count: $n"
  daemon_pid kwok >/dev/null || die "kwok is not running (kwok.sh start)"
  step "$n fake nodes ($KWOK_NODE_PREFIX*, taint $KWOK_NODE_LABEL:NoSchedule)"
  have=" $(kubectl_kwok get nodes -l "$KWOK_NODE_LABEL" -o name | sed 's|^node/||' | tr '\n' ' ') "
  for ((i = 0; i < n; i++)); do
    name=$(printf '%s%03d' "$KWOK_NODE_PREFIX" "$i")
    [[ $have == *" $name "* ]] || missing+=("$name")
  done
  if ((${#missing[@]})); then
    for name in "${missing[@]}"; do echo "---"; kwok_node_manifest "$name"; done \
      | kubectl_kwok create -f - >/dev/null
  fi
  local timeout=$((60 + n / 2)) ready
  until ready=$(kwok_nodes_ready) && (( ${ready% *} >= n )); do
    (( SECONDS - start < timeout )) || die "fake nodes: only ${ready% *} of $n Ready after ${timeout}s"
    daemon_pid kwok >/dev/null || die "kwok exited (log: $LOGS/kwok.log)"
    sleep 1
  done
  log "   created ${#missing[@]}, Ready: ${ready% *}/${ready#* }"
  done_step
}

# Fake pods left on a node that is gone are force-deleted by the pod GC (after its 40 s
# quarantine, one at a time: about 3 a second on a busy apiserver); waits for that too, so the
# route can go after it. Faster: delete the workloads' namespaces first (10,000 pods in 10
# namespaces: 546 s), and let kwok play the kubelet of their pods meanwhile.
kwok_delete_nodes() {
  local start=$SECONDS left pods timeout before last_fall bound
  pods=$(kwok_pods_on_fake_nodes)
  # Pods already being deleted (their namespaces going) are gone while kwok still plays their
  # kubelet: wait while their number falls. The namespace controller's delete of 1,100 pods
  # can time out in the apiserver and be retried, so only a minute without progress ends the
  # wait (5 s did at 11,000 pods, and the pod GC then needed an hour).
  if daemon_pid kwok >/dev/null && ((pods > 0)); then
    step "let kwok delete what is being deleted ($pods pods on fake nodes)"
    last_fall=$SECONDS bound=$((120 + pods / 5))
    while ((pods > 0 && SECONDS - last_fall < 60 && SECONDS - start < bound)); do
      sleep 5
      before=$pods
      pods=$(kwok_pods_on_fake_nodes)
      if ((pods < before)); then last_fall=$SECONDS; fi
    done
    done_step
  fi
  start=$SECONDS timeout=$((180 + pods / 2))
  step "delete the fake nodes ($pods pods on them)"
  kubectl_kwok delete nodes -l "$KWOK_NODE_LABEL" --wait=false >/dev/null
  until left=$(kubectl_kwok get nodes -l "$KWOK_NODE_LABEL" -o name | wc -l) && ((left == 0)); do
    (( SECONDS - start < timeout )) || die "fake nodes: $left left after ${timeout}s"
    sleep 1
  done
  until pods=$(kwok_pods_on_fake_nodes) && ((pods == 0)); do
    (( SECONDS - start < timeout )) || die "pods on fake nodes: $pods left after ${timeout}s"
    sleep 2
  done
  # Their Leases go with them (owner references; the garbage collector takes some seconds).
  until left=$(kubectl_kwok get leases -n kube-node-lease -o name | grep -c "/$KWOK_NODE_PREFIX"); ((left == 0)); do
    (( SECONDS - start < timeout )) || die "fake nodes' Leases: $left left after ${timeout}s"
    sleep 1
  done
  done_step
}

# Pods bound to a node other than $NODE_NAME: the fake nodes' (the cluster has no other node).
kwok_pods_on_fake_nodes() {
  kubectl_kwok get pods -A --field-selector="spec.nodeName!=$NODE_NAME,spec.nodeName!=" \
    -o name --chunk-size=500 2>/dev/null | wc -l
}

kwok_down() {
  if apiserver_ready; then kwok_delete_nodes; fi
  kwok_stop
  ip route del "$KWOK_POD_CIDR" dev "$SVC_SINK" 2>/dev/null || true
  if apiserver_ready; then
    kwok_rbac_manifests | kubectl_kwok delete --ignore-not-found -f - >/dev/null
  fi
}

kwok_status() {
  local pid ready
  if pid=$(daemon_pid kwok); then
    echo "kwok: running ($pid, RSS $(($(awk '/^VmRSS/ {print $2}' "/proc/$pid/status") / 1024)) MiB, log $LOGS/kwok.log)"
  else
    echo "kwok: not running"
  fi
  ready=$(kwok_nodes_ready)
  echo "fake nodes: ${ready% *} Ready of ${ready#* }; pods on them: $(kwok_pods_on_fake_nodes)"
  [[ -n ${pid:-} ]]
}

# A Deployment of REPLICAS pods on fake nodes and a Service over them. The image is never
# pulled (nothing runs it); requests are small so the scheduler's fit is never the limit.
kwok_deployment() { # namespace name replicas
  local ns=$1 name=$2 replicas=$3
  cat <<YAML
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $name
  namespace: $ns
  labels: {app: $name}
spec:
  replicas: $replicas
  selector:
    matchLabels: {app: $name}
  template:
    metadata:
      labels: {app: $name}
    spec:
$(kwok_placement 6)
      containers:
        - name: app
          image: localhost/kwok-fake:none
          ports: [{containerPort: 8080, name: http}]
          resources: {requests: {cpu: 10m, memory: 16Mi}}
---
apiVersion: v1
kind: Service
metadata:
  name: $name
  namespace: $ns
spec:
  selector: {app: $name}
  ports: [{port: 80, targetPort: http, name: http}]
YAML
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  case ${1:-} in
    start) kwok_start ;;
    stop) kwok_stop ;;
    nodes) kwok_nodes "${2:?usage: kwok.sh nodes N}" ;;
    delete-nodes) kwok_delete_nodes ;;
    down) kwok_down ;;
    status) kwok_status ;;
    deployment) kwok_deployment "${2:?namespace}" "${3:?name}" "${4:?replicas}" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
  esac
fi
