#!/usr/bin/env bash
# Installs everything `make demo` and `make test` need, idempotently: Debian packages, and
# Go-built tools (helm, load generators) cached outside the repo. A warm run takes a second.
#   scripts/deps.sh            everything
#   scripts/deps.sh --host     only what the process-level tests and the benchmark need
set -euo pipefail
source "$(dirname "$0")/../e2e/scripts/common.sh"

host_pkgs=(wrk nginx-light haproxy jq curl procps iproute2)
cluster_pkgs=(etcd-server containerd runc containernetworking-plugins iptables conntrack openssl
  ethtool socat kmod util-linux mount gcc libc6-dev)
pkgs=("${host_pkgs[@]}")
[[ ${1:-} == --host ]] || pkgs+=("${cluster_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  step "apt-get install ${missing[*]}"
  # No init system here: keep package scripts from starting nginx, haproxy, etcd or containerd
  # as services; our scripts start exactly what they need, each on its own address.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  done_step
fi

# Load generators written by others (design.md: counts never come from our own counters alone).
go_tool() { # name module@version
  local name=$1 mod=$2
  if [[ -x $BIN/$name && $(cat "$BIN/$name.version" 2>/dev/null) == "$mod" ]]; then return; fi
  step "go install $mod"
  mkdir -p "$BIN"
  GOBIN="$BIN" CGO_ENABLED=0 go install -trimpath "$mod"
  echo "$mod" > "$BIN/$name.version"
  done_step
}
go_tool hey github.com/rakyll/hey@v0.1.5

# oha: rate-limited load (-q) with a JSON report of status codes and errors.
OHA_VERSION=1.16.0
if [[ ! -x $BIN/oha || $(cat "$BIN/oha.version" 2>/dev/null) != "$OHA_VERSION" ]]; then
  step "cargo install oha $OHA_VERSION"
  cargo install --quiet --locked --root "$CACHE/oha" --version "$OHA_VERSION" oha
  ln -sf "$CACHE/oha/bin/oha" "$BIN/oha"
  echo "$OHA_VERSION" > "$BIN/oha.version"
  done_step
fi
log "deps ready (tools in $BIN)"
