# shellcheck shell=bash disable=SC2034 # the variables are for the scripts that source this file
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

# The minor of a Kubernetes version: v1.33.13 -> 33.
kube_minor() { local m=${1#v1.}; echo "${m%%.*}"; }

# go build -ldflags for Kubernetes VERSION: without the version stamped it says v0.0.0, and
# Helm's kubeVersion checks fail.
kube_ldflags() { # version
  local p minor flags="-s -w"
  minor=$(kube_minor "$1")
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $p.gitVersion=$1 -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    flags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}

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

# --- images: built with buildah from Containerfiles, pulled by the node from a registry ---
# The cluster's registry (Debian's docker-registry, started by cluster-up.sh). Its storage
# outlives cluster-down, like containerd's image store. `make images` pushes here, the suite
# installs graceful from here as a user installs it from theirs.
E2E_REGISTRY=127.0.0.1:5000
REGISTRY_DIR=$STATE/registry
# containerd's registry configuration (a hosts.toml per registry): plain HTTP to ours.
REGISTRY_HOSTS=$STATE/registry-hosts
# buildah's image store (vfs: no overlay mounts of its own), for builds only: pushed, removed.
BUILDAH_ROOT=$CACHE/buildah
PAUSE_IMAGE=$E2E_REGISTRY/graceful-pause:3.10

# --- the ingress: Traefik (e2e/scripts/traefik.sh), host network, on the node IP ---
TRAEFIK_NAMESPACE=traefik
TRAEFIK_IMAGE=$E2E_REGISTRY/graceful-traefik:$TRAEFIK_VERSION
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

# --- more nodes' data planes: e2e/scripts/node-proxies.sh (issue 25) ---
# Network namespaces graceful-np1..N on this host, each a /30 of this range on a veth pair (gnpI
# on the host, address .4I+1; eth0 inside, .4I+2) with its own kube-proxy: apart from $POD_CIDR,
# $SERVICE_CIDR, $KWOK_POD_CIDR and eth0. The egress guard lets only pods' replies in.
NODE_PROXY_CIDR=10.250.0.0/24
# The last of them hears from the apiserver this many seconds late (a relay delays what the
# apiserver sends it: e2e/src/bin/lag_relay.rs).
NODE_PROXY_LAG_SECONDS=10

# Host settings the cluster changes (kubelet and kube-proxy set some themselves); `up` records
# the values it found and `down` puts them back.
TOUCHED_SYSCTLS=(net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables vm.overcommit_memory vm.panic_on_oom kernel.panic
  kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes
  net.ipv4.conf.all.route_localnet)

# Daemons in start order; `down` stops them in reverse.
DAEMONS=(etcd registry containerd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

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

# The version of a workspace's Cargo.toml (- : on standard input), which the chart's version and
# appVersion repeat.
workspace_version() { # cargo-toml | -
  awk -F'"' '/^\[workspace.package\]/ {p = 1} p && /^version *=/ {print $2; exit}' "$1"
}

# What `make images` calls a build of the tree: the workspace's version, marked as a development
# build of exactly these operator and sidecar binaries. A rebuilt binary is a new version, so
# no node runs a stale image under an old tag (the pull policy stays IfNotPresent).
dev_version() { # release-dir
  echo "$(workspace_version "$REPO/Cargo.toml")-dev-$(cat "$1/graceful-operator" "$1/graceful-sidecar" | sha256sum | cut -c1-12)"
}
# The same binaries under a second, later version: what the e2e upgrade test upgrades to.
upgrade_version() { echo "$1.upgrade"; }

# Packages the chart as VERSION (its version and appVersion) with image.registry set to
# REGISTRY, so that a plain `helm install oci://REGISTRY/charts/graceful --version VERSION`
# pulls the images pushed beside it, and pushes it there. Fails before pushing when the
# packaged chart does not render those images.
chart_push() { # registry version
  local registry=$1 version=$2 work out plain=()
  work=$(mktemp -d)
  cp -r "$REPO/charts/graceful" "$work/graceful"
  # values.yaml's first `registry: ""` is image.registry (charts/graceful/values.yaml says so).
  sed -i "0,/^  registry: \"\"\$/s||  registry: \"$registry\"|" "$work/graceful/values.yaml"
  helm package "$work/graceful" --version "$version" --app-version "$version" -d "$work" >/dev/null
  helm template graceful "$work/graceful-$version.tgz" --namespace graceful-system \
    --kube-version "${KUBE_VERSION#v}" \
    | grep -q "image: \"$registry/graceful-operator:$version\"" \
    || die "the packaged chart does not name $registry/graceful-operator:$version"
  registry_plain_http "$registry" && plain=(--plain-http)
  out=$(helm push "${plain[@]}" "$work/graceful-$version.tgz" "oci://$registry/charts" 2>&1) \
    || die "helm push of graceful $version to oci://$registry/charts failed: $out"
  rm -rf "$work"
  log "   oci://$registry/charts/graceful:$version pushed"
}

# Plain HTTP for a registry on this machine, TLS for any other.
registry_url() { # host[:port][/path] -> scheme://host[:port]
  local host=${1%%/*}
  case $host in
    127.* | localhost | localhost:* | "[::1]"*) echo "http://$host" ;;
    *) echo "https://$host" ;;
  esac
}
registry_plain_http() { [[ $(registry_url "$1") == http://* ]]; }

# The manifest digest the registry serves for REF (registry/path/name:tag), or nothing.
registry_digest() { # ref
  local reg=${1%%/*} path=${1#*/}
  curl -fsS --max-time 10 -I \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    -H 'Accept: application/vnd.oci.image.index.v1+json' \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "$(registry_url "$reg")/v2/${path%:*}/manifests/${path##*:}" 2>/dev/null \
    | tr -d '\r' | awk -F': ' 'tolower($1) == "docker-content-digest" {print $2}'
}

buildah_() { buildah --root "$BUILDAH_ROOT" --runroot /run/graceful-buildah --storage-driver vfs "$@"; }

# Builds an image around one static binary from CONTAINERFILE and pushes it under every REF,
# unless each REF already serves the image that this binary, file and these build arguments
# gave last time (a key of the binary's identity -- size, mtime to the nanosecond, inode --
# spares re-reading Traefik's 175 MB). The context holds the binary as $TARGETARCH/NAME, as in
# the release's multi-arch build. Build arguments: buildah's (--build-arg, --timestamp).
image_push() { # containerfile binary ref... [-- build-args...]
  local file=$1 bin=$2 refs=() ref stamp key digest ctx arch tls
  shift 2
  while (($#)) && [[ $1 != -- ]]; do refs+=("$1"); shift; done
  (($#)) && shift
  [[ -x $bin ]] || die "no $bin to build ${refs[0]} from"
  stamp="$CACHE/images/$(tr '/:' '__' <<< "${refs[0]}")"
  key="$(stat -L -c '%s %y %i' "$bin") $(sha256sum < "$file" | cut -c1-16) ${refs[*]} $*"
  digest=$(cat "$stamp.digest" 2>/dev/null || true)
  if [[ -n $digest && $(cat "$stamp.key" 2>/dev/null) == "$key" ]]; then
    for ref in "${refs[@]}"; do [[ $(registry_digest "$ref") == "$digest" ]] || digest=""; done
    if [[ -n $digest ]]; then
      log "   ${refs[0]}$(tags_also "${refs[@]}"): unchanged (${digest:0:19})"
      return
    fi
  fi
  mkdir -p "$CACHE/images"
  case $(uname -m) in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
  ctx=$(mktemp -d "$CACHE/images/context.XXXXXX")
  mkdir "$ctx/$arch"
  ln "$(readlink -f "$bin")" "$ctx/$arch/${bin##*/}" 2>/dev/null || cp "$bin" "$ctx/$arch/${bin##*/}"
  buildah_ build --quiet --layers=false --build-arg "TARGETARCH=$arch" "$@" -f "$file" \
    -t "${refs[0]}" "$ctx" >/dev/null
  rm -rf "$ctx"
  for ref in "${refs[@]}"; do
    registry_plain_http "$ref" && tls=false || tls=true
    buildah_ push --quiet --tls-verify="$tls" --digestfile "$stamp.digest" "${refs[0]}" "docker://$ref"
  done
  buildah_ rmi "${refs[0]}" >/dev/null
  echo "$key" > "$stamp.key"
  log "   ${refs[0]}$(tags_also "${refs[@]}"): pushed ($(cut -c1-19 "$stamp.digest"), $(du -h "$bin" | cut -f1))"
}

tags_also() { # ref... -> " (also name:tag2 ...)", the refs after the first
  local ref more=""
  for ref in "${@:2}"; do more+=" ${ref##*/}"; done
  [[ -z $more ]] || echo " (also$more)"
}

# The node pulls REF from the registry as the kubelet does, and names it ALIAS too: the
# localhost/NAME:dev names that tests outside the repo run with imagePullPolicy: Never.
node_pull() { # ref [alias]
  ctr_k8s images pull --hosts-dir "$REGISTRY_HOSTS" "$1" >/dev/null
  [[ -z ${2:-} ]] || ctr_k8s images tag --force "$1" "$2" >/dev/null
}

# --- another Kubernetes minor: make compat K8S=1.MM (GRACEFUL_K8S=1.MM) ---
# That minor's binaries, built by build-kube-compat.sh into $CACHE/compat/kube-1.MM/bin, run the
# cluster instead of $KUBE_VERSION's (which build-kube.sh still builds: helm and the tests'
# tools come with it); first on the PATH, so kubectl matches the cluster. CLUSTER_KUBE_VERSION
# is what the cluster runs, KUBE_MINOR its minor, for cluster-up.sh's per-minor settings.
KUBE_BIN=$BIN
CLUSTER_KUBE_VERSION=$KUBE_VERSION
if [[ -n ${GRACEFUL_K8S:-} ]]; then
  [[ $GRACEFUL_K8S =~ ^1\.[0-9]+$ ]] || die "GRACEFUL_K8S=$GRACEFUL_K8S: want a minor such as 1.35"
  KUBE_BIN=$CACHE/compat/kube-$GRACEFUL_K8S/bin
  CLUSTER_KUBE_VERSION=$(cat "$CACHE/compat/kube-$GRACEFUL_K8S/version" 2>/dev/null || echo "v$GRACEFUL_K8S.0")
  export PATH="$KUBE_BIN:$PATH"
fi
KUBE_MINOR=$(kube_minor "$CLUSTER_KUBE_VERSION")
