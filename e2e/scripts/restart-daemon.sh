#!/usr/bin/env bash
# Restarts one daemon of the e2e cluster as an upgrade or a crash would: SIGTERM (SIGKILL after
# 20 s), then the same command line again, then waits until it serves. e2e/tests/faults.rs
# restarts the apiserver and etcd mid-rollout with it.
#   e2e/scripts/restart-daemon.sh kube-apiserver|etcd|kube-controller-manager|...
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
source "$here/daemons.sh"

[[ $# == 1 ]] || die "usage: $0 <daemon> (one of: ${DAEMONS[*]})"
name=$1
[[ " ${DAEMONS[*]} " == *" $name "* ]] || die "unknown daemon '$name' (one of: ${DAEMONS[*]})"
[[ $EUID == 0 ]] || die "restarting a cluster daemon needs root"
pid=$(daemon_pid "$name") || die "$name is not running (make cluster-up)"
# The command line it runs, read before it goes: the restart is the same process again.
mapfile -d '' argv < "/proc/$pid/cmdline"
started=$SECONDS
daemon_stop "$name"
daemon_start "$name" "${argv[@]}"
case $name in
  etcd)
    wait_daemon etcd 30 "health" curl -fsS --max-time 1 "$ETCD_CLIENT/health"
    # Its clients are back too: the apiserver's /readyz checks its etcd connection.
    if daemon_pid kube-apiserver >/dev/null; then wait_daemon kube-apiserver 60 "/readyz" apiserver_ready; fi
    ;;
  kube-apiserver) wait_daemon kube-apiserver 90 "/readyz" apiserver_ready ;;
  kubelet) wait_daemon kubelet 120 "node $NODE_NAME Ready" node_ready ;;
  *) sleep 1; daemon_pid "$name" >/dev/null || die "$name exited at once (log: $LOGS/$name.log)" ;;
esac
log "$name restarted in $((SECONDS - started))s (pid $(daemon_pid "$name"))"
