#!/usr/bin/env bash
# Packs the static release binaries (make build-static) as single-file OCI images and imports
# them into the cluster's containerd (namespace k8s.io) as localhost/<name>:$IMAGE_TAG
# (GRACEFUL_IMAGE_TAG overrides "dev"), plus localhost/hey for in-cluster clients. An image whose
# binary did not change is not re-imported.
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
source "$here/daemons.sh"

release="${CARGO_TARGET_DIR:-$REPO/target}/x86_64-unknown-linux-gnu/release"
daemon_pid containerd >/dev/null && [[ -S $CONTAINERD_SOCK ]] \
  || die "the cluster's containerd is not running: make cluster-up first"

step "images localhost/*:$IMAGE_TAG from $release"
for name in graceful-sidecar graceful-operator graceful-demo; do
  # A missing binary must stop here: an older image of the same name would be tested instead.
  [[ -x $release/$name ]] || die "no $name at $release: run make build-static"
  image_import "$release/$name" "localhost/$name:$IMAGE_TAG"
done
# The demo again under a second name: `kubectl set image` scenarios need an image that differs.
image_import "$release/graceful-demo" "localhost/graceful-demo-next:$IMAGE_TAG"
# A load generator for pods (requests from inside the cluster): hey is a static Go binary.
[[ -x $BIN/hey ]] || die "hey missing in $BIN: run scripts/deps.sh"
image_import "$BIN/hey" "localhost/hey:$IMAGE_TAG"
done_step
