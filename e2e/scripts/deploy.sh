#!/usr/bin/env bash
# Installs (or upgrades) the chart into the e2e cluster with the local :dev images: release
# `graceful` in namespace graceful-system, then waits until the operator and its webhook serve.
# CRDs are applied first: Helm installs crds/ once and never upgrades them.
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"

RELEASE=${GRACEFUL_RELEASE:-graceful}
NAMESPACE=${GRACEFUL_NAMESPACE:-graceful-system}
CHART=$REPO/charts/graceful
export KUBECONFIG=${KUBECONFIG:-$KUBECONFIG_ADMIN}

command -v helm >/dev/null || die "helm missing in $BIN: run e2e/scripts/build-kube.sh (make cluster-up builds it)"
command -v kubectl >/dev/null || die "kubectl missing: run make cluster-up"
[[ -s $CHART/crds/gracefulrollouts.yaml ]] || die "no CRD in $CHART/crds: run make crds"
kubectl get --raw /readyz >/dev/null 2>&1 || die "no cluster at $KUBECONFIG: make cluster-up"

# Same tag, new binary: the image digest in a pod annotation rolls the operator when it changed.
digest=$(ctr_k8s images ls "name==localhost/graceful-operator:$IMAGE_TAG" 2>/dev/null | awk 'NR > 1 {print $3}')
[[ -n $digest ]] || die "image localhost/graceful-operator:$IMAGE_TAG not in containerd: make images"

step "CRDs from $CHART/crds"
kubectl apply --server-side --force-conflicts -f "$CHART/crds/" >/dev/null
kubectl wait --for condition=Established --timeout 60s -f "$CHART/crds/" >/dev/null
done_step

# Releases before the chart held the leader Lease left it to the operator: adopt it, or Helm
# refuses to create what already exists.
lease=$(kubectl -n "$NAMESPACE" get lease graceful-operator -o name 2>/dev/null || true)
if [[ -n $lease ]] && ! kubectl -n "$NAMESPACE" get "$lease" -o jsonpath='{.metadata.annotations}' | grep -q meta.helm.sh; then
  kubectl -n "$NAMESPACE" annotate "$lease" --overwrite \
    "meta.helm.sh/release-name=$RELEASE" "meta.helm.sh/release-namespace=$NAMESPACE" >/dev/null
  kubectl -n "$NAMESPACE" label "$lease" --overwrite app.kubernetes.io/managed-by=Helm >/dev/null
fi

step "helm upgrade --install $RELEASE ($NAMESPACE, images :$IMAGE_TAG)"
helm upgrade --install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --create-namespace \
  -f "$CHART/ci/dev-values.yaml" \
  --set operator.image.tag="$IMAGE_TAG" --set sidecar.image.tag="$IMAGE_TAG" \
  --set-string "operator.podAnnotations.graceful\.dev/image-digest=${digest#sha256:}" \
  --wait --timeout 180s >/dev/null
done_step

step "operator rollout and webhook caBundle"
deploy=$(kubectl -n "$NAMESPACE" get deploy -l "app.kubernetes.io/instance=$RELEASE" -o name)
kubectl -n "$NAMESPACE" rollout status "$deploy" --timeout 180s >/dev/null
config=$(kubectl get mutatingwebhookconfiguration -l "app.kubernetes.io/instance=$RELEASE" -o name)
for _ in $(seq 60); do
  bundle=$(kubectl get "$config" -o jsonpath='{.webhooks[0].clientConfig.caBundle}')
  [[ -n $bundle ]] && break
  sleep 1
done
[[ -n $bundle ]] || die "$config has no caBundle after 60s: kubectl -n $NAMESPACE logs $deploy"
done_step
log "graceful deployed: $(kubectl -n "$NAMESPACE" get "$deploy" -o jsonpath='{.status.readyReplicas}') operator replicas ready"
