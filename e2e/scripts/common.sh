# Shared settings for the e2e scripts: versions, paths and the progress log. Sourced, not run.
# One place for each fact: addresses and versions live here and nowhere else.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KUBE_VERSION=v1.33.13
HELM_VERSION=v3.21.4
# The ingress proxy the e2e tests drive, built from e2e/traefik (its go.mod pins the same version).
TRAEFIK_VERSION=v3.6.23
# The Gateway API release Traefik $TRAEFIK_VERSION is built against (its go.mod); its standard CRDs.
GATEWAY_API_VERSION=v1.4.0
# KWOK: fake nodes and pods for the scale measurement (e2e/scripts/kwok.sh, build-kwok.sh).
KWOK_VERSION=v0.8.0
# etcd, built from e2e/etcd (its go.mod requires the same version): build-etcd.sh.
ETCD_VERSION=v3.6.16

# Everything built or downloaded lives outside the repo so a fresh clone starts warm.
CACHE=${GRACEFUL_CACHE:-$HOME/.cache/graceful}
BIN=$CACHE/bin
# Runtime state of the cluster (certs, configs, logs, pids, data).
STATE=${GRACEFUL_STATE:-/var/lib/graceful-e2e}

export PATH="$BIN:$PATH"

# The stamp of a Go wrapper module (e2e/kube, e2e/etcd): a change to its sources rebuilds it.
wrapper_module_stamp() { cat "$1/go.mod" "$1/go.sum" "$1"/*.go | sha256sum | cut -c1-16; }

_step_start=0
_step_name=""
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
step() { _step_name=$*; _step_start=$(date +%s); log "-> $*"; }
done_step() { log "   done: $_step_name ($(( $(date +%s) - _step_start ))s)"; }
die() { log "error: $*"; exit 1; }

# --- the cluster: every address, CIDR, port and path of it, once ---
# Runtime files that must not survive a reboot (sockets, containerd state).
RUN_DIR=/run/graceful-e2e
LOGS=$STATE/logs
# The apiserver's audit of service accounts' requests (cluster-up.sh's policy).
AUDIT_LOG=$LOGS/audit.log
PIDS=$STATE/pids
PKI=$STATE/pki
KUBECONFIG_ADMIN=$STATE/admin.kubeconfig

NODE_NAME=graceful-node
# The node IP is the pod bridge's gateway: the apiserver, kubelet and kube-proxy never touch eth0.
BRIDGE=graceful0
NODE_IP=10.244.0.1
POD_CIDR=10.244.0.0/24
# Service addresses are routed to a sink: whatever kube-proxy does not translate goes nowhere
# instead of following the default route off the machine. The sink is a bridge with no ports
# (this kernel has no dummy driver); what is sent there is dropped.
SVC_SINK=graceful-svc
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP_APISERVER=10.96.0.1
CNI_NETWORK=graceful

APISERVER_PORT=6443
# The apiserver listens on the node IP only (nothing of the cluster listens on eth0).
APISERVER_URL=https://$NODE_IP:$APISERVER_PORT
ETCD_CLIENT=http://127.0.0.1:2379
ETCD_PEER=http://127.0.0.1:2380
KUBELET_HEALTHZ=127.0.0.1:10248
KUBE_PROXY_HEALTHZ=127.0.0.1:10256
KUBE_PROXY_METRICS=127.0.0.1:10249
CONTROLLER_MANAGER_PORT=10257
SCHEDULER_PORT=10259

CONTAINERD_SOCK=$RUN_DIR/containerd.sock
CONTAINERD_ROOT=$STATE/containerd
CONTAINERD_STATE=$RUN_DIR/containerd
CNI_BIN=/usr/lib/cni
PAUSE_IMAGE=localhost/graceful-pause:3.10
IMAGE_TAG=${GRACEFUL_IMAGE_TAG:-dev}

# --- the ingress: Traefik (e2e/scripts/traefik.sh), host network, on the node IP ---
TRAEFIK_NAMESPACE=traefik
TRAEFIK_IMAGE=localhost/graceful-traefik:$TRAEFIK_VERSION
# The main instance. Its name is also its GatewayClass and Gateway; its IngressClass is the
# cluster's default class (an Ingress without a class gets it at admission).
TRAEFIK_NAME=traefik
TRAEFIK_CLASS=traefik
# HTTP entrypoint on $NODE_IP. A Gateway listener binds to the entrypoint of the same port.
TRAEFIK_PORT=8000
# Ping (readiness) entrypoint of an instance: its HTTP port + this offset (8000 -> 9000).
TRAEFIK_PING_OFFSET=1000
# providersThrottleDuration: the pause after each configuration Traefik applies (its default).
TRAEFIK_THROTTLE=2s
INGRESS_URL=http://$NODE_IP:$TRAEFIK_PORT

# --- fake nodes: KWOK (e2e/scripts/kwok.sh), a host process that plays the kubelet of them ---
# The label (kwok's node selector, and the pods' nodeSelector) and the taint (NoSchedule, so
# that only pods tolerating it land there) of every fake node: key=value.
KWOK_NODE_LABEL=kwok.x-k8s.io/node=fake
# Pod IPs kwok hands out on fake nodes: apart from $POD_CIDR, $SERVICE_CIDR and eth0, and routed
# to $SVC_SINK while kwok runs, so that whatever is sent to one (kube-proxy DNATs a Service
# with fake endpoints there) is dropped on this host. Nothing may send to them on purpose.
KWOK_POD_CIDR=10.200.0.0/16
# kwok's /healthz and /metrics (loopback only).
KWOK_ADDR=127.0.0.1:10247

# Host settings the cluster changes (kubelet and kube-proxy set some themselves); `up` records
# the values it found and `down` puts them back.
TOUCHED_SYSCTLS=(net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables vm.overcommit_memory vm.panic_on_oom kernel.panic
  kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes
  net.ipv4.conf.all.route_localnet)

# Daemons in start order; `down` stops them in reverse.
DAEMONS=(etcd containerd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

ctr_k8s() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }
kubectl_admin() { kubectl --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# A daemon is running when its recorded pid is alive and still runs the binary we started
# (a pid number left from a killed cluster may belong to anything by now).
daemon_pid() { # name -> prints the live pid, or fails
  local name=$1 pid exe
  pid=$(cat "$PIDS/$name.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$({ tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null) || return 1
  [[ $exe == *"$(cat "$PIDS/$name.cmd" 2>/dev/null)"* && -n $exe ]] || return 1
  echo "$pid"
}

# Waits until a command succeeds, printing a dot per second; fails after a timeout in seconds.
wait_for() { # timeout description cmd...
  local timeout=$1 what=$2 start=$SECONDS; shift 2
  until "$@" >/dev/null 2>&1; do
    (( SECONDS - start < timeout )) || die "timed out after ${timeout}s waiting for $what"
    sleep 0.5
  done
}

# Imports BINARY as the single-file image REF unless containerd already holds that exact image
# (packing is deterministic, so equal digests mean equal images). Needs the cluster's containerd.
# The packed tarball and its digest are kept with a key of the binary's identity (size, mtime
# to the nanosecond, inode), the ref, the user and the packer: a warm run does not re-read a
# large binary (Traefik: 175 MB, 1.2 s to pack).
image_import() { # binary ref [user]
  local bin=$1 ref=$2 user=${3:-65532:65532} tar key digest have
  tar="$CACHE/images/$(tr '/:' '__' <<< "$ref").tar"
  mkdir -p "$CACHE/images"
  key="$(stat -L -c '%s %y %i' "$bin") $ref $user $(sha256sum < "$REPO/e2e/scripts/oci-image.py" | cut -c1-16)"
  if [[ -s $tar && -s $tar.digest && $(cat "$tar.key" 2>/dev/null) == "$key" ]]; then
    digest=$(cat "$tar.digest")
  else
    digest=$(python3 "$REPO/e2e/scripts/oci-image.py" "$bin" "$ref" "$tar" --user "$user")
    echo "$digest" > "$tar.digest"
    echo "$key" > "$tar.key"
  fi
  have=$(ctr_k8s images ls "name==$ref" 2>/dev/null | awk 'NR > 1 {print $3}')
  if [[ $have == "$digest" ]]; then
    log "   $ref: unchanged (${digest:0:19})"
    return
  fi
  ctr_k8s images import "$tar" >/dev/null
  log "   $ref: imported (${digest:0:19}, $(du -h "$bin" | cut -f1))"
}
