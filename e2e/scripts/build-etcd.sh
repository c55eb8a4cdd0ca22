#!/usr/bin/env bash
# Builds etcd $ETCD_VERSION (the wrapper module e2e/etcd) into the cache, once. A warm run only
# compares a stamp and returns in milliseconds.
# Why not Debian's etcd-server (3.4): Kubernetes 1.33 serves a LIST by label selector from its
# watch cache, consistently, only when etcd answers progress requests (3.5.13 and later);
# against 3.4 every such LIST reads the whole namespace from etcd, which no current cluster
# does and which made the scale figures measure etcd 3.4 (docs/scale.md).
set -euo pipefail
source "$(dirname "$0")/common.sh"

etcd_src="$REPO/e2e/etcd"
stamp=$(wrapper_module_stamp "$etcd_src")
etcd_bin="$BIN/etcd"

if [[ -x $etcd_bin && $(cat "$BIN/etcd.stamp" 2>/dev/null) == "$stamp" ]]; then
  log "etcd $ETCD_VERSION: cached ($etcd_bin)"
else
  step "build etcd $ETCD_VERSION from the Go module (cold: about 2 min on 2 cores)"
  mkdir -p "$BIN"
  (cd "$etcd_src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$etcd_bin.tmp" .)
  got=$("$etcd_bin.tmp" --version | sed -n 's/^etcd Version: //p')
  [[ v$got == "$ETCD_VERSION" ]] || die "built etcd says $got, want $ETCD_VERSION (e2e/etcd/go.mod)"
  mv "$etcd_bin.tmp" "$etcd_bin"
  echo "$stamp" > "$BIN/etcd.stamp"
  done_step
fi
