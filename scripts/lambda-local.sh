#!/usr/bin/env bash
# The projector Lambda end to end under cargo-lambda's local emulator, against DynamoDB Local:
#
#   1. start DynamoDB Local (scripts/dynamodb-local.sh) on a free loopback port;
#   2. append realistic events through the command side (projector_bench --seed-only), which
#      creates the tables — the events table has a NEW_IMAGE stream;
#   3. capture the stream's records as the event Lambda would receive (`projector capture`);
#   4. check that the view is NOT yet the events' view (`projector verify` exits 1);
#   5. `cargo lambda watch` the projector-lambda binary and `cargo lambda invoke` it with the
#      captured event: no batchItemFailures;
#   6. `projector verify` exits 0 — the view converged, row for row and in stats;
#   7. the same event again (a redelivery): still no failures, still no drift;
#   8. a copy with one poison record: batchItemFailures names exactly that record.
#
# Bounded (each step has a timeout; DynamoDB Local and the emulator are stopped on exit, also on
# failure or Ctrl-C). Prints "lambda-local: OK" and exits 0 on success.
#
#   scripts/lambda-local.sh [--update-fixture]
#
# --update-fixture   also copy the captured event to tests/fixtures/dynamodb-local-stream-event.json
#                    (the fixture `captured_fixture_applies` in tests/tests/it/projector.rs replays).
#
# Settings (environment):
#   LAMBDA_LOCAL_SANDBOXES   sandboxes seeded (default 20 → 50 events)
#   LAMBDA_RELEASE_BUILD=1   first run the deployment build as well:
#                            cargo lambda build --release --x86-64 -p projector --bin projector-lambda
#                            (arm64: --arm64 instead of --x86-64; documented, not exercised here)
#
# Needs: Java 17 + npm (DynamoDB Local), python3, and cargo-lambda (`pip install cargo-lambda`,
# which brings ziglang for cross builds; installed here when missing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SANDBOXES="${LAMBDA_LOCAL_SANDBOXES:-20}"
UPDATE_FIXTURE=0
[ "${1:-}" = "--update-fixture" ] && UPDATE_FIXTURE=1
FIXTURE="$ROOT/tests/fixtures/dynamodb-local-stream-event.json"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lambda-local.XXXXXX")"
DDB_PID=""
WATCH_PID=""

LOG_NAME=lambda-local
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

cleanup() {
    # Stop only what this script started: the emulator's process group, then DynamoDB Local.
    if [ -n "$WATCH_PID" ] && kill -0 "$WATCH_PID" 2>/dev/null; then
        kill -TERM -- "-$WATCH_PID" 2>/dev/null || kill -TERM "$WATCH_PID" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$WATCH_PID" 2>/dev/null || break; sleep 0.25; done
        kill -KILL -- "-$WATCH_PID" 2>/dev/null || true
    fi
    if [ -n "$DDB_PID" ] && kill -0 "$DDB_PID" 2>/dev/null; then
        kill -TERM "$DDB_PID" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$DDB_PID" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$DDB_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v python3 >/dev/null || die "python3 is needed"
if ! cargo lambda --version >/dev/null 2>&1; then
    log "installing cargo-lambda from PyPI"
    pip install --quiet cargo-lambda || die "pip install cargo-lambda failed"
fi
log "$(cargo lambda --version)"

if [ "${LAMBDA_RELEASE_BUILD:-0}" = "1" ]; then
    log "deployment build: cargo lambda build --release --x86-64 -p projector --bin projector-lambda"
    timeout 1800 cargo lambda build --release --x86-64 -p projector --bin projector-lambda \
        >"$WORK/lambda-build.log" 2>&1 || die "cargo lambda build"
    log "built $(find target/lambda/projector-lambda -name bootstrap -printf '%p (%s bytes)')"
fi

log "building projector and projector_bench"
timeout 1800 cargo build -q -p projector --bin projector -p tests --features bench --bin projector_bench \
    >"$WORK/build.log" 2>&1 || die "cargo build"
PROJECTOR="$ROOT/target/debug/projector"
BENCH="$ROOT/target/debug/projector_bench"

DDB_PORT="$(free_port)"
log "starting DynamoDB Local on 127.0.0.1:$DDB_PORT"
bash scripts/dynamodb-local.sh start "$DDB_PORT" "$$" >"$WORK/dynamodb-local.log" 2>&1 &
DDB_PID=$!
wait_port "$DDB_PORT" 120 || die "DynamoDB Local did not start within 120 s"

export STORE=dynamodb
export TABLE_PREFIX="lambdalocal$(date +%s)$RANDOM"
export DDB_ENDPOINT_URL="http://127.0.0.1:$DDB_PORT"
export AWS_REGION=us-east-1
export STATS_SHARDS=4

log "seeding $SANDBOXES sandboxes into $TABLE_PREFIX-*"
timeout 600 "$BENCH" --seed-only --sandboxes "$SANDBOXES" >"$WORK/seed.log" 2>&1 || die "seeding events"

CAPTURED="$WORK/event.json"
timeout 120 "$PROJECTOR" capture --out "$CAPTURED" --max 10000 >"$WORK/capture.log" 2>&1 || die "capture"
RECORDS="$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["Records"]))' "$CAPTURED")"
log "captured $RECORDS stream records"
[ "$RECORDS" -gt 0 ] || die "the stream had no records"

set +e
timeout 300 "$PROJECTOR" verify >"$WORK/verify-before.log" 2>&1
before=$?
set -e
[ "$before" -eq 1 ] || die "verify before the Lambda ran should report drift (exit 1), got $before"
log "before invoke: verify reports drift, as expected (the view is empty)"

LAMBDA_PORT="$(free_port)"
log "starting cargo lambda watch on 127.0.0.1:$LAMBDA_PORT"
setsid timeout 1800 cargo lambda watch -p projector --bin projector-lambda --ignore-changes \
    --invoke-address 127.0.0.1 --invoke-port "$LAMBDA_PORT" \
    --env-var "TABLE_PREFIX=$TABLE_PREFIX,DDB_ENDPOINT_URL=$DDB_ENDPOINT_URL,AWS_REGION=$AWS_REGION,STATS_SHARDS=$STATS_SHARDS,RUST_LOG=info" \
    >"$WORK/watch.log" 2>&1 &
WATCH_PID=$!
wait_port "$LAMBDA_PORT" 600 || die "cargo lambda watch did not listen within 600 s"

invoke() {
    # The first invoke waits for the emulator to finish compiling the function; retry while it
    # is not ready, bounded.
    local data="$1" out="$2" start=$SECONDS
    while true; do
        if timeout 300 cargo lambda invoke projector-lambda --invoke-address 127.0.0.1 \
            --invoke-port "$LAMBDA_PORT" --data-file "$data" --output-format json >"$out" 2>"$out.err"; then
            return 0
        fi
        [ $((SECONDS - start)) -lt 600 ] || { cat "$out.err" >&2; return 1; }
        sleep 2
    done
}

failures() {
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(",".join(f.get("itemIdentifier") or "" for f in r.get("batchItemFailures", [])))' "$1"
}

invoke "$CAPTURED" "$WORK/response.json" || die "cargo lambda invoke"
log "response: $(cat "$WORK/response.json")"
[ -z "$(failures "$WORK/response.json")" ] || die "batchItemFailures in the response"

timeout 300 "$PROJECTOR" verify >"$WORK/verify-after.log" 2>&1 || die "verify after the Lambda run found drift"
log "after invoke: $(tail -n 1 "$WORK/verify-after.log")"
grep -Eq "; ([1-9][0-9]*) live rows, \1 expected; 0 difference" "$WORK/verify-after.log" \
    || die "verify did not see the projected rows"

invoke "$CAPTURED" "$WORK/response-again.json" || die "second invoke"
[ -z "$(failures "$WORK/response-again.json")" ] || die "batchItemFailures on redelivery"
timeout 300 "$PROJECTOR" verify >"$WORK/verify-again.log" 2>&1 || die "verify after the redelivery found drift"
log "redelivery: no failures, no drift"

POISON="$WORK/poison.json"
POISON_SEQ="$(python3 - "$CAPTURED" "$POISON" <<'PY'
import json, sys
event = json.load(open(sys.argv[1]))
record = event["Records"][min(2, len(event["Records"]) - 1)]
record["dynamodb"]["NewImage"]["payload"] = {"S": "{not json"}
record["dynamodb"]["NewImage"]["version"] = {"BOOL": True}
json.dump(event, open(sys.argv[2], "w"))
print(record["dynamodb"]["SequenceNumber"])
PY
)"
invoke "$POISON" "$WORK/response-poison.json" || die "poison invoke"
got="$(failures "$WORK/response-poison.json")"
[ "$got" = "$POISON_SEQ" ] || die "expected batchItemFailures [$POISON_SEQ], got [$got]"
log "poison record: reported as batchItemFailures [$got], function still serving"

if [ "$UPDATE_FIXTURE" = "1" ]; then
    mkdir -p "$(dirname "$FIXTURE")"
    cp "$CAPTURED" "$FIXTURE"
    log "fixture updated: ${FIXTURE#"$ROOT"/}"
fi
log "OK ($RECORDS records projected by projector-lambda under cargo lambda watch)"
