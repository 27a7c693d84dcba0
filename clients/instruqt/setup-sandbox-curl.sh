#!/usr/bin/env bash
# Instruqt track setup with curl only (no brokerctl on the image): the same behaviour as
# setup-sandbox.sh — 409 (pool empty), 429 and 5xx are retried with jittered waits that honour
# Retry-After until BROKER_DEADLINE_SECONDS (default 600), the participant's live allocation is
# replayed on a re-run (the idempotency key is kept in ${BROKER_LEASE_FILE}, mode 0600, default
# `lease` next to the sandbox file, with the lease token), and the details are written atomically
# to ${BROKER_SANDBOX_FILE} (default /root/.sandbox/sandbox.env). Exit codes as brokerctl's
# (0, 2, 3, 4, 5, 7, 8): a BROKER_NAME_PREFIX that no sandbox has stops at once with 8.
set -euo pipefail

url="${BROKER_URL:?set BROKER_URL}"
token="${BROKER_TRACK_TOKEN:?set BROKER_TRACK_TOKEN}"
caller="${BROKER_CALLER:-${INSTRUQT_PARTICIPANT_ID:-}}"
[ -n "$caller" ] || { echo "setup-sandbox: set BROKER_CALLER or INSTRUQT_PARTICIPANT_ID" >&2; exit 2; }
file="${BROKER_SANDBOX_FILE:-/root/.sandbox/sandbox.env}"
deadline=$(( $(date +%s) + ${BROKER_DEADLINE_SECONDS:-600} ))
mkdir -p "$(dirname "$file")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

headers=(-H "Authorization: Bearer $token" -H "X-Instruqt-Sandbox-ID: $caller")
[ -z "${BROKER_NAME_PREFIX:-}" ] || headers+=(-H "X-Sandbox-Name-Prefix: $BROKER_NAME_PREFIX")
track="${BROKER_TRACK_ID:-${INSTRUQT_TRACK_SLUG:-}}"
[ -z "$track" ] || headers+=(-H "X-Instruqt-Track-ID: $track")

# The lease file (0600): a 128-bit idempotency key generated once, before the first request, so a
# re-run after a lost answer replays with it; the lease token of the answer is added after it.
lease="${BROKER_LEASE_FILE:-$(dirname "$file")/lease}"
key=$(sed -n 's/^idempotency_key=//p' "$lease" 2>/dev/null || true)
if [ -z "$key" ]; then
  key=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  (umask 077 && printf 'idempotency_key=%s\n' "$key" > "$lease.tmp" && mv "$lease.tmp" "$lease")
fi
headers+=(-H "Idempotency-Key: $key")
lease_token=$(sed -n 's/^lease_token=//p' "$lease" 2>/dev/null || true)
[ -z "$lease_token" ] || headers+=(-H "X-Lease-Token: $lease_token")

# Per-track credentials with a caller secret: X-Caller-Signature `t=<now>,v1=<hex HMAC-SHA256 of
# "t\nMETHOD\npath\ncaller">`, made fresh for every attempt (the broker accepts it for
# CALLER_SIGNATURE_WINDOW_SEC, default 300 s).
base_path=$(printf %s "$url" | sed -E 's#^[A-Za-z]+://[^/]*##; s#/+$##')
signature_header() {
  sig=()
  [ -n "${BROKER_CALLER_SECRET:-}" ] || return 0
  t=$(date +%s)
  mac=$(printf '%s\n%s\n%s\n%s' "$t" "$1" "$base_path$2" "$caller" \
    | openssl dgst -sha256 -hmac "$BROKER_CALLER_SECRET" | sed 's/^.*= //')
  sig=(-H "X-Caller-Signature: t=$t,v1=$mac")
}

# One field of the broker's flat JSON answer (string, number or null).
field() {
  sed -n "s/.*\"$1\":\\(\"\\([^\"]*\\)\"\\|\\([-0-9.]*\\)\\|null\\).*/\\2\\3/p" "$work/body"
}

attempt=0
while :; do
  attempt=$((attempt + 1))
  signature_header POST "/v1/allocate"
  status=$(curl -sS -o "$work/body" -D "$work/headers" -w '%{http_code}' --max-time 30 \
    -X POST "${headers[@]}" ${sig[@]+"${sig[@]}"} "$url/v1/allocate" 2>"$work/curl-error" || true)
  case "$status" in
    200|201)
      {
        for name in sandbox_id name external_id allocated_at expires_at sfdc_account_id; do
          var=$(printf %s "${name#sandbox_}" | tr '[:lower:]' '[:upper:]')
          printf "export SANDBOX_%s='%s'\n" "$var" "$(field "$name")"
        done
      } > "$file.tmp"
      mv "$file.tmp" "$file"
      (umask 077 && printf 'idempotency_key=%s\nlease_token=%s\nsandbox_id=%s\n' \
        "$key" "$(field lease_token)" "$(field sandbox_id)" > "$lease.tmp" && mv "$lease.tmp" "$lease")
      echo "setup-sandbox: sandbox details in $file" >&2
      exit 0 ;;
    409|429|500|502|503|504|000)
      code=$(sed -n 's/.*"code":"\([^"]*\)".*/\1/p' "$work/body" 2>/dev/null || true)
      if [ "$status" = 409 ] && [ "$code" != NO_SANDBOXES_AVAILABLE ] && [ "$code" != TRACK_ALLOCATION_LIMIT ]; then
        echo "setup-sandbox: refused: $(cat "$work/body")" >&2; exit 7
      fi
      retry_after=$(tr -d '\r' < "$work/headers" | sed -n 's/^[Rr]etry-[Aa]fter: *\([0-9]*\).*/\1/p' | head -n1)
      if [ -n "$retry_after" ]; then
        # Retry-After is a floor; up to a fifth more spreads a class of students out.
        wait_ms=$(( retry_after * 1000 + RANDOM % (retry_after * 200 + 100) ))
      else
        step=$(( attempt < 7 ? attempt : 7 ))
        cap=$(( 250 * (1 << step) )); [ "$cap" -le 15000 ] || cap=15000
        wait_ms=$(( cap / 2 + RANDOM % (cap / 2 + 1) ))
      fi
      now=$(date +%s)
      if [ $(( now * 1000 + wait_ms )) -ge $(( deadline * 1000 )) ]; then
        case "$status" in
          409|429) echo "setup-sandbox: no sandbox before the deadline ($status $code)" >&2; exit 4 ;;
          *) echo "setup-sandbox: broker failing or unreachable ($status)" >&2; exit 5 ;;
        esac
      fi
      echo "setup-sandbox: $status ${code:-$(cat "$work/curl-error")}; retrying in ${wait_ms}ms" >&2
      sleep "$(printf '%d.%03d' $((wait_ms / 1000)) $((wait_ms % 1000)))" ;;
    404)
      # UNKNOWN_PREFIX: no sandbox has a name with BROKER_NAME_PREFIX; waiting cannot help.
      echo "setup-sandbox: no sandbox matches: $(cat "$work/body")" >&2; exit 8 ;;
    401|403) echo "setup-sandbox: not authorised: $(cat "$work/body")" >&2; exit 3 ;;
    400|413) echo "setup-sandbox: bad input: $(cat "$work/body")" >&2; exit 2 ;;
    *) echo "setup-sandbox: unexpected $status: $(cat "$work/body")" >&2; exit 1 ;;
  esac
done
