#!/usr/bin/env bash
# Installs everything `make demo` and `make test` need, idempotently: Debian packages, and
# Go-built tools (helm, load generators) cached outside the repo. A warm run takes a second.
#   scripts/deps.sh            everything
#   scripts/deps.sh --host     only what the process-level tests need
#   scripts/deps.sh --bench    also oha, which only the sidecar benchmark uses (a 7 min build)
#   scripts/deps.sh --screenshot  also Chromium (Debian's), which only make screenshot uses
set -euo pipefail
source "$(dirname "$0")/../e2e/scripts/common.sh"

# prometheus: promtool checks the metrics and the chart's alert rules (make unit, make test).
# tmux: the terminal e2e/tests/plugin.rs drives `kubectl graceful status --watch` in.
# scripts/lint.sh runs shellcheck on the scripts and, through actionlint, on the workflows' steps.
host_pkgs=(wrk nginx-light haproxy jq curl procps iproute2 libssl-dev pkg-config prometheus tmux
  shellcheck)
# docker-registry and buildah: the cluster's registry, and the images built for it (make images,
# make release).
cluster_pkgs=(containerd runc containernetworking-plugins iptables conntrack openssl
  ethtool socat kmod util-linux mount gcc libc6-dev docker-registry buildah)
pkgs=("${host_pkgs[@]}")
[[ " $* " != *" --screenshot "* ]] || pkgs+=(chromium)
[[ " $* " == *" --host "* || " $* " == *" --bench "* ]] || pkgs+=("${cluster_pkgs[@]}")

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
# vegeta: every e2e load (rate-limited, keep-alive, h2c) with one result per request (1 min).
go_tool vegeta github.com/tsenart/vegeta/v12@v12.13.0
# actionlint: scripts/lint.sh checks .github/workflows with it.
go_tool actionlint github.com/rhysd/actionlint/cmd/actionlint@v1.7.12

[[ " $* " == *" --bench "* ]] || { log "deps ready (tools in $BIN)"; exit 0; }

# oha: the benchmark's fixed-rate latencies (p50, p99) with a JSON report. Built against the
# system OpenSSL (native-tls) instead of its default rustls with aws-lc: 3m53s instead of 6m07s
# on 2 idle cores, and our load is plain HTTP anyway. Version and features are the stamp.
OHA="1.16.0 native-tls"
if [[ ! -x $BIN/oha || $(cat "$BIN/oha.version" 2>/dev/null) != "$OHA" ]]; then
  step "cargo install oha $OHA"
  cargo install --quiet --locked --root "$CACHE/oha" --version "${OHA% *}" \
    --no-default-features --features "${OHA#* }" oha
  ln -sf "$CACHE/oha/bin/oha" "$BIN/oha"
  echo "$OHA" > "$BIN/oha.version"
  done_step
fi
log "deps ready (tools in $BIN)"
