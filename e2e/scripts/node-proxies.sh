#!/usr/bin/env bash
# More nodes' data planes on this one node (issue 25): network namespaces graceful-np1..N, each
# with a veth pair to the host in its own /30 of $NODE_PROXY_CIDR and its own kube-proxy (the
# cluster's binary, iptables mode, --hostname-override of the real node), so a pod is fronted by
# several kube-proxies that each apply a change on their own schedule. The last one hears from
# the apiserver $NODE_PROXY_LAG_SECONDS s late, through e2e/src/bin/lag_relay.rs (GRACEFUL_LAG_RELAY
# names its binary; otherwise cargo builds it).
#   node-proxies.sh up N    N >= 3; idempotent. Prints one line per node: netns address lag-seconds
#   node-proxies.sh down    stops them and removes everything `up` made (cluster-down.sh calls it)
# Clients in a namespace (ip netns exec graceful-npI ...) reach ClusterIPs through that
# namespace's kube-proxy only: untranslated service traffic goes to a sink bridge inside it, as
# on the host. Nothing in a namespace routes anywhere but the pod bridge's range.
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
source "$here/daemons.sh"
source "$here/host.sh"

NP_DIR=$STATE/node-proxies
NP_PREFIX=graceful-np
NP_PORT_HEALTHZ=10256
NP_PORT_METRICS=10249
# The egress guard's one exception: pods' replies to the namespaces' clients.
NP_REPLIES=(-i "$BRIDGE" -o "gnp+" -d "$NODE_PROXY_CIDR" -m conntrack --ctstate "ESTABLISHED,RELATED"
  --ctdir REPLY -m comment --comment "graceful node-proxies: pod replies" -j RETURN)

[[ $EUID == 0 ]] || die "node-proxies.sh needs root (network namespaces, iptables)"

np_addr() { # index host|ns -> the address of that end of node I's veth pair
  local base=${NODE_PROXY_CIDR%/*}
  case $2 in
    host) echo "${base%.*}.$((4 * $1 + 1))" ;;
    ns) echo "${base%.*}.$((4 * $1 + 2))" ;;
  esac
}

np_lag() { # index count -> the seconds node I lags
  if (($1 == $2)); then echo "$NODE_PROXY_LAG_SECONDS"; else echo 0; fi
}

np_relay_binary() {
  if [[ -n ${GRACEFUL_LAG_RELAY:-} ]]; then
    [[ -x $GRACEFUL_LAG_RELAY ]] || die "GRACEFUL_LAG_RELAY=$GRACEFUL_LAG_RELAY is not executable"
    echo "$GRACEFUL_LAG_RELAY"
    return
  fi
  (cd "$REPO" && cargo build --locked -q -p graceful-e2e --bin lag_relay >&2)
  echo "${CARGO_TARGET_DIR:-$REPO/target}/debug/lag_relay"
}

np_network() { # index: the namespace, its veth pair, addresses, routes and service sink
  local i=$1 ns=$NP_PREFIX$1 host_if=gnp$1 host ip
  host=$(np_addr "$i" host) ip=$(np_addr "$i" ns)
  ip netns list | awk '{print $1}' | grep -qx "$ns" || ip netns add "$ns"
  if ! ip link show "$host_if" >/dev/null 2>&1; then
    ip link add "$host_if" type veth peer name eth0 netns "$ns"
  fi
  ip addr replace "$host/30" dev "$host_if"
  ip link set "$host_if" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr replace "$ip/30" dev eth0
  ip -n "$ns" link set eth0 up
  # No default route: the pods (and the node IP, the apiserver's) through the host, nothing else.
  ip -n "$ns" route replace "$POD_CIDR" via "$host" src "$ip"
  # ClusterIPs: kube-proxy's DNAT in this namespace, else a bridge without ports (dropped), so
  # the host's kube-proxy never stands in for this one.
  ip -n "$ns" link show sink >/dev/null 2>&1 || ip -n "$ns" link add sink type bridge
  ip -n "$ns" link set sink up
  ip -n "$ns" route replace "$SERVICE_CIDR" dev sink src "$ip"
}

np_proxy() { # index count: node I's kube-proxy (and the relay in front of the lagging one)
  local i=$1 n=$2 name=node-proxy-$1 ns=$NP_PREFIX$1 host ip lag kubeconfig relay cluster
  host=$(np_addr "$i" host) ip=$(np_addr "$i" ns) lag=$(np_lag "$i" "$n")
  kubeconfig=$STATE/kube-proxy.kubeconfig
  if ((lag > 0)); then
    # The relay listens on this node's veth (host end) only; the apiserver's certificate names
    # the node IP, which the kube-proxy checks instead of the relay's address.
    kubeconfig=$NP_DIR/np$i.kubeconfig
    if ! daemon_pid "$name-relay" >/dev/null; then
      relay=$(np_relay_binary)
      daemon_start "$name-relay" "$relay" --listen "$host:$APISERVER_PORT" \
        --upstream "$NODE_IP:$APISERVER_PORT" --lag-ms "$((lag * 1000))"
      wait_daemon "$name-relay" 10 "listener" bash -c "echo > /dev/tcp/$host/$APISERVER_PORT"
    fi
    cp "$STATE/kube-proxy.kubeconfig" "$kubeconfig"
    cluster=$(kubectl --kubeconfig "$kubeconfig" config view -o jsonpath='{.clusters[0].name}')
    kubectl --kubeconfig "$kubeconfig" config set-cluster "$cluster" \
      --server "https://$host:$APISERVER_PORT" --tls-server-name "$NODE_IP" >/dev/null
  fi
  cat > "$NP_DIR/np$i.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $kubeconfig}
mode: iptables
# Client traffic from this namespace to a ClusterIP is masqueraded to its own address.
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
healthzBindAddress: $ip:$NP_PORT_HEALTHZ
metricsBindAddress: $ip:$NP_PORT_METRICS
nodePortAddresses: ["$ip/32"]
# Zeros: leave conntrack's table size and timeouts as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  if ! daemon_pid "$name" >/dev/null; then
    daemon_start "$name" ip netns exec "$ns" "$KUBE_BIN/kube-proxy" --config="$NP_DIR/np$i.yaml"
    # `ip netns exec` execs kube-proxy: that is the program the pid runs.
    echo "$KUBE_BIN/kube-proxy" > "$PIDS/$name.cmd"
  fi
}

np_ready() { # index: healthz answers and the service rules are in place
  local ip ns=$NP_PREFIX$1
  ip=$(np_addr "$1" ns)
  curl -fsS --max-time 1 "http://$ip:$NP_PORT_HEALTHZ/healthz" >/dev/null \
    && ip netns exec "$ns" iptables -w -t nat -S KUBE-SERVICES >/dev/null 2>&1
}

np_up() {
  local n=${1:-} i
  if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 3 || n > 60)); then
    die "usage: node-proxies.sh up N (3 <= N <= 60)"
  fi
  if ! [[ -s $STATE/kube-proxy.kubeconfig ]] || ! iptables -w -S "$EGRESS_CHAIN" >/dev/null 2>&1; then
    die "the e2e cluster is not up (make cluster-up)"
  fi
  # Another count than the last `up`: start over.
  if [[ -s $NP_DIR/count && $(cat "$NP_DIR/count") != "$n" ]]; then np_down; fi
  step "$n nodes' data planes: namespaces $NP_PREFIX{1..$n}, kube-proxy in each"
  mkdir -p "$NP_DIR"
  echo "$n" > "$NP_DIR/count"
  iptables -w -C "$EGRESS_CHAIN" "${NP_REPLIES[@]}" 2>/dev/null \
    || iptables -w -I "$EGRESS_CHAIN" 1 "${NP_REPLIES[@]}"
  for ((i = 1; i <= n; i++)); do np_network "$i"; done
  for ((i = 1; i <= n; i++)); do np_proxy "$i" "$n"; done
  for ((i = 1; i <= n; i++)); do
    wait_daemon "node-proxy-$i" 90 "healthz and rules" np_ready "$i"
  done
  host_check_routes
  done_step
  for ((i = 1; i <= n; i++)); do echo "$NP_PREFIX$i $(np_addr "$i" ns) $(np_lag "$i" "$n")"; done
}

np_down() {
  local f name ns link
  for f in "$PIDS"/node-proxy-*.pid; do
    [[ -e $f ]] || continue
    name=${f##*/}
    daemon_stop "${name%.pid}" 10
  done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NP_PREFIX}[0-9]+$" || true); do
    ip netns del "$ns" # takes eth0 and so its veth peer along
  done
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
    | grep -E '^gnp[0-9]+$' || true); do
    ip link del "$link" 2>/dev/null || true
  done
  while iptables -w -D "$EGRESS_CHAIN" "${NP_REPLIES[@]}" 2>/dev/null; do :; done
  rm -rf "$NP_DIR"
}

case ${1:-} in
  up) np_up "${2:-}" ;;
  down) np_down; log "nodes' data planes removed" ;;
  *) die "usage: node-proxies.sh up N | down" ;;
esac
