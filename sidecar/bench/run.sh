#!/usr/bin/env bash
# make bench-sidecar: the same upstream (graceful-demo) reached directly, through
# graceful-sidecar, through nginx and through haproxy, side by side in one run on loopback.
# Full-speed req/s by wrk, p50/p99 at a fixed rate by oha, VmRSS of each proxy idle and under
# load from /proc. Rounds are interleaved and the table shows medians.
#   ROUNDS=7 DURATION=3 RATE=2000 CONNS=32 WORKERS=$(nproc) sidecar/bench/run.sh
# BASELINE=/path/to/an/older/graceful-sidecar adds that build as one more row of the same run,
# so a change is measured against what it replaces (sidecar/bench/baseline.sh builds one).
# Many short interleaved rounds and medians: a burst of noise from other work on the machine
# hits one round of one path, not the result.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${GRACEFUL_CACHE:-$HOME/.cache/graceful}
export PATH="$CACHE/bin:$PATH"
ROUNDS=${ROUNDS:-7}
DURATION=${DURATION:-3}     # seconds per measurement
RATE=${RATE:-2000}          # req/s for the latency measurement
CONNS=${CONNS:-32}          # client connections (keep-alive)
WORKERS=${WORKERS:-$(nproc)} # worker processes/threads of every proxy and of the app
RELEASE=${RELEASE:-${CARGO_TARGET_DIR:-$REPO/target}/x86_64-unknown-linux-gnu/release}
OUT=${OUT:-$REPO/target/bench/sidecar.md}

die() { echo "bench: $*" >&2; exit 1; }
for tool in wrk oha nginx haproxy jq ss; do
  command -v "$tool" >/dev/null || die "$tool not found: run scripts/deps.sh --bench (make bench-sidecar does)"
done
for bin in graceful-sidecar graceful-demo; do
  [[ -x $RELEASE/$bin ]] || die "$RELEASE/$bin missing: run make build-static"
done

TMP=$(mktemp -d /tmp/graceful-bench.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

# Free loopback ports below the ephemeral range, so no outgoing connection takes one meanwhile.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
}
APP=$(free_port); SIDECAR=$(free_port); ADMIN=$(free_port); NGINX=$(free_port); HAPROXY=$(free_port)
BASE=$(free_port); BASE_ADMIN=$(free_port)
[[ $(printf '%s\n' "$APP" "$SIDECAR" "$ADMIN" "$NGINX" "$HAPROXY" "$BASE" "$BASE_ADMIN" | sort -u | wc -l) == 7 ]] || die "port clash, run again"
[[ -z ${BASELINE:-} || -x $BASELINE ]] || die "BASELINE=$BASELINE is not an executable"

wait_port() { # port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  tail -n 5 "$TMP"/*.log "$TMP"/nginx/*.log >&2 2>/dev/null || true
  die "nothing listening on 127.0.0.1:$1"
}

"$RELEASE/graceful-demo" --listen "127.0.0.1:$APP" --workers "$WORKERS" 2>"$TMP/demo.log" &
PIDS+=($!)

"$RELEASE/graceful-sidecar" --listen "127.0.0.1:$SIDECAR" --admin "127.0.0.1:$ADMIN" \
  --upstream "127.0.0.1:$APP" --workers "$WORKERS" --log warn 2>"$TMP/sidecar.log" &
SIDECAR_PID=$!
PIDS+=("$SIDECAR_PID")
if [[ -n ${BASELINE:-} ]]; then
  "$BASELINE" --listen "127.0.0.1:$BASE" --admin "127.0.0.1:$BASE_ADMIN" \
    --upstream "127.0.0.1:$APP" --workers "$WORKERS" --log warn 2>"$TMP/baseline.log" &
  BASE_PID=$!
  PIDS+=("$BASE_PID")
fi

mkdir -p "$TMP/nginx"
cat > "$TMP/nginx/nginx.conf" <<CONF
worker_processes $WORKERS;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$APP; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$NGINX;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto http;
    }
  }
}
CONF
nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" &
NGINX_PID=$!
PIDS+=("$NGINX_PID")

cat > "$TMP/haproxy.cfg" <<CONF
global
  nbthread $WORKERS
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAPROXY
  default_backend app
backend app
  server app 127.0.0.1:$APP
CONF
haproxy -db -f "$TMP/haproxy.cfg" 2>"$TMP/haproxy.log" &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID")

for p in $APP $SIDECAR $ADMIN $NGINX $HAPROXY ${BASELINE:+$BASE}; do wait_port "$p"; done

# The processes whose memory counts for each proxy (nginx: master + workers).
proxy_pids() { # name
  case $1 in
    direct) echo "" ;;
    graceful-sidecar) echo "$SIDECAR_PID" ;;
    baseline-sidecar) echo "$BASE_PID" ;;
    nginx) echo "$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')" ;;
    haproxy) echo "$HAPROXY_PID $(pgrep -P "$HAPROXY_PID" | tr '\n' ' ')" ;;
  esac
}
rss_mib() { # pids... -> summed VmRSS in MiB
  local kb=0 pid
  for pid in $(printf '%s\n' "$@" | sort -u); do
    [[ -r /proc/$pid/status ]] || continue
    kb=$((kb + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")))
  done
  awk -v kb="$kb" 'BEGIN { printf "%.1f", kb / 1024 }'
}
port_of() { case $1 in direct) echo "$APP" ;; graceful-sidecar) echo "$SIDECAR" ;; baseline-sidecar) echo "$BASE" ;; nginx) echo "$NGINX" ;; haproxy) echo "$HAPROXY" ;; esac; }

TARGETS=(direct graceful-sidecar ${BASELINE:+baseline-sidecar} nginx haproxy)
for t in "${TARGETS[@]}"; do
  curl -sf "http://127.0.0.1:$(port_of "$t")/" >/dev/null || die "$t does not answer"
  read -ra pids <<< "$(proxy_pids "$t")"
  [[ $t == direct ]] || printf '%s\n' "$(rss_mib "${pids[@]}")" > "$TMP/$t.idle"
done

echo "bench: rounds=$ROUNDS duration=${DURATION}s rate=$RATE conns=$CONNS workers=$WORKERS" >&2
for round in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    url="http://127.0.0.1:$(port_of "$t")/"
    read -ra pids <<< "$(proxy_pids "$t")"
    # Full speed, with an RSS sample in the middle of the run.
    wrk -t1 -c"$CONNS" -d"${DURATION}s" "$url" > "$TMP/wrk.txt" &
    wrk_pid=$!
    sleep "$(awk -v d="$DURATION" 'BEGIN { print d * 0.6 }')"
    if [[ $t != direct ]]; then rss_mib "${pids[@]}" >> "$TMP/$t.load"; echo >> "$TMP/$t.load"; fi
    wait "$wrk_pid"
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$TMP/wrk.txt")
    errs=$(awk '/Non-2xx|Socket errors/' "$TMP/wrk.txt")
    [[ -z $errs ]] || die "$t: wrk saw errors: $errs"
    echo "$rps" >> "$TMP/$t.rps"
    # Fixed rate: latency percentiles.
    oha -z "${DURATION}s" -q "$RATE" -c 16 --no-tui --output-format json "$url" > "$TMP/oha.json"
    ok=$(jq -r '.summary.successRate' "$TMP/oha.json")
    [[ $ok == 1 || $ok == 1.0 ]] || die "$t: oha success rate $ok"
    jq -r '.latencyPercentiles.p50 * 1000' "$TMP/oha.json" >> "$TMP/$t.p50"
    jq -r '.latencyPercentiles.p99 * 1000' "$TMP/oha.json" >> "$TMP/$t.p99"
    echo "bench: round $round $t: $rps req/s, p99 $(tail -1 "$TMP/$t.p99") ms" >&2
  done
done

median() { sed '/^$/d' "$1" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

direct_p99=$(median "$TMP/direct.p99")
{
  echo "| path | req/s (wrk, full speed) | p50 ms @ $RATE req/s | p99 ms @ $RATE req/s | p99 added vs direct | RSS idle MiB | RSS under load MiB |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for t in "${TARGETS[@]}"; do
    p99=$(median "$TMP/$t.p99")
    if [[ $t == direct ]]; then idle="-"; load="-"; added="-"; else
      idle=$(cat "$TMP/$t.idle"); load=$(sort -g "$TMP/$t.load" | sed '/^$/d' | tail -1)
      added=$(awk -v a="$p99" -v b="$direct_p99" 'BEGIN { printf "%+.3f ms", a - b }')
    fi
    printf '| %s | %.0f | %.3f | %.3f | %s | %s | %s |\n' "$t" "$(median "$TMP/$t.rps")" \
      "$(median "$TMP/$t.p50")" "$p99" "$added" "$idle" "$load"
  done
  echo
  [[ -z ${BASELINE:-} ]] || echo "baseline-sidecar: $BASELINE${BASELINE_REV:+ (built from $BASELINE_REV)}."
  echo "Medians of $ROUNDS interleaved rounds; ${DURATION}s per measurement; $CONNS keep-alive connections for wrk, 16 for oha; $WORKERS worker(s) per proxy and for the app; loopback, $(nproc) cores; $(date -u +%Y-%m-%d)."
} | tee "$TMP/table.md"
mkdir -p "$(dirname "$OUT")"
cp "$TMP/table.md" "$OUT"
echo "bench: table saved to $OUT" >&2
