#!/usr/bin/env bash
# make images: builds the images of the static release binaries (make build-static) with buildah
# from their Containerfiles and pushes them to the cluster's registry ($E2E_REGISTRY):
#   graceful-operator, graceful-sidecar  :$V-dev-<hash of both binaries>, its .upgrade twin, :dev
#   graceful-demo, graceful-demo-next    :dev (the demo twice: `kubectl set image` needs a change)
#   hey                                  :dev (the load generator of in-cluster clients)
# The dev version names exactly these binaries, so a rebuilt operator or sidecar is a new tag
# that every pod pulls afresh; deploy.sh installs the chart under it, and the upgrade test moves
# to its .upgrade twin (same binaries, another version). The node then pulls every :dev image
# and names it localhost/NAME:dev as well. An image whose binary did not change is not pushed.
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
source "$here/daemons.sh"

release="${CARGO_TARGET_DIR:-$REPO/target}/x86_64-unknown-linux-gnu/release"
{ daemon_pid registry >/dev/null && daemon_pid containerd >/dev/null; } \
  || die "the cluster's registry or containerd is not running: make cluster-up first"
for name in graceful-sidecar graceful-operator graceful-demo; do
  # A missing binary must stop here: an older image of the same name would be tested instead.
  [[ -x $release/$name ]] || die "no $name at $release: run make build-static"
done
[[ -x $BIN/hey ]] || die "hey missing in $BIN: run scripts/deps.sh"

version=$(dev_version "$release")
revision=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
[[ -z $(git -C "$REPO" status --porcelain 2>/dev/null) ]] || revision+="-dirty"
step "images $E2E_REGISTRY/*, version $version"
labels=(--build-arg "VERSION=$version" --build-arg "REVISION=$revision" --timestamp 0)
for name in graceful-operator graceful-sidecar; do
  image_push "$REPO/${name#graceful-}/Containerfile" "$release/$name" "$E2E_REGISTRY/$name:$version" \
    "$E2E_REGISTRY/$name:$(upgrade_version "$version")" "$E2E_REGISTRY/$name:dev" -- "${labels[@]}"
done
image_push "$REPO/demo/Containerfile" "$release/graceful-demo" "$E2E_REGISTRY/graceful-demo:dev" \
  "$E2E_REGISTRY/graceful-demo-next:dev" -- "${labels[@]}"
image_push "$REPO/e2e/images/hey.Containerfile" "$BIN/hey" "$E2E_REGISTRY/hey:dev" -- --timestamp 0
echo "$version" > "$CACHE/images/dev-version"
done_step

step "node: pull the :dev images, name them localhost/NAME:dev"
for name in graceful-operator graceful-sidecar graceful-demo graceful-demo-next hey; do
  node_pull "$E2E_REGISTRY/$name:dev" "localhost/$name:dev"
done
done_step
