#!/usr/bin/env bash
# OpenAPI contract fuzzing of the command API with schemathesis (PyPI), as CI runs it:
#
#   scripts/schemathesis.sh
#
# 1. installs a pinned schemathesis into its own venv (.venv/schemathesis; never the global
#    interpreter), reusing the venv when it already holds that version;
# 2. builds the API (`cargo build -p command-api`, debug) and starts it in embedded mode on a free
#    127.0.0.1 port (BIND_ADDR=127.0.0.1:0, the port read from its banner) with a fresh temporary
#    store, explicit per-run tokens and the demo pool seeded; waits for /healthz (bounded);
# 3. runs schemathesis against /v1/openapi.json twice — with the track token (+ an
#    X-Instruqt-Sandbox-ID, so track endpoints get past the caller check) and with the admin
#    token — over every operation, in every phase schemathesis has:
#      examples   the document's own examples (each parameter's `example`), which must be served;
#      coverage   boundary and near-boundary values of every constraint (lengths, patterns,
#                 enums, ranges, missing and duplicated parameters), valid and invalid;
#      fuzzing    generated requests, valid and invalid;
#      stateful   chains of calls along the links schemathesis infers from the responses (an
#                 allocation's `sandbox_id` into the per-sandbox routes, a page's `cursor` into
#                 the next request);
#    with positive and negative data (`--mode all`) and every check schemathesis has
#    (`--checks all`): among them no 5xx, documented status codes, content types, headers and
#    bodies, schema-violating requests rejected, schema-valid requests accepted, required headers
#    and authentication enforced, undocumented methods refused. The two rules OpenAPI cannot
#    express (`until` not before `since`; a cursor is valid only where the server issued it) are
#    taught to schemathesis by scripts/schemathesis_hooks.py. Cases per operation and phase are
#    bounded, and so is each run's wall time;
# 4. restarts the API on a fresh store with every event-write flag on (WRITE_EVENTS_RESERVATIONS,
#    WRITE_EVENTS_WAITING_LINE, WRITE_EVENTS_HEARTBEATS, WRITE_EVENTS_USAGE), so reservations,
#    waiting-line tickets, heartbeat policies and refusal summaries are written instead of stopping
#    at the flag check, and runs both tokens again over the operations those flags open
#    (SCHEMATHESIS_FLAGS_ON_PATHS) with fewer cases (SCHEMATHESIS_FLAGS_ON_MAX_EXAMPLES), every
#    phase and check as above (SCHEMATHESIS_PASSES picks the passes);
# 5. stops the server (trap on EXIT) and exits non-zero if any run found a failure.
#
# With the defaults each flags-off run generates about 6,300 cases; on two shared cores those
# runs take 2 to 3.5 minutes after the build (docs/api.md, "Contract fuzzing", has the measured
# figures), and the flags-on pass adds about 2,800 cases and 1.5 to 2 minutes.
#
# Traffic goes to 127.0.0.1 only (proxy variables are dropped for the runs); pip reaches PyPI only.
# Reports (JUnit XML), each run's output and the server log are kept in target/schemathesis/.
#
# Settings (environment):
#   SCHEMATHESIS_VERSION       pinned version                       (default: 4.32.5)
#   SCHEMATHESIS_VENV          venv directory                       (default: <repo>/.venv/schemathesis)
#   SCHEMATHESIS_PHASES        comma-separated phases               (default: all four above)
#   SCHEMATHESIS_MAX_EXAMPLES  generated cases per operation, phase (default: 200)
#   SCHEMATHESIS_SEED          hypothesis seed (fixed: reproducible) (default: 1729)
#   SCHEMATHESIS_CHECKS        comma-separated checks               (default: all)
#   SCHEMATHESIS_RUN_TIMEOUT   wall-time bound per run, seconds     (default: 300)
#   SCHEMATHESIS_START_TIMEOUT wait for /healthz, seconds            (default: 120)
#   SCHEMATHESIS_PASSES        passes to run: flags-off, flags-on  (default: flags-off,flags-on)
#   SCHEMATHESIS_FLAGS_ON_MAX_EXAMPLES  its cases per operation, phase (default: 60)
#   SCHEMATHESIS_FLAGS_ON_PATHS         its operations, a path regex  (default: the flagged routes)
#   PYTHON                     interpreter that creates the venv    (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"
VENV="${SCHEMATHESIS_VENV:-$ROOT/.venv/schemathesis}"
PHASES="${SCHEMATHESIS_PHASES:-examples,coverage,fuzzing,stateful}"
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-200}"
SEED="${SCHEMATHESIS_SEED:-1729}"
RUN_TIMEOUT="${SCHEMATHESIS_RUN_TIMEOUT:-300}"
START_TIMEOUT="${SCHEMATHESIS_START_TIMEOUT:-120}"
PYTHON="${PYTHON:-python3}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$TARGET_DIR/schemathesis"
CHECKS="${SCHEMATHESIS_CHECKS:-all}"
PASSES=",${SCHEMATHESIS_PASSES:-flags-off,flags-on},"
FLAGS_ON_MAX_EXAMPLES="${SCHEMATHESIS_FLAGS_ON_MAX_EXAMPLES:-60}"
# The routes the write flags change: allocation (waiting line, refusal summaries), tickets,
# heartbeats, reservations, waiting lines, capacity and usage; the per-sandbox routes stay in so
# that stateful chains from an allocation reach them.
FLAGS_ON_PATHS="${SCHEMATHESIS_FLAGS_ON_PATHS:-^/v1/(allocate|tickets/|sandboxes/|capacity|admin/(reservations|waiting-lines|usage))}"

log() { echo "schemathesis.sh: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# --- 1. schemathesis in its own venv -------------------------------------------------------------
ST="$VENV/bin/schemathesis"
if ! "$ST" --version 2>/dev/null | grep -qx "schemathesis, version $VERSION"; then
    log "installing schemathesis==$VERSION into $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || die "cannot create a venv with $PYTHON (Debian: apt-get install python3-venv)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$VERSION"
fi
"$ST" --version

# --- 2. build and start the API ------------------------------------------------------------------
(cd "$ROOT" && cargo build -q -p command-api)
BIN="$TARGET_DIR/debug/command-api"
[ -x "$BIN" ] || die "no binary at $BIN"

WORK="$(mktemp -d)"
mkdir -p "$OUT"
SERVER_PID=""
cleanup() {
    stop_api
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

random_token() { "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))'; }
TRACK_TOKEN="fuzz-track-$(random_token)"
ADMIN_TOKEN="fuzz-admin-$(random_token)"

# Starts the API on a fresh store under $WORK/NAME, with extra settings (NAME=VALUE ...) on top
# of the common ones; sets SERVER_PID, SERVER_LOG and BASE. The rate limit is raised so that
# results do not depend on how fast this machine is (429 is documented on every rate-limited route
# all the same).
start_api() {
    local name="$1"
    shift
    mkdir -p "$WORK/$name"
    SERVER_LOG="$OUT/server-$name.log"
    env STORE=embedded CSP_MODE=mock EMBEDDED_PATH="$WORK/$name/broker.db" BIND_ADDR=127.0.0.1:0 \
        BROKER_API_TOKEN="$TRACK_TOKEN" BROKER_ADMIN_TOKEN="$ADMIN_TOKEN" \
        SEED_DEMO_POOL=true RATE_LIMIT_RPS=100000 RATE_LIMIT_BURST=100000 UNAUTH_RATE_LIMIT_RPS=100000 UNAUTH_RATE_LIMIT_BURST=100000 LOG_FORMAT=json \
        "$@" "$BIN" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!

    local port="" deadline
    deadline=$(($(date +%s) + START_TIMEOUT))
    until [ -n "$port" ] && "$VENV/bin/python" - "http://127.0.0.1:$port/healthz" <<'PY' 2>/dev/null
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
    do
        kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 40 "$SERVER_LOG" >&2; die "the API exited during start-up"; }
        [ "$(date +%s)" -lt "$deadline" ] || { tail -n 40 "$SERVER_LOG" >&2; die "no healthy API after ${START_TIMEOUT}s"; }
        [ -n "$port" ] || port="$(sed -n 's#^Sandbox Broker listening on http://127\.0\.0\.1:\([0-9][0-9]*\)$#\1#p' "$SERVER_LOG" | head -n 1)"
        sleep 0.5
    done
    BASE="http://127.0.0.1:$port"
    log "API '$name' up at $BASE (pid $SERVER_PID, store $WORK/$name/broker.db)"
}

# Stops the API started last (bounded), so the next one starts on its own store.
stop_api() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}


# --- 3. the two runs -----------------------------------------------------------------------------
# One run: NAME, then extra headers and options. Exits with schemathesis' status (124 when the
# time bound hit). MAX_EXAMPLES is read at the call, so a pass may lower it.
fuzz() {
    local name="$1"
    shift
    local started rc cases
    started=$(date +%s)
    log "run '$name': phases $PHASES, max $MAX_EXAMPLES examples per operation, seed $SEED, at most ${RUN_TIMEOUT}s"
    set +e
    (cd "$WORK" && env -u HTTP_PROXY -u http_proxy -u HTTPS_PROXY -u https_proxy -u ALL_PROXY -u all_proxy \
        PYTHONPATH="$ROOT/scripts" SCHEMATHESIS_HOOKS=schemathesis_hooks \
        NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost \
        timeout --kill-after=10 "$RUN_TIMEOUT" \
        "$ST" run "$BASE/v1/openapi.json" --url "$BASE" \
        --phases "$PHASES" --checks "$CHECKS" --mode all \
        --max-examples "$MAX_EXAMPLES" --seed "$SEED" \
        --generation-database none --continue-on-failure \
        --workers 1 --request-timeout 35 --no-color \
        --report junit --report-junit-path "$OUT/$name.junit.xml" \
        "$@") 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -ne 124 ] || log "run '$name' hit the ${RUN_TIMEOUT}s bound"
    # The summary line schemathesis prints, e.g. "3912 generated, 3912 passed".
    cases="$(grep -E '^ +[0-9]+ generated' "$OUT/$name.log" | tail -n 1 | sed 's/^ *//')"
    SUMMARY+=("run '$name': ${cases:-no case count}; exit $rc after $(($(date +%s) - started))s")
    log "${SUMMARY[-1]}"
    return "$rc"
}

# Each run covers every operation: the other token's endpoints must answer a documented 403 (so
# schemathesis' "authentication failed: N operations returned only 401/403" warning is expected).
status=0
SUMMARY=()
if [[ "$PASSES" == *,flags-off,* ]]; then
    start_api flags-off
    fuzz track -H "Authorization: Bearer $TRACK_TOKEN" -H "X-Instruqt-Sandbox-ID: schemathesis-student" || status=1
    # The server-sent-events stream never ends by design (heartbeats keep the read alive), so with
    # the admin token it is left out: a request/response fuzzer would only wait on it until the
    # time bound. With the track token it answers 403 at once and stays in.
    fuzz admin -H "Authorization: Bearer $ADMIN_TOKEN" --exclude-path /v1/admin/events/stream || status=1
fi

# --- 4. again with the event-write flags on ------------------------------------------------------
if [[ "$PASSES" == *,flags-on,* ]]; then
    stop_api
    start_api flags-on WRITE_EVENTS_RESERVATIONS=true WRITE_EVENTS_WAITING_LINE=true \
        WRITE_EVENTS_HEARTBEATS=true WRITE_EVENTS_USAGE=true HEARTBEAT_TRACKS=schemathesis-track=60/1800
    MAX_EXAMPLES="$FLAGS_ON_MAX_EXAMPLES"
    # `DELETE /v1/admin/reservations/{id}` cancels: the reservation stays readable, in state
    # `cancelled`, as its 200 answer documents (an audit needs it), so the check that a deleted
    # resource answers 404 (`use_after_free`) does not apply to this API. It can only fire here,
    # where reservations can be created.
    fuzz track-flags-on -H "Authorization: Bearer $TRACK_TOKEN" -H "X-Instruqt-Sandbox-ID: schemathesis-student" \
        -H "X-Instruqt-Track-ID: schemathesis-track" --include-path-regex "$FLAGS_ON_PATHS" \
        --exclude-checks use_after_free || status=1
    fuzz admin-flags-on -H "Authorization: Bearer $ADMIN_TOKEN" --include-path-regex "$FLAGS_ON_PATHS" \
        --exclude-checks use_after_free || status=1
fi

# --- 5. verdict ----------------------------------------------------------------------------------
for server_log in "$OUT"/server-*.log; do
    if grep -q '"status":5[0-9][0-9]' "$server_log"; then
        log "5xx responses in $server_log:"
        grep '"status":5[0-9][0-9]' "$server_log" | tail -n 20 >&2
    fi
done
if [ "$status" -ne 0 ]; then
    printf '%s\n' "${SUMMARY[@]}" >&2
    log "FAILED (reports and server log in $OUT)"
    exit 1
fi
printf '%s\n' "${SUMMARY[@]}" >&2
log "passed: every run clean"
