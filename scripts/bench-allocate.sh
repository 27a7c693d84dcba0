#!/usr/bin/env bash
# Allocation throughput and read-side lag of a release build, driven from a second process (wrk),
# as a class of students starting a lab at once would drive it: a fresh caller per request.
#
#   bash scripts/bench-allocate.sh [--pool N] [--duration S] [--concurrency C[,C…]] [--binary PATH]
#
# Starts the API (embedded store, in-process projector and jobs, mock CSP with N accounts) on
# 127.0.0.1, waits until the sync registered the pool and the view shows it, then per level runs
# wrk for S seconds while sampling the projector lag from /metrics every 100 ms, and prints
# allocations/s, latency p50/p99, the statuses, lag p50/p99/max and how long after the level
# `/v1/admin/stats` counted every 201, and the API process's CPU time (user + system, from
# /proc, projector catch-up included) per 201: the figure that does not depend on how busy the
# rest of the machine is. Traffic stays on 127.0.0.1; every level is bounded in time.
# Needs wrk (Debian package `wrk`), curl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

pool=100000 duration=10 levels=10,100 binary=target/release/command-api port=18080
while [ $# -gt 0 ]; do
  case "$1" in
    --pool) pool=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --concurrency) levels=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v wrk >/dev/null || { echo "wrk is needed (Debian package wrk)" >&2; exit 2; }
[ -x "$binary" ] || cargo build --release -p command-api
admin=dev-admin-token-NOT-FOR-PRODUCTION
url=http://127.0.0.1:$port
work=$(mktemp -d)
api=
trap '[ -n "$api" ] && kill "$api" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

STORE=embedded EMBEDDED_PATH="$work/broker.db" BIND_ADDR=127.0.0.1:$port CSP_MOCK_ACCOUNTS=$pool \
  SEED_DEMO_POOL=false RATE_LIMIT_RPS=100000 RATE_LIMIT_BURST=100000 MAX_CONNECTIONS_PER_ADDRESS=0 \
  LOG_FORMAT=json RUST_LOG=warn \
  "$binary" > "$work/api.log" 2>&1 &
api=$!

stat() {
  curl -sf -H "Authorization: Bearer $admin" "$url/v1/admin/stats" |
    python3 -c "import sys,json;print(json.load(sys.stdin).get('$1',0))"
}
started=$(date +%s)
until [ "$(stat available 2>/dev/null || echo 0)" -ge "$pool" ]; do
  kill -0 "$api" 2>/dev/null || { echo "the API stopped:" >&2; tail -20 "$work/api.log" >&2; exit 1; }
  [ $(( $(date +%s) - started )) -lt 900 ] || { echo "pool not registered after 900 s" >&2; exit 1; }
  sleep 1
done
echo "pool of $pool registered and projected in $(( $(date +%s) - started )) s"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$api/stat"; }
tick_us=$(( 1000000 / $(getconf CLK_TCK) ))
echo "| concurrency | seconds | allocations/s | p50 ms | p99 ms | statuses | lag p50 ms | lag p99 ms | lag max ms | stats = 201s after | API CPU µs per 201 |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for c in ${levels//,/ }; do
  before=$(stat allocated)
  cpu_before=$(cpu_ticks)
  ( while :; do curl -sf "$url/metrics" | awk '/^broker_projector_lag_ms /{print $2}'; sleep 0.1; done ) > "$work/lag-$c" 2>/dev/null &
  sampler=$!
  WRK_RUN="$c-$RANDOM" wrk -t2 -c"$c" -d"${duration}s" --timeout 10s -s scripts/wrk/allocate.lua "$url" > "$work/wrk-$c" 2>&1 || true
  ended=$(date +%s%N)
  kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
  created=$(awk '/^created/{print $2}' "$work/wrk-$c")
  until [ "$(stat allocated)" -ge $(( before + created )) ]; do
    [ $(( ($(date +%s%N) - ended) / 1000000000 )) -lt 120 ] || break
    sleep 0.01
  done
  caught=$(( ($(date +%s%N) - ended) / 1000000 ))
  cpu_per=$(awk -v t=$(( $(cpu_ticks) - cpu_before )) -v us="$tick_us" -v n="$created" 'BEGIN{if(n>0)printf "%.0f", t*us/n; else print "-"}')
  rate=$(awk -v n="$created" -v d="$duration" 'BEGIN{printf "%.0f", n/d}')
  read -r p50 p99 < <(awk '/^p50_ms/{print $2, $4}' "$work/wrk-$c")
  statuses=$(sed -n 's/^statuses //p' "$work/wrk-$c")
  lags=$(sort -n "$work/lag-$c" | awk '{a[NR]=$1} END{if(NR==0){print "- - -"; exit} p=int(NR*0.5); if(p<1)p=1; q=int(NR*0.99); if(q<1)q=1; print a[p], a[q], a[NR]}')
  echo "| $c | $duration | $rate | $p50 | $p99 | $statuses | ${lags// / | } | ${caught} ms | $cpu_per |"
done
