# shellcheck shell=bash
# The host side of the e2e cluster: sysctls, the pod bridge, the service-CIDR sink, the egress
# guard, and their removal. Sourced by cluster-up.sh and cluster-down.sh after common.sh.

EGRESS_CHAIN=GRACEFUL-EGRESS

host_record_sysctls() {
  [[ -s $STATE/sysctls.orig ]] && return # a killed cluster's record still holds the originals
  local k
  for k in "${TOUCHED_SYSCTLS[@]}"; do
    sysctl -n "$k" >/dev/null 2>&1 && echo "$k=$(sysctl -n "$k")"
  done > "$STATE/sysctls.orig"
}

host_restore_sysctls() {
  [[ -s $STATE/sysctls.orig ]] || return 0
  local line
  while IFS= read -r line; do sysctl -qw "$line" || log "could not restore $line"; done \
    < "$STATE/sysctls.orig"
  rm -f "$STATE/sysctls.orig"
}

host_prepare() {
  modprobe br_netfilter 2>/dev/null || true # built in on some kernels
  modprobe overlay 2>/dev/null || true
  [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] || die "no br_netfilter in this kernel"
  # Volumes with mountPropagation and containerd's mounts need a shared root.
  mount --make-rshared /
  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 \
    net.bridge.bridge-nf-call-ip6tables=1
}

host_network_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$NODE_IP/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  if ! ip link show "$SVC_SINK" >/dev/null 2>&1; then
    ip link add "$SVC_SINK" type bridge
  fi
  ip link set "$SVC_SINK" up
  # src: host-to-ClusterIP traffic leaves with the node IP, which the pods can answer.
  ip route replace "$SERVICE_CIDR" dev "$SVC_SINK" src "$NODE_IP"
  # Pods may talk to each other and to this host, never through it to anywhere else.
  iptables -w -N "$EGRESS_CHAIN" 2>/dev/null || iptables -w -F "$EGRESS_CHAIN"
  iptables -w -A "$EGRESS_CHAIN" -i "$BRIDGE" -o "$BRIDGE" -j RETURN
  # To the sink it goes nowhere anyway; kube-proxy's REJECT of a service without endpoints
  # (later in FORWARD) must still answer pods with "refused", not a silent drop.
  iptables -w -A "$EGRESS_CHAIN" -i "$BRIDGE" -o "$SVC_SINK" -j RETURN
  iptables -w -A "$EGRESS_CHAIN" -i "$BRIDGE" -j DROP
  # First in FORWARD, ahead of kube-proxy's accepts: re-inserted on every call.
  while iptables -w -D FORWARD -j "$EGRESS_CHAIN" 2>/dev/null; do :; done
  iptables -w -I FORWARD 1 -j "$EGRESS_CHAIN"
}

# The network rule, checked before any traffic: service addresses resolve to the sink, pod
# addresses to the bridge, and neither to the default route.
host_check_routes() {
  local svc pod
  svc=$(ip -o route get "$SERVICE_IP_APISERVER") pod=$(ip -o route get "${NODE_IP%.*}.200")
  [[ $svc == *" dev $SVC_SINK "* ]] || die "service route wrong: $svc"
  [[ $pod == *" dev $BRIDGE "* ]] || die "pod route wrong: $pod"
  [[ $(iptables -w -S FORWARD | sed -n 2p) == "-A FORWARD -j $EGRESS_CHAIN" ]] \
    || die "egress guard is not the first rule of FORWARD"
  log "   routes: $SERVICE_CIDR -> $SVC_SINK, $POD_CIDR -> $BRIDGE, pod egress off the host dropped"
}

# Removes every iptables chain whose name starts with one of the prefixes, in every table,
# with the rules in other chains that jump to them.
iptables_remove_chains() { # prefix...
  local ipt table chain chains pattern
  pattern="($(IFS="|"; echo "$*"))"
  for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || continue
    for table in filter nat mangle raw; do
      "$ipt" -w -t "$table" -S >/dev/null 2>&1 || continue
      chains=$("$ipt" -w -t "$table" -S | awk '$1 == "-N" {print $2}' | grep -E "^$pattern" || true)
      # One iptables-restore for the whole table: each iptables call rewrites the table, so
      # chain by chain took over 10 min after make scale (kube-proxy's 20,000 chains for
      # 11,000 fake endpoints). Rules jumping to our chains from other chains go first.
      {
        echo "*$table"
        "$ipt" -w -t "$table" -S | grep -E -- "-j ${pattern}" | grep '^-A ' \
          | grep -vE "^-A ${pattern}" | sed 's/^-A /-D /' || true
        for chain in $chains; do echo "-F $chain"; done
        for chain in $chains; do echo "-X $chain"; done
        echo COMMIT
      } | "$ipt-restore" -w --noflush || log "could not remove the chains of $ipt $table"
    done
  done
}

host_network_down() {
  local veth
  for veth in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link del "$veth" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  ip link del "$SVC_SINK" 2>/dev/null || true # takes its route along
  iptables_remove_chains KUBE- CNI- "$EGRESS_CHAIN"
}
