#!/usr/bin/env bash
# Browser test of the operator dashboard, as a person would use it:
#
#   scripts/browser-test.sh
#
# 1. installs Debian's `chromium` if it is missing (apt-get; no browser is ever downloaded by npm
#    or playwright) and playwright-core from npm into tests/browser/node_modules (`npm ci`, from
#    the committed package-lock.json);
# 2. builds the API and starts it in embedded mode with a fresh temporary store on a free
#    127.0.0.1 port (BIND_ADDR=127.0.0.1:0, the address read from its banner), the demo pool
#    seeded, the built-in dev tokens, the job loops off (so the pool only changes when the test
#    changes it);
# 3. runs tests/browser/dashboard.mjs: checks that `GET /` names the dashboard; allocates (201,
#    then a 200 replay) before any page is open; loads /dashboard in headless Chromium, checks the
#    login hint (where the admin token comes from), types the admin token, checks that the
#    outcomes card shows the answers given before the page opened (server-side counters) and that
#    the figures shown equal /v1/admin/stats; allocates with curl and the track token, waits for
#    the live table to say it in words ("<caller> got <name>"), with no internal stream key shown,
#    the demo pool's registrations grouped and the bookkeeping events only on request; checks the
#    allocations chart, the prefix table, the outcomes and lag charts, an admin job (bulk delete of
#    the empty `stale` set); drains from the page (a cancelled confirmation drains nothing, a
#    confirmed one drains a prefix, then the whole pool: an allocation gets 503 and the outcomes
#    count it), resumes both from the page, and writes a screenshot to artifacts/dashboard.png;
# 4. stops the server on exit (trap), whatever happened. Exits non-zero on any failed check.
#
# Settings (environment): BROWSER_TEST_TIMEOUT (seconds for the browser run, default 180),
# START_TIMEOUT (seconds to wait for the API, default 120), CHROMIUM (default /usr/bin/chromium).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
BROWSER_TEST_TIMEOUT="${BROWSER_TEST_TIMEOUT:-180}"
START_TIMEOUT="${START_TIMEOUT:-120}"
ARTIFACTS="$ROOT/artifacts"

log() { echo "browser-test.sh: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# --- 1. chromium and playwright-core ------------------------------------------------------------
if [ ! -x "$CHROMIUM" ]; then
    log "installing Debian's chromium"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
[ -x "$CHROMIUM" ] || die "no browser at $CHROMIUM"
"$CHROMIUM" --version

if [ ! -d "$ROOT/tests/browser/node_modules/playwright-core" ]; then
    log "installing playwright-core (npm ci)"
    (cd "$ROOT/tests/browser" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
fi

# --- 2. the API ----------------------------------------------------------------------------------
(cd "$ROOT" && cargo build -q -p command-api)
BIN="$TARGET_DIR/debug/command-api"
[ -x "$BIN" ] || die "no binary at $BIN"

WORK="$(mktemp -d)"
mkdir -p "$ARTIFACTS"
SERVER_LOG="$ARTIFACTS/browser-test-server.log"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Loopback only: no proxy may see this traffic.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
env -u BROKER_API_TOKEN -u BROKER_ADMIN_TOKEN \
    BIND_ADDR=127.0.0.1:0 STORE=embedded EMBEDDED_PATH="$WORK/broker.db" \
    RUN_JOBS=false SEED_DEMO_POOL=true LOG_FORMAT=text RUST_LOG=warn \
    "$BIN" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

BASE_URL=""
for _ in $(seq 1 $((START_TIMEOUT * 10))); do
    BASE_URL="$(sed -n 's/^Sandbox Broker listening on \(http:\/\/[0-9.:]*\).*/\1/p' "$SERVER_LOG" | head -1)"
    [ -n "$BASE_URL" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$SERVER_LOG" >&2; die "the API exited during start-up"; }
    sleep 0.1
done
[ -n "$BASE_URL" ] || { cat "$SERVER_LOG" >&2; die "the API did not start within ${START_TIMEOUT}s"; }
TRACK_TOKEN="$(sed -n 's/^ *track: *//p' "$SERVER_LOG" | head -1)"
ADMIN_TOKEN="$(sed -n 's/^ *admin: *//p' "$SERVER_LOG" | head -1)"
[ -n "$TRACK_TOKEN" ] && [ -n "$ADMIN_TOKEN" ] || die "no dev tokens in the banner"
curl -sf --max-time 5 "$BASE_URL/healthz" >/dev/null || die "$BASE_URL/healthz does not answer"
log "API at $BASE_URL (log: $SERVER_LOG)"

# --- 3. the browser ------------------------------------------------------------------------------
status=0
BASE_URL="$BASE_URL" ADMIN_TOKEN="$ADMIN_TOKEN" TRACK_TOKEN="$TRACK_TOKEN" \
    SCREENSHOT="$ARTIFACTS/dashboard.png" CHROMIUM="$CHROMIUM" \
    timeout --kill-after=10 "$BROWSER_TEST_TIMEOUT" node "$ROOT/tests/browser/dashboard.mjs" || status=$?
[ "$status" -eq 124 ] && log "the browser run timed out after ${BROWSER_TEST_TIMEOUT}s"
exit "$status"
