#!/usr/bin/env bash
# Builds the static Traefik binary (wrapper module e2e/traefik) into the cache, once, and lays
# out the Gateway API standard-channel CRDs of the release Traefik is built against.
# A warm run only compares a stamp and a file and returns in milliseconds.
set -euo pipefail
source "$(dirname "$0")/common.sh"

traefik_src="$REPO/e2e/traefik"
traefik_bin="$BIN/traefik"
traefik_pkg=github.com/traefik/traefik/v3/cmd/traefik
# The wrapper's go.mod is the truth for what is built; common.sh names the same versions.
grep -q "github.com/traefik/traefik/v3 $TRAEFIK_VERSION\b" "$traefik_src/go.mod" \
  || die "e2e/traefik/go.mod does not require traefik $TRAEFIK_VERSION (common.sh)"
grep -q "sigs.k8s.io/gateway-api $GATEWAY_API_VERSION\b" "$traefik_src/go.mod" \
  || die "e2e/traefik/go.mod does not select gateway-api $GATEWAY_API_VERSION (common.sh)"

# Compiled without optimizations or inlining: 11m50s of CPU instead of 17m37s on this 2-core
# machine (a third less), for a proxy that carries a few hundred requests a second in the tests.
# What it does with them (routing, EndpointSlice handling, retries) is the same code.
gcflags="all=-N -l"
# The wrapper has no Go source of its own: go.mod names Traefik's command as a tool.
stamp=$({ echo "$TRAEFIK_VERSION $gcflags"; cat "$traefik_src/go.mod" "$traefik_src/go.sum"; } | sha256sum | cut -c1-16)
if [[ -x $traefik_bin && $(cat "$BIN/traefik.stamp" 2>/dev/null) == "$stamp" ]]; then
  log "traefik $TRAEFIK_VERSION: cached ($traefik_bin)"
else
  step "build traefik $TRAEFIK_VERSION from the Go module (cold: about 10 min on 2 cores)"
  mkdir -p "$BIN"
  # A main package of a dependency builds by its path from inside the module that requires it.
  (cd "$traefik_src" && CGO_ENABLED=0 go build -trimpath -gcflags="$gcflags" \
    -ldflags "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION" \
    -o "$traefik_bin.tmp" "$traefik_pkg")
  mv "$traefik_bin.tmp" "$traefik_bin"
  echo "$stamp" > "$BIN/traefik.stamp"
  done_step
fi

crd_dir="$CACHE/gateway-api-$GATEWAY_API_VERSION"
crd_file="$crd_dir/standard-install.yaml"
if [[ -s $crd_file ]]; then
  log "gateway-api $GATEWAY_API_VERSION standard CRDs: cached ($crd_file)"
else
  step "gateway-api $GATEWAY_API_VERSION standard CRDs from the module cache"
  # The module is a dependency of the wrapper: this is a no-op when the build fetched it.
  mod_dir=$(cd "$traefik_src" && go mod download -json "sigs.k8s.io/gateway-api" \
    | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [[ -d $mod_dir/config/crd/standard ]] || die "no config/crd/standard in gateway-api module ($mod_dir)"
  mkdir -p "$crd_dir"
  # Module cache files are read-only; the concatenation is a new, writable file.
  for f in "$mod_dir"/config/crd/standard/*.yaml; do
    echo "---"
    cat "$f"
  done > "$crd_file.tmp"
  mv "$crd_file.tmp" "$crd_file"
  done_step
fi
