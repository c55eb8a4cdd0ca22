#!/usr/bin/env bash
# The cluster's ingress: Traefik $TRAEFIK_VERSION (built by build-traefik.sh) on the host network,
# serving Ingresses (the default IngressClass) and Gateway API routes on $NODE_IP.
#
#   traefik.sh install                              image, Gateway API CRDs, namespace, RBAC and
#                                                   the main instance; waits until it serves
#   traefik.sh up NAME PORT THROTTLE INGRESSCLASS   one more instance (e.g. a slow data plane):
#                                                   applies it, waits until it serves
#   traefik.sh down NAME                            deletes that instance (waits until it is gone)
#   traefik.sh manifests NAME PORT THROTTLE INGRESSCLASS   prints an instance's manifests
#   traefik.sh status                               one line per instance; fails if one is not ready
#
# An instance NAME is a Deployment NAME (1 replica) in $TRAEFIK_NAMESPACE with its HTTP
# entrypoint on $NODE_IP:PORT, its ping entrypoint on PORT + $TRAEFIK_PING_OFFSET, its own
# GatewayClass NAME and Gateway NAME (an HTTP listener on PORT, routes from all namespaces), and
# it serves the Ingresses of class INGRESSCLASS. THROTTLE is providersThrottleDuration (`2s`,
# `10s`). INGRESSCLASS may be the main class ($TRAEFIK_CLASS): then both instances serve the
# same Ingresses, each on its own port. Any other class is created for the instance (not default).
# Everything lives in the cluster (no files on the host): `down` or a new cluster removes it.
# cluster-up.sh sources this file and calls traefik_install.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TRAEFIK_LABEL=graceful.dev/traefik-instance
TRAEFIK_CRDS=$CACHE/gateway-api-$GATEWAY_API_VERSION/standard-install.yaml
# What every instance shares, the ClusterRole included, as one field manager.
TRAEFIK_FIELD_MANAGER=graceful-e2e

kubectl_traefik() { kubectl --kubeconfig "${KUBECONFIG:-$KUBECONFIG_ADMIN}" "$@"; }

# Namespace, ServiceAccount and the ClusterRole every instance runs with. Traefik reads through
# informers (list + watch, never a plain get) and writes only status, with UpdateStatus:
# - Ingress provider: ingresses, services, endpointslices, secrets per namespace; ingressclasses
#   and nodes cluster-wide (it waits for the Nodes informer); ingresses/status for ingressEndpoint.
# - Gateway provider: namespaces (allowedRoutes), gatewayclasses, and per namespace gateways,
#   httproutes, grpcroutes, referencegrants, backendtlspolicies, services, endpointslices,
#   configmaps (BackendTLSPolicy CA certificates), secrets; status of the first five but
#   referencegrants (which has none). TCPRoute/TLSRoute are experimental channel: not watched.
traefik_shared_manifests() {
  cat <<YAML
apiVersion: v1
kind: Namespace
metadata:
  name: $TRAEFIK_NAMESPACE
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: traefik
  namespace: $TRAEFIK_NAMESPACE
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: graceful-e2e-traefik
rules:
  - apiGroups: [""]
    resources: [services, secrets, configmaps, namespaces, nodes]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
  - apiGroups: [networking.k8s.io]
    resources: [ingresses, ingressclasses]
    verbs: [list, watch]
  - apiGroups: [networking.k8s.io]
    resources: [ingresses/status]
    verbs: [update]
  - apiGroups: [gateway.networking.k8s.io]
    resources: [gatewayclasses, gateways, httproutes, grpcroutes, referencegrants, backendtlspolicies]
    verbs: [list, watch]
  - apiGroups: [gateway.networking.k8s.io]
    resources: [gatewayclasses/status, gateways/status, httproutes/status, grpcroutes/status, backendtlspolicies/status]
    verbs: [update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: graceful-e2e-traefik
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: graceful-e2e-traefik
subjects:
  - kind: ServiceAccount
    name: traefik
    namespace: $TRAEFIK_NAMESPACE
YAML
}

traefik_check_args() { # name port throttle ingressclass
  (($# == 4)) || die "usage: traefik.sh up|manifests NAME PORT THROTTLE INGRESSCLASS"
  [[ $1 =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die "instance name '$1': a DNS label"
  { [[ $2 =~ ^[0-9]+$ ]] && (($2 > 1024 && $2 + TRAEFIK_PING_OFFSET < 65536)); } \
    || die "port '$2': 1025..$((65535 - TRAEFIK_PING_OFFSET)) (unprivileged; ping is port + $TRAEFIK_PING_OFFSET)"
  [[ $3 =~ ^[0-9]+(ms|s|m)$ ]] || die "throttle '$3': a Go duration such as 2s, 500ms, 10s"
  [[ $4 =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die "ingress class '$4': a DNS label"
}

# The image's digest in the registry: pods pull by digest, so a rebuilt binary under the same tag
# rolls the Deployment and no node runs the stale one.
traefik_image_digest() {
  local digest
  digest=$(registry_digest "$TRAEFIK_IMAGE")
  [[ -n $digest ]] || die "$TRAEFIK_IMAGE is not in the registry $E2E_REGISTRY (traefik.sh install pushes it)"
  echo "$digest"
}

traefik_instance_manifests() { # name port throttle ingressclass
  traefik_check_args "$@"
  local name=$1 port=$2 throttle=$3 class=$4 ping=$(($2 + TRAEFIK_PING_OFFSET)) digest
  digest=$(traefik_image_digest)
  # The main class is the main instance's: another instance that shares it must not relabel it.
  if [[ $class != "$TRAEFIK_CLASS" || $name == "$TRAEFIK_NAME" ]]; then
    cat <<YAML
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: $class
  labels: {$TRAEFIK_LABEL: $name}
  annotations:
    ingressclass.kubernetes.io/is-default-class: "$([[ $class == "$TRAEFIK_CLASS" ]] && echo true || echo false)"
spec:
  controller: traefik.io/ingress-controller
---
YAML
  fi
  cat <<YAML
# Every instance reads only the GatewayClass labelled with its name (--providers.kubernetesgateway
# .labelselector): two instances never write the same Gateway's status.
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: $name
  labels: {$TRAEFIK_LABEL: $name}
spec:
  controllerName: traefik.io/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: $name
  namespace: $TRAEFIK_NAMESPACE
  labels: {$TRAEFIK_LABEL: $name}
spec:
  gatewayClassName: $name
  listeners:
    - name: web
      protocol: HTTP
      port: $port
      allowedRoutes:
        namespaces: {from: All}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $name
  namespace: $TRAEFIK_NAMESPACE
  labels: {app.kubernetes.io/name: traefik, $TRAEFIK_LABEL: $name}
spec:
  replicas: 1
  # Host ports: a surge pod could not be scheduled next to the old one.
  strategy: {type: Recreate}
  selector:
    matchLabels: {$TRAEFIK_LABEL: $name}
  template:
    metadata:
      labels: {app.kubernetes.io/name: traefik, $TRAEFIK_LABEL: $name}
    spec:
      serviceAccountName: traefik
      hostNetwork: true
      # No DNS: containerd would otherwise copy the host's resolv.conf (the kubelet passes no
      # server), and a lookup from the host network would leave the machine. Traefik resolves
      # nothing (apiserver and endpoints are addresses); a name would fail on loopback.
      dnsPolicy: None
      dnsConfig: {nameservers: [127.0.0.1]}
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: traefik
          image: $TRAEFIK_IMAGE@$digest
          imagePullPolicy: IfNotPresent
          command: [/traefik]
          args:
            - --global.checknewversion=false
            - --global.sendanonymoususage=false
            - --log.level=INFO
            - --log.nocolor=true
            - --accesslog=true
            - --accesslog.format=json
            - --entrypoints.web.address=$NODE_IP:$port
            - --entrypoints.web.asdefault=true
            - --entrypoints.traefik.address=$NODE_IP:$ping
            - --ping=true
            - --ping.entrypoint=traefik
            - --providers.providersthrottleduration=$throttle
            - --providers.kubernetesingress=true
            - --providers.kubernetesingress.endpoint=$APISERVER_URL
            - --providers.kubernetesingress.ingressclass=$class
            - --providers.kubernetesingress.ingressendpoint.ip=$NODE_IP
            - --providers.kubernetesgateway=true
            - --providers.kubernetesgateway.endpoint=$APISERVER_URL
            - --providers.kubernetesgateway.labelselector=$TRAEFIK_LABEL=$name
            - --providers.kubernetesgateway.statusaddress.ip=$NODE_IP
          ports:
            - {name: web, containerPort: $port}
            - {name: ping, containerPort: $ping}
          readinessProbe:
            httpGet: {path: /ping, port: $ping}
            periodSeconds: 2
            failureThreshold: 2
          resources:
            requests: {cpu: 50m, memory: 64Mi}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
YAML
}

traefik_apply() { # reads manifests on stdin
  kubectl_traefik apply --server-side --force-conflicts --field-manager "$TRAEFIK_FIELD_MANAGER" -f - >/dev/null
}

# Ready when its pod is Ready and its Gateway is Programmed (Traefik sets that once the listener
# has an entrypoint of the same port).
traefik_wait() { # name [timeout-seconds]
  local name=$1 timeout=${2:-120}
  kubectl_traefik -n "$TRAEFIK_NAMESPACE" rollout status "deployment/$name" --timeout "${timeout}s" >/dev/null \
    || { traefik_diagnose "$name"; die "traefik instance $name not ready after ${timeout}s"; }
  kubectl_traefik -n "$TRAEFIK_NAMESPACE" wait "gateway/$name" --for condition=Programmed --timeout "${timeout}s" >/dev/null \
    || { traefik_diagnose "$name"; die "gateway $name not Programmed after ${timeout}s"; }
}

traefik_diagnose() { # name
  kubectl_traefik -n "$TRAEFIK_NAMESPACE" get pods,gateway -l "$TRAEFIK_LABEL=$1" -o wide >&2 || true
  kubectl_traefik -n "$TRAEFIK_NAMESPACE" logs "deployment/$1" --tail 20 >&2 || true
}

traefik_up() { # name port throttle ingressclass
  traefik_check_args "$@"
  traefik_instance_manifests "$@" | traefik_apply
  traefik_wait "$1"
  log "   traefik $1: http://$NODE_IP:$2 (ingress class $4, throttle $3)"
}

traefik_down() { # name
  (($# == 1)) || die "usage: traefik.sh down NAME"
  local sel="$TRAEFIK_LABEL=$1"
  kubectl_traefik -n "$TRAEFIK_NAMESPACE" delete deployment,gateway -l "$sel" --ignore-not-found \
    --cascade=foreground --wait >/dev/null
  kubectl_traefik delete gatewayclass,ingressclass -l "$sel" --ignore-not-found --wait >/dev/null
  # The pod goes with its Deployment (foreground): its ports are free when this returns.
  wait_for 60 "traefik $1's pods to go" traefik_no_pods "$1"
}

traefik_no_pods() { [[ -z $(kubectl_traefik -n "$TRAEFIK_NAMESPACE" get pods -l "$TRAEFIK_LABEL=$1" -o name) ]]; }

# The CRDs are applied when their bundle version differs (a warm run reads one annotation).
traefik_crds() {
  [[ -s $TRAEFIK_CRDS ]] || die "no $TRAEFIK_CRDS: run e2e/scripts/build-traefik.sh"
  local have
  have=$(kubectl_traefik get crd gateways.gateway.networking.k8s.io \
    -o jsonpath='{.metadata.annotations.gateway\.networking\.k8s\.io/bundle-version}' 2>/dev/null || true)
  if [[ $have == "$GATEWAY_API_VERSION" ]]; then
    log "   gateway-api $GATEWAY_API_VERSION CRDs: present"
    return
  fi
  kubectl_traefik apply --server-side --force-conflicts --field-manager "$TRAEFIK_FIELD_MANAGER" \
    -f "$TRAEFIK_CRDS" >/dev/null
  kubectl_traefik wait --for condition=Established --timeout 60s -f "$TRAEFIK_CRDS" >/dev/null
  log "   gateway-api $GATEWAY_API_VERSION CRDs: applied${have:+ (were $have)}"
}

# Image, CRDs, shared objects and the main instance. Idempotent: a warm run pushes nothing and
# changes nothing, so the pod keeps running.
traefik_install() {
  [[ -x $BIN/traefik ]] || die "no $BIN/traefik: run e2e/scripts/build-traefik.sh"
  image_push "$REPO/e2e/images/traefik.Containerfile" "$BIN/traefik" "$TRAEFIK_IMAGE" -- --timestamp 0
  traefik_crds
  { traefik_shared_manifests; echo "---"
    traefik_instance_manifests "$TRAEFIK_NAME" "$TRAEFIK_PORT" "$TRAEFIK_THROTTLE" "$TRAEFIK_CLASS"
  } | traefik_apply
  traefik_wait "$TRAEFIK_NAME"
}

# One line per instance: name, ready pods, Gateway Programmed, address. Fails when there is no
# instance or one is not ready.
traefik_status() {
  local lines
  lines=$(kubectl_traefik -n "$TRAEFIK_NAMESPACE" get deployment -l "$TRAEFIK_LABEL" -o \
    jsonpath='{range .items[*]}{.metadata.name} {.status.readyReplicas}/{.spec.replicas} {.spec.template.spec.containers[0].args}{"\n"}{end}' 2>/dev/null) \
    || true
  [[ -n $lines ]] || { echo "  no traefik in namespace $TRAEFIK_NAMESPACE (make cluster-up installs it)"; return 1; }
  local ok=0 name ready args addr throttle programmed
  while read -r name ready args; do
    addr=$(grep -o 'entrypoints.web.address=[^"]*' <<< "$args" | cut -d= -f2)
    throttle=$(grep -o 'providersthrottleduration=[^"]*' <<< "$args" | cut -d= -f2)
    programmed=$(kubectl_traefik -n "$TRAEFIK_NAMESPACE" get gateway "$name" \
      -o jsonpath='{.status.conditions[?(@.type=="Programmed")].status}' 2>/dev/null || true)
    [[ $ready == /* ]] && ready=0$ready
    echo "  $name: $ready ready, http://$addr, throttle $throttle, gateway $name Programmed=${programmed:-?}"
    [[ ${ready%/*} == "${ready#*/}" && $programmed == True ]] || ok=1
  done <<< "$lines"
  return $ok
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  export KUBECONFIG=${KUBECONFIG:-$KUBECONFIG_ADMIN}
  case ${1:-} in
    install) shift; (($# == 0)) || die "usage: traefik.sh install"; traefik_install ;;
    up) shift; traefik_up "$@" ;;
    down) shift; traefik_down "$@" ;;
    manifests) shift; traefik_instance_manifests "$@" ;;
    status) traefik_status ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
  esac
fi
