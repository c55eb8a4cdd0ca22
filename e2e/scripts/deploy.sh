#!/usr/bin/env bash
# Installs (or upgrades) graceful into the e2e cluster as a user would, from the cluster's
# registry: the chart `make images`' version names (pushed here first), release `graceful` in
# namespace graceful-system; then waits until the operator and its webhook serve.
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

version=$(cat "$CACHE/images/dev-version" 2>/dev/null) || die "no images pushed yet: make images"
[[ -n $(registry_digest "$E2E_REGISTRY/graceful-operator:$version") ]] \
  || die "$E2E_REGISTRY/graceful-operator:$version is not in the registry: make images"

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

# As a user installs a release: the chart from the registry, which names the images beside it.
# The same binaries under a later version wait there for the upgrade test (e2e/tests/upgrade.rs).
step "chart oci://$E2E_REGISTRY/charts/graceful, versions $version and $(upgrade_version "$version")"
chart_push "$E2E_REGISTRY" "$version"
chart_push "$E2E_REGISTRY" "$(upgrade_version "$version")"
done_step

[[ -s $PKI/webhook-client-ca.crt ]] \
  || die "no $PKI/webhook-client-ca.crt: this cluster predates the API server's webhook client certificate; make cluster-down cluster-up"
step "helm upgrade --install $RELEASE oci://$E2E_REGISTRY/charts/graceful --version $version ($NAMESPACE)"
out=$(helm upgrade --install "$RELEASE" "oci://$E2E_REGISTRY/charts/graceful" --version "$version" \
  --plain-http --namespace "$NAMESPACE" --create-namespace --set image.registry="$E2E_REGISTRY" \
  --set-file webhook.clientCA="$PKI/webhook-client-ca.crt" \
  --wait --timeout 180s 2>&1) || die "helm upgrade --install failed: $out"
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
