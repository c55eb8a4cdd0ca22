#!/usr/bin/env bash
# Builds the multi-call Kubernetes binary (e2e/kube) and helm (build-helm.sh) into the cache, once.
# A warm run only compares a stamp and returns in milliseconds.
set -euo pipefail
source "$(dirname "$0")/common.sh"

kube_src="$REPO/e2e/kube"
stamp=$(wrapper_module_stamp "$kube_src")
kube_bin="$BIN/kube"

if [[ -x $kube_bin && $(cat "$BIN/kube.stamp" 2>/dev/null) == "$stamp" ]]; then
  log "kubernetes $KUBE_VERSION: cached ($kube_bin)"
else
  step "build kubernetes $KUBE_VERSION from the Go module (cold: about 8 min on 2 cores)"
  mkdir -p "$BIN"
  (cd "$kube_src" && CGO_ENABLED=0 go build -trimpath -ldflags "$(kube_ldflags "$KUBE_VERSION")" -o "$kube_bin.tmp" .)
  mv "$kube_bin.tmp" "$kube_bin"
  echo "$stamp" > "$BIN/kube.stamp"
  done_step
fi
for c in kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet kubectl; do
  ln -sf kube "$BIN/$c"
done

"$(dirname "$0")/build-helm.sh"
