#!/usr/bin/env bash
# Brings up the single-node e2e cluster on this machine: etcd, containerd, the control plane,
# kubelet and kube-proxy, each logging to $STATE/logs with its pid in $STATE/pids.
# Idempotent: a healthy cluster is left alone; a killed one is cleaned up and started anew.
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
source "$here/daemons.sh"
source "$here/host.sh"
source "$here/pki.sh"
source "$here/traefik.sh"

[[ $EUID == 0 ]] || die "cluster-up needs root (network, mounts, containerd)"
started=$SECONDS

# The ingress on a ready cluster: Traefik's image, the Gateway API CRDs, its objects
# (traefik.sh). A warm run changes nothing. GRACEFUL_NO_INGRESS=1 leaves it (and its build)
# for a later cluster-up: scripts/test.sh builds Traefik while the tests that need no
# ingress run.
ingress_up() {
  if [[ ${GRACEFUL_NO_INGRESS:-} == 1 ]]; then
    log "ingress: left for a later cluster-up (GRACEFUL_NO_INGRESS=1)"
    return
  fi
  "$here/build-traefik.sh"
  step "ingress: traefik $TRAEFIK_VERSION at $INGRESS_URL (namespace $TRAEFIK_NAMESPACE)"
  traefik_install
  done_step
}

# A healthy cluster of other binaries (another minor: make compat) is not this one: it goes
# with what an earlier cluster left, below.
if cluster_healthy && [[ $(cat "$PIDS/kube-apiserver.cmd" 2>/dev/null) == "$KUBE_BIN/kube-apiserver" ]]; then
  log "cluster already up ($(daemons_running | tr '\n' ' '))"
  host_network_up # idempotent: puts back a route or guard someone removed
  host_check_routes
  ingress_up
  log "cluster up in $((SECONDS - started))s"
  echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
  exit 0
fi

step "binaries: kubernetes $CLUSTER_KUBE_VERSION, helm, etcd $ETCD_VERSION (build-kube.sh, build-etcd.sh)"
"$here/build-kube.sh"
if [[ -n ${GRACEFUL_K8S:-} ]]; then
  "$here/build-kube-compat.sh" "$GRACEFUL_K8S" >/dev/null
  CLUSTER_KUBE_VERSION=$(cat "$CACHE/compat/kube-$GRACEFUL_K8S/version")
  KUBE_MINOR=$(kube_minor "$CLUSTER_KUBE_VERSION")
fi
"$here/build-etcd.sh"
host_tools_missing() {
  local tool missing=()
  for tool in containerd containerd-shim-runc-v2 runc iptables conntrack openssl gcc python3 curl \
    docker-registry buildah; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [[ -x $CNI_BIN/bridge && -x $CNI_BIN/host-local && -x $CNI_BIN/portmap ]] || missing+=("CNI plugins")
  echo "${missing[*]}"
}
if [[ -n $(host_tools_missing) ]]; then
  log "missing: $(host_tools_missing): installing (scripts/deps.sh)"
  "$REPO/scripts/deps.sh"
  [[ -z $(host_tools_missing) ]] || die "still missing after scripts/deps.sh: $(host_tools_missing)"
fi
done_step

# Anything left by an earlier cluster (stopped or killed) goes first: stale pids, sandboxes,
# mounts, chains, interfaces.
if compgen -G "$PIDS/*.pid" >/dev/null || ip link show "$BRIDGE" >/dev/null 2>&1 \
  || [[ -S $CONTAINERD_SOCK || -d $STATE/kubelet ]]; then
  step "clean up what an earlier cluster left"
  "$here/cluster-down.sh"
  done_step
fi

step "host: sysctls, shared root mount, pod bridge $BRIDGE ($NODE_IP), service route"
mkdir -p "$STATE" "$RUN_DIR"
# The last cluster's logs stay readable one more round.
if [[ -d $LOGS ]]; then rm -rf "$LOGS.prev" && mv "$LOGS" "$LOGS.prev"; fi
mkdir -p "$LOGS" "$PIDS"
host_record_sysctls
host_prepare
host_network_up
host_check_routes
done_step

step "certificates and kubeconfigs ($PKI)"
pki_all
done_step

step "configuration files"
: > "$STATE/resolv.conf" # pods need no DNS; nothing of theirs may resolve through the host's
mkdir -p "$STATE/cni/net.d" "$STATE/cni/networks"
cat > "$STATE/cni/net.d/10-$CNI_NETWORK.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$STATE/cni/networks"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
cat > "$STATE/containerd.toml" <<TOML
version = 2
root = "$CONTAINERD_ROOT"
state = "$CONTAINERD_STATE"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  enable_unprivileged_ports = true
  # This VM withholds CAP_SYS_RESOURCE even from root: a negative oom_score_adj (the kubelet
  # asks -998 for sandboxes) makes runc init fail. Clamp to containerd's own value instead.
  restrict_oom_score_adj = true
  # Where the node pulls from: $REGISTRY_HOSTS/<registry>/hosts.toml (ours: plain HTTP).
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$REGISTRY_HOSTS"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$STATE/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
TOML
mkdir -p "$REGISTRY_HOSTS/$E2E_REGISTRY" "$REGISTRY_DIR"
cat > "$REGISTRY_HOSTS/$E2E_REGISTRY/hosts.toml" <<TOML
server = "http://$E2E_REGISTRY"
[host."http://$E2E_REGISTRY"]
  capabilities = ["pull", "resolve"]
TOML
# The registry on loopback only, no auth (nothing else on this machine reaches it), deletes
# allowed (a developer may prune it); its storage stays when the cluster goes down.
cat > "$STATE/registry.yaml" <<YAML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $REGISTRY_DIR
  delete:
    enabled: true
http:
  addr: $E2E_REGISTRY
YAML
# Per minor (make compat): from 1.35 the kubelet refuses cgroup v1 (this host) unless told;
# the field exists from 1.31 and is false by default until 1.35.
cat > "$STATE/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
healthzBindAddress: ${KUBELET_HEALTHZ%:*}
healthzPort: ${KUBELET_HEALTHZ#*:}
readOnlyPort: 0
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
failSwapOn: false
resolvConf: $STATE/resolv.conf
clusterDomain: cluster.local
# Images cannot be pulled back (there is no registry): never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
serializeImagePulls: false
shutdownGracePeriod: 0s
$( ((KUBE_MINOR < 31)) || echo "failCgroupV1: false")
YAML
cat > "$STATE/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
healthzBindAddress: $KUBE_PROXY_HEALTHZ
metricsBindAddress: $KUBE_PROXY_METRICS
nodePortAddresses: ["$NODE_IP/32"]
# Zeros: leave the host's conntrack table size and timeouts as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
# What each of our own processes asks of the apiserver, request by request (make scale counts
# them by verb and resource): service accounts outside kube-system, whose controllers act for
# the control plane. Metadata only (no bodies), at the response's end.
cat > "$STATE/audit-policy.yaml" <<YAML
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  userGroups: ["system:serviceaccounts:kube-system"]
- level: Metadata
  userGroups: ["system:serviceaccounts"]
YAML
done_step

step "etcd (127.0.0.1, data in $STATE/etcd)"
rm -rf "$STATE/etcd"
daemon_start etcd "$BIN/etcd" --name graceful --data-dir "$STATE/etcd" \
  --listen-client-urls "$ETCD_CLIENT" --advertise-client-urls "$ETCD_CLIENT" \
  --listen-peer-urls "$ETCD_PEER" --initial-advertise-peer-urls "$ETCD_PEER" \
  --initial-cluster "graceful=$ETCD_PEER" --initial-cluster-state new \
  --listen-metrics-urls http://127.0.0.1:2381 --logger zap --log-outputs stderr
wait_daemon etcd 30 "health" curl -fsS --max-time 1 "$ETCD_CLIENT/health"
done_step

step "registry ($E2E_REGISTRY, storage $REGISTRY_DIR)"
# Another registry on that port would answer in ours' stead, and ours would exit.
! curl -fsS --max-time 1 -o /dev/null "http://$E2E_REGISTRY/v2/" 2>/dev/null \
  || die "something already answers at $E2E_REGISTRY (ss -ltnp 'sport = :${E2E_REGISTRY##*:}'): stop it first"
daemon_start registry "$(command -v docker-registry)" serve "$STATE/registry.yaml"
wait_daemon registry 30 "/v2/" curl -fsS --max-time 1 "http://$E2E_REGISTRY/v2/"
done_step

step "containerd ($CONTAINERD_SOCK)"
daemon_start containerd "$(command -v containerd)" --config "$STATE/containerd.toml"
wait_daemon containerd 30 "socket" ctr --address "$CONTAINERD_SOCK" version
# A killed cluster's pods are still in containerd's store: remove them (CNI DEL included).
"$KUBE_BIN/kube" cri-reset "unix://$CONTAINERD_SOCK"
done_step

step "pause image $PAUSE_IMAGE (e2e/pause/pause.c, gcc -static)"
pause_src="$REPO/e2e/pause/pause.c"
pause_dir="$CACHE/pause/$(sha256sum "$pause_src" | cut -c1-16)"
if [[ ! -x $pause_dir/pause ]]; then
  mkdir -p "$pause_dir"
  gcc -static -O2 -Wall -Wextra -o "$pause_dir/pause.tmp" "$pause_src"
  strip "$pause_dir/pause.tmp"
  mv "$pause_dir/pause.tmp" "$pause_dir/pause"
fi
# The kubelet's first sandbox makes containerd pull it from the registry.
image_push "$REPO/e2e/images/pause.Containerfile" "$pause_dir/pause" "$PAUSE_IMAGE" -- --timestamp 0
done_step

step "kube-apiserver ($APISERVER_URL, advertised as $NODE_IP)"
daemon_start kube-apiserver "$KUBE_BIN/kube-apiserver" \
  --advertise-address="$NODE_IP" --bind-address="$NODE_IP" --secure-port="$APISERVER_PORT" \
  --etcd-servers="$ETCD_CLIENT" --service-cluster-ip-range="$SERVICE_CIDR" \
  --client-ca-file="$PKI/ca.crt" \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types=InternalIP \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --admission-control-config-file="$STATE/admission.yaml" \
  --allow-privileged=true --profiling=false \
  --audit-policy-file="$STATE/audit-policy.yaml" --audit-log-path="$AUDIT_LOG" \
  --audit-log-format=json --audit-log-maxsize=200 --audit-log-maxbackup=1
wait_daemon kube-apiserver 90 "/readyz" apiserver_ready
done_step

step "kube-controller-manager, kube-scheduler"
# Each controller's client may send 100 requests/s (client-go's default is 20), as in
# Kubernetes' own 5,000-node scalability tests (CONTROLLER_MANAGER_TEST_ARGS): at 20 the
# ReplicaSet controller alone, creating pods and writing statuses, held a 10,000-pod KWOK fleet
# (make scale) to about 12 new pods a second. It is a cap: the suite's small clusters never
# reach it.
daemon_start kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
  --kubeconfig="$STATE/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$CONTROLLER_MANAGER_PORT" --leader-elect=false \
  --use-service-account-credentials=true --service-cluster-ip-range="$SERVICE_CIDR" \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
  --kube-api-qps=100 --kube-api-burst=100 --profiling=false
daemon_start kube-scheduler "$KUBE_BIN/kube-scheduler" \
  --kubeconfig="$STATE/scheduler.kubeconfig" \
  --authentication-kubeconfig="$STATE/scheduler.kubeconfig" \
  --authorization-kubeconfig="$STATE/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --leader-elect=false --profiling=false
done_step

step "kubelet ($NODE_NAME at $NODE_IP) and kube-proxy (iptables)"
daemon_start kubelet "$KUBE_BIN/kubelet" --config="$STATE/kubelet.yaml" \
  --kubeconfig="$STATE/kubelet.kubeconfig" --hostname-override="$NODE_NAME" \
  --node-ip="$NODE_IP" --root-dir="$STATE/kubelet"
daemon_start kube-proxy "$KUBE_BIN/kube-proxy" --config="$STATE/kube-proxy.yaml"
wait_daemon kubelet 120 "node $NODE_NAME Ready" node_ready
done_step

step "ready for traffic: service account, kube-proxy rules, ClusterIP reachable from the host"
wait_for 60 "default service account" kubectl_admin get serviceaccount default -n default
wait_daemon kube-proxy 60 "healthz" curl -fsS --max-time 1 "http://$KUBE_PROXY_HEALTHZ/healthz"
# Its healthz can answer before its first sync has put its jumps into FORWARD; each one it adds
# later is inserted first, above the egress guard.
wait_for 60 "kube-proxy's FORWARD rules" kube_proxy_forward_rules
host_network_up # kube-proxy has inserted its FORWARD rules: the egress guard goes back on top
host_check_routes
# The apiserver through its ClusterIP: proves the DNAT path the tests' traffic takes.
wait_for 60 "https://$SERVICE_IP_APISERVER/readyz through kube-proxy" curl -fsS --max-time 1 \
  --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
  "https://$SERVICE_IP_APISERVER/readyz"
done_step

ingress_up

log "cluster up in $((SECONDS - started))s; logs in $LOGS"
echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
