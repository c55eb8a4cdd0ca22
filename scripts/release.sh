#!/usr/bin/env bash
# make release REGISTRY=host[:port][/path]: graceful $V, the workspace's version, from a clean
# tree, pushed where a user installs it from:
#   $REGISTRY/graceful-operator:$V and $REGISTRY/graceful-sidecar:$V (OCI labels: version,
#     revision, source), built with buildah from operator/ and sidecar/Containerfile
#   oci://$REGISTRY/charts/graceful, version and appVersion $V, its image.registry $REGISTRY,
#     so that `helm install graceful oci://$REGISTRY/charts/graceful --version $V` needs no value
# Every check comes before anything is built or pushed, and each failure is one line.
# SOURCE=url labels the images with where their source lives (the release workflow sets it).
set -euo pipefail
source "$(dirname "$0")/../e2e/scripts/common.sh"

registry=${REGISTRY:-}
[[ -n $registry ]] || die "make release needs REGISTRY=host[:port][/path], the registry to push to (make release REGISTRY=127.0.0.1:5000)"
registry=${registry%/}
[[ $registry =~ ^[a-zA-Z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*$ ]] \
  || die "REGISTRY=$registry is not host[:port][/path]"
version=$(workspace_version "$REPO/Cargo.toml")
chart=$REPO/charts/graceful/Chart.yaml
chart_version=$(awk '/^version:/ {print $2}' "$chart")
app_version=$(awk '/^appVersion:/ {gsub(/"/, "", $2); print $2}' "$chart")
[[ $chart_version == "$version" && $app_version == "$version" ]] \
  || die "versions disagree: Cargo.toml $version, Chart.yaml version $chart_version and appVersion $app_version: make them one"
dirty=$(git -C "$REPO" status --porcelain)
[[ -z $dirty ]] || die "the tree has $(wc -l <<< "$dirty") uncommitted changes (git status): a release is built from a commit"
url=$(registry_url "$registry")
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url/v2/" || true)
[[ $code == 200 || $code == 401 ]] \
  || die "no registry answers at $url/v2/ (HTTP ${code:-000}): is REGISTRY=$registry right, and is it up?"
if [[ -n $(registry_digest "$registry/graceful-operator:$version") && ${FORCE:-} != 1 ]]; then
  die "$registry/graceful-operator:$version exists: a released version is never pushed again (bump the version, or FORCE=1)"
fi
revision=$(git -C "$REPO" rev-parse HEAD)

step "release graceful $version ($revision) to $registry"
"$REPO/scripts/deps.sh"
"$REPO/e2e/scripts/build-helm.sh"
make -C "$REPO" --no-print-directory build-static
release="${CARGO_TARGET_DIR:-$REPO/target}/x86_64-unknown-linux-gnu/release"
# Reproducible: the commit's time, not the build's, is the images' creation time.
args=(--timestamp "$(git -C "$REPO" log -1 --format=%ct)" --build-arg "VERSION=$version"
  --build-arg "REVISION=$revision" --build-arg "SOURCE=${SOURCE:-}")
for name in graceful-operator graceful-sidecar; do
  image_push "$REPO/${name#graceful-}/Containerfile" "$release/$name" "$registry/$name:$version" -- "${args[@]}"
done
chart_push "$registry" "$version"
done_step
plain_http=""
registry_plain_http "$registry" && plain_http=" --plain-http"
log "released graceful $version: helm install graceful oci://$registry/charts/graceful --version $version$plain_http -n graceful-system --create-namespace"
