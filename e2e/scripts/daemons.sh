# shellcheck shell=bash
# Starting and stopping the cluster's daemons by recorded pid. Sourced after common.sh.

# Starts a daemon in its own session (a Ctrl-C in the caller's terminal must not reach it),
# its output in $LOGS/NAME.log, its pid and program recorded for `down` and `status`.
daemon_start() { # name program args...
  local name=$1; shift
  mkdir -p "$LOGS" "$PIDS"
  setsid "$@" >> "$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$name.pid"
  echo "$1" > "$PIDS/$name.cmd"
}

# Exited but not yet reaped: our daemons outlive the script that started them, so their parent
# is init, which may reap late.
daemon_zombie() { [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]]; }

# SIGTERM, then SIGKILL after a timeout; only the pid we recorded, and only if it still runs
# the program we started.
daemon_stop() { # name [timeout-seconds]
  local name=$1 timeout=${2:-20} pid start=$SECONDS
  if pid=$(daemon_pid "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && ! daemon_zombie "$pid"; do
      if (( SECONDS - start >= timeout )); then
        log "   $name ($pid) ignored SIGTERM for ${timeout}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
        break
      fi
      sleep 0.2
    done
    log "   stopped $name ($pid)"
  fi
  rm -f "$PIDS/$name.pid" "$PIDS/$name.cmd"
}

# Waits like wait_for, but fails at once when the daemon exits, and shows the end of its log.
wait_daemon() { # name timeout description cmd...
  local name=$1 timeout=$2 what=$3 start=$SECONDS; shift 3
  until "$@" >/dev/null 2>&1; do
    if ! daemon_pid "$name" >/dev/null || (( SECONDS - start >= timeout )); then
      log "$name: $(daemon_pid "$name" >/dev/null && echo "no $what after ${timeout}s" || echo "exited")"
      tail -n 20 "$LOGS/$name.log" >&2 || true
      die "$name failed (log: $LOGS/$name.log)"
    fi
    sleep 0.5
  done
}

daemons_running() { # prints "name pid" per running daemon; fails when any is down
  local name pid ok=0
  for name in "${DAEMONS[@]}"; do
    if pid=$(daemon_pid "$name"); then echo "$name $pid"; else echo "$name down"; ok=1; fi
  done
  return $ok
}

apiserver_ready() { curl -fsS --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" \
  --key "$PKI/admin.key" "$APISERVER_URL/readyz" >/dev/null 2>&1; }

node_ready() {
  [[ $(kubectl_admin get node "$NODE_NAME" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

# kube-proxy (iptables mode) has put all four of its jumps into FORWARD.
kube_proxy_forward_rules() {
  local rules
  rules=$(iptables -w -S FORWARD)
  local chain
  for chain in KUBE-PROXY-FIREWALL KUBE-FORWARD KUBE-SERVICES KUBE-EXTERNAL-SERVICES; do
    [[ $rules == *"-j $chain"* ]] || return 1
  done
}

# Every daemon alive, the apiserver ready and the node Ready.
cluster_healthy() { daemons_running >/dev/null && apiserver_ready && node_ready; }
