#!/usr/bin/env bash
# Builds helm $HELM_VERSION into the cache with `go install`, once (make cluster-up, make release).
set -euo pipefail
source "$(dirname "$0")/common.sh"

if [[ -x $BIN/helm && $("$BIN/helm" version --template '{{.Version}}' 2>/dev/null) == "$HELM_VERSION" ]]; then
  log "helm $HELM_VERSION: cached"
else
  step "go install helm $HELM_VERSION"
  # Without -X helm reports only "v3.21" and this check would never match.
  GOBIN="$BIN" CGO_ENABLED=0 go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  done_step
fi
