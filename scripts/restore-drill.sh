#!/usr/bin/env bash
# The restore drill on DynamoDB Local, as CI runs it (docs/restore.md):
#
#   scripts/restore-drill.sh
#
#  1. starts DynamoDB Local on a free 127.0.0.1 port and writes a realistic log under table
#     prefix A: `jobs run sync` registers the mock CSP's accounts, then students allocate through
#     the API (a track quota and the per-caller cap in force), some release, some extend;
#  2. `broker-audit export` writes the whole log as NDJSON;
#  3. `broker-audit import` appends it under a NEW prefix B (tables created), as a restore into
#     new table names does; a second import with `--resume` must append nothing;
#  4. `projector rebuild --into B --in-place` builds B's view, `broker-audit verify` (B) must find
#     no drift, `broker-audit check` must find A and B consistent and equal, and the export of B
#     must be byte-for-byte the export of A;
#  5. rewire: an API started on B answers a student's replay with the sandbox the student held
#     under A, and serves a new student.
# Prints the figures (events, import time, transactions) and exits non-zero at the first
# failure, with the logs of what failed.
#
# Settings (environment): DRILL_SANDBOXES (30) accounts in the mock CSP; DRILL_STUDENTS (12)
# allocations, a third released and a sixth extended; DRILL_KEEP_EXPORT (unset) a file to copy
# the export of A to — how the logs under tests/fixtures/logs/ were written (docs/upgrades.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SANDBOXES="${DRILL_SANDBOXES:-30}"
STUDENTS="${DRILL_STUDENTS:-12}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/restore-drill.XXXXXX")"
DDB_PID=""
API_PID=""

LOG_NAME=restore-drill
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

cleanup() {
    stop_pid "$API_PID"
    stop_pid "$DDB_PID"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v python3 >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"

log "building command-api, projector, broker-audit and jobs (debug)"
timeout 1800 cargo build -q -p command-api -p projector -p jobs >"$WORK/build.log" 2>&1 || die "cargo build"
BIN="$TARGET_DIR/debug"
for b in command-api projector broker-audit jobs; do
    [ -x "$BIN/$b" ] || die "no binary at $BIN/$b"
done

DDB_PORT="$(free_port)"
log "starting DynamoDB Local on 127.0.0.1:$DDB_PORT"
bash scripts/dynamodb-local.sh start "$DDB_PORT" "$$" >"$WORK/dynamodb-local.log" 2>&1 &
DDB_PID=$!
wait_port "$DDB_PORT" 120 || die "DynamoDB Local did not start within 120 s"

export STORE=dynamodb
export DDB_ENDPOINT_URL="http://127.0.0.1:$DDB_PORT"
export AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local
export LOG_FORMAT=json
run_id="$(date +%s)$RANDOM"
PREFIX_A="drilla$run_id"
PREFIX_B="drillb$run_id"
TRACK_TOKEN="drill-track-$(random_token)"
ADMIN_TOKEN="drill-admin-$(random_token)"
TRACK=drill-track

# Starts the API on table prefix $1, logging to $2; sets API_PID and BASE.
start_api() {
    local prefix="$1" logfile="$2" port
    port="$(free_port)"
    env TABLE_PREFIX="$prefix" BIND_ADDR="127.0.0.1:$port" CSP_MODE=mock RUN_JOBS=false RUN_PROJECTOR=true \
        BROKER_API_TOKEN="$TRACK_TOKEN" BROKER_ADMIN_TOKEN="$ADMIN_TOKEN" SEED_DEMO_POOL=false \
        TRACK_QUOTAS="$TRACK=$STUDENTS" MAX_LAB_EXTENSION_HOURS=24 \
        "$BIN/command-api" >"$logfile" 2>&1 &
    API_PID=$!
    BASE="http://127.0.0.1:$port"
    local start=$SECONDS
    until curl -sf --noproxy '*' "$BASE/healthz" >/dev/null 2>&1; do
        kill -0 "$API_PID" 2>/dev/null || die "the API on $prefix exited during start-up"
        [ $((SECONDS - start)) -lt 180 ] || die "no healthy API on $prefix after 180 s"
        sleep 0.5
    done
}

# Prints `<status> <body>` of a track-token request: METHOD PATH CALLER [BODY].
track() {
    local method="$1" path="$2" caller="$3" body="${4:-}"
    local args=(-s --noproxy '*' -o "$WORK/reply.json" -w '%{http_code}' -X "$method"
        -H "Authorization: Bearer $TRACK_TOKEN" -H "X-Instruqt-Sandbox-ID: $caller"
        -H "X-Instruqt-Track-ID: $TRACK")
    [ -z "$body" ] || args+=(-H 'Content-Type: application/json' --data "$body")
    local code
    code="$(curl "${args[@]}" "$BASE$path")"
    echo "$code $(cat "$WORK/reply.json")"
}
json_field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2], ""))' "$1" "$2"; }

# Waits until the view of the API at $BASE shows $1 sandboxes with status $2.
wait_stat() {
    local want="$1" status="$2" start=$SECONDS got
    while true; do
        got="$(curl -s --noproxy '*' -H "Authorization: Bearer $ADMIN_TOKEN" "$BASE/v1/admin/stats" \
            | python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], -1))' "$status" 2>/dev/null || echo -1)"
        [ "$got" = "$want" ] && return 0
        [ $((SECONDS - start)) -lt 120 ] || die "the view shows $got $status sandboxes, not $want, after 120 s"
        sleep 0.5
    done
}

# --- 1. a log under prefix A ---------------------------------------------------------------------
log "registering $SANDBOXES sandboxes from the mock CSP under $PREFIX_A"
env TABLE_PREFIX="$PREFIX_A" CSP_MODE=mock CSP_MOCK_ACCOUNTS="$SANDBOXES" ENSURE_TABLES=true \
    timeout 300 "$BIN/jobs" run sync >"$WORK/sync.log" 2>&1 || die "jobs run sync"

start_api "$PREFIX_A" "$WORK/api-a.log"
wait_stat "$SANDBOXES" available
declare -a HELD
for n in $(seq 1 "$STUDENTS"); do
    read -r code body < <(track POST /v1/allocate "student-$n")
    [ "$code" = 201 ] || die "allocate for student-$n answered $code: $body"
    HELD[n]="$(json_field "$body" sandbox_id)"
done
released=0
extended=0
for n in $(seq 1 "$STUDENTS"); do
    if [ $((n % 3)) -eq 0 ]; then
        read -r code body < <(track POST "/v1/sandboxes/${HELD[n]}/mark-for-deletion" "student-$n")
        [ "$code" = 200 ] || die "mark for student-$n answered $code: $body"
        released=$((released + 1))
    elif [ $((n % 6)) -eq 1 ]; then
        read -r code body < <(track POST "/v1/sandboxes/${HELD[n]}/extend" "student-$n" '{"hours":2}')
        [ "$code" = 200 ] || die "extend for student-$n answered $code: $body"
        extended=$((extended + 1))
    fi
done
log "under $PREFIX_A: $STUDENTS allocations, $released released, $extended extended"
stop_pid "$API_PID"
API_PID=""

# --- 2. export ---------------------------------------------------------------------------------
TABLE_PREFIX="$PREFIX_A" timeout 300 "$BIN/broker-audit" export >"$WORK/a.ndjson" 2>"$WORK/export-a.log" \
    || die "export of $PREFIX_A"
EVENTS="$(wc -l <"$WORK/a.ndjson")"
log "exported $EVENTS events from $PREFIX_A"
[ "$EVENTS" -gt "$SANDBOXES" ] || die "the export holds only $EVENTS events"
if [ -n "${DRILL_KEEP_EXPORT:-}" ]; then
    cp "$WORK/a.ndjson" "$DRILL_KEEP_EXPORT"
    log "export kept in $DRILL_KEEP_EXPORT"
fi

# --- 3. import under a new prefix --------------------------------------------------------------
started=$(date +%s%N)
TABLE_PREFIX="$PREFIX_B" timeout 600 "$BIN/broker-audit" import --file "$WORK/a.ndjson" --json \
    >"$WORK/import.json" 2>"$WORK/import.log" || die "import into $PREFIX_B"
import_ms=$((($(date +%s%N) - started) / 1000000))
appended="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["appended"])' "$WORK/import.json")"
transactions="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["transactions"])' "$WORK/import.json")"
[ "$appended" = "$EVENTS" ] || die "import appended $appended of $EVENTS events"
log "imported $appended events into $PREFIX_B in $transactions transactions, $import_ms ms"

set +e
TABLE_PREFIX="$PREFIX_B" timeout 300 "$BIN/broker-audit" import --file "$WORK/a.ndjson" >/dev/null 2>"$WORK/import-refused.log"
refused=$?
set -e
[ "$refused" -eq 2 ] || die "an import into a non-empty store without --resume exited $refused, not 2"
TABLE_PREFIX="$PREFIX_B" timeout 600 "$BIN/broker-audit" import --resume --file "$WORK/a.ndjson" --json \
    >"$WORK/import-again.json" 2>"$WORK/import-again.log" || die "import --resume"
again="$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["appended"], r["already_present"])' "$WORK/import-again.json")"
[ "$again" = "0 $EVENTS" ] || die "the resumed import reported 'appended already_present' = '$again'"
log "a second import without --resume is refused; with --resume it appends nothing ($EVENTS already present)"

# --- 4. rebuild, verify, check, compare ----------------------------------------------------------
TABLE_PREFIX="$PREFIX_B" timeout 600 "$BIN/projector" rebuild --into "$PREFIX_B" --in-place >"$WORK/rebuild.log" 2>&1 \
    || die "rebuild of $PREFIX_B"
TABLE_PREFIX="$PREFIX_B" timeout 300 "$BIN/broker-audit" verify >"$WORK/verify.log" 2>&1 \
    || die "verify of $PREFIX_B found drift"
log "verify ($PREFIX_B): $(tail -n 1 "$WORK/verify.log")"
for p in "$PREFIX_A" "$PREFIX_B"; do
    TABLE_PREFIX="$p" timeout 300 "$BIN/broker-audit" check --json >"$WORK/check-$p.json" 2>"$WORK/check-$p.log" \
        || die "check of $p: $(cat "$WORK/check-$p.json")"
done
cmp -s "$WORK/check-$PREFIX_A.json" "$WORK/check-$PREFIX_B.json" \
    || die "the checks differ: $(cat "$WORK/check-$PREFIX_A.json") vs $(cat "$WORK/check-$PREFIX_B.json")"
log "check: $(cat "$WORK/check-$PREFIX_B.json")"
TABLE_PREFIX="$PREFIX_B" timeout 300 "$BIN/broker-audit" export >"$WORK/b.ndjson" 2>"$WORK/export-b.log" \
    || die "export of $PREFIX_B"
cmp -s "$WORK/a.ndjson" "$WORK/b.ndjson" || die "the export of $PREFIX_B differs from the export of $PREFIX_A"
log "the export of $PREFIX_B is byte-for-byte the export of $PREFIX_A"

# --- 5. rewire: serve from B ---------------------------------------------------------------------
start_api "$PREFIX_B" "$WORK/api-b.log"
wait_stat "$((STUDENTS - released))" allocated
read -r code body < <(track POST /v1/allocate "student-1")
[ "$code" = 200 ] || die "student-1's replay on $PREFIX_B answered $code: $body"
[ "$(json_field "$body" sandbox_id)" = "${HELD[1]}" ] || die "student-1 got $(json_field "$body" sandbox_id), held ${HELD[1]}"
read -r code body < <(track POST /v1/allocate "student-new")
[ "$code" = 201 ] || die "a new student on $PREFIX_B answered $code: $body"
log "served from $PREFIX_B: student-1's replay returns ${HELD[1]}, a new student gets $(json_field "$body" sandbox_id)"
log "OK ($EVENTS events restored into new tables, verified, checked, served)"
