#!/usr/bin/env bash
# Stops what cluster-up.sh started and removes what it set up: pods (through the CRI, so CNI
# tears their network down), daemons by recorded pid, kubelet and containerd mounts, iptables
# chains (KUBE-*, CNI-*, GRACEFUL-*), the bridge, the service sink, veths, and the sysctls it changed.
# Kept: containerd's image store, the registry's storage and the last logs.
# Safe to run on a stopped, half-started or killed cluster.
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
source "$here/daemons.sh"
source "$here/host.sh"

[[ $EUID == 0 ]] || die "cluster-down needs root"
started=$SECONDS

step "more nodes' data planes (node-proxies.sh: namespaces, their kube-proxies)"
"$here/node-proxies.sh" down || log "node-proxies.sh down failed; continuing"
done_step

step "stop the control plane, kubelet and kwok (no pod may be recreated while pods go)"
# kwok (kwok.sh, fake nodes) only runs when the scale measurement started it.
for name in kwok kube-controller-manager kube-scheduler kubelet; do daemon_stop "$name"; done
done_step

step "remove every pod sandbox through containerd (CNI DEL frees veths, IPs, netns)"
temporary_containerd=false
if ! daemon_pid containerd >/dev/null && [[ -s $STATE/containerd.toml ]] \
  && [[ -d $CONTAINERD_ROOT/io.containerd.grpc.v1.cri/sandboxes ]]; then
  # A killed cluster: containerd reconnects to the shims that outlived it, then lets them go.
  daemon_start containerd "$(command -v containerd)" --config "$STATE/containerd.toml"
  temporary_containerd=true
  wait_for 30 "containerd" ctr --address "$CONTAINERD_SOCK" version
fi
if daemon_pid containerd >/dev/null; then
  if [[ -x $BIN/kube ]]; then
    "$BIN/kube" cri-reset "unix://$CONTAINERD_SOCK" || log "cri-reset failed; continuing"
  fi
fi
$temporary_containerd && log "   (containerd was started only for this)"
done_step

step "stop kube-proxy, kube-apiserver, containerd, the registry, etcd"
for name in kube-proxy kube-apiserver containerd registry etcd; do daemon_stop "$name"; done
done_step

step "unmount what the kubelet and containerd left, remove network namespaces"
# Deepest first. Only mounts under our own directories, and the CNI netns of our pods.
mounts=$(awk -v s="$STATE/" -v r="$RUN_DIR/" \
  'index($2, s) == 1 || index($2, r) == 1 || $2 ~ /^\/run\/netns\/cni-/ {print $2}' /proc/mounts \
  | sort -r)
for m in $mounts; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"; done
[[ -z $mounts ]] || log "   unmounted $(wc -w <<< "$mounts") mounts"
for ns in /run/netns/cni-*; do [[ -e $ns ]] && rm -f "$ns"; done
done_step

step "iptables chains (KUBE-*, CNI-*, GRACEFUL-*), bridge $BRIDGE, sink $SVC_SINK, veths"
host_network_down
done_step

step "state: sysctls restored, runtime files removed (image stores and logs kept)"
host_restore_sysctls
rm -rf "$STATE/etcd" "$STATE/kubelet" "$STATE/cni" "$PIDS" "$PKI" "$RUN_DIR" \
  "$STATE"/*.kubeconfig "$STATE"/*.yaml "$STATE/containerd.toml" "$STATE/resolv.conf" \
  "$STATE/containerd-opt" "$STATE/kwok" "$REGISTRY_HOSTS"
rm -f /var/lib/cni/results/"$CNI_NETWORK"-* 2>/dev/null || true
done_step
log "cluster down in $((SECONDS - started))s (logs kept in $LOGS)"
