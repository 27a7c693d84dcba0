#!/usr/bin/env bash
# Instruqt track cleanup with curl only: ends the allocation named in ${BROKER_SANDBOX_FILE}
# (default /root/.sandbox/sandbox.env). 200 (first or repeated release, or after expiry) is
# done; 404 means the broker has no such sandbox, so nothing was released (exit 6); 429 and 5xx are retried honouring Retry-After until BROKER_DEADLINE_SECONDS (default 300).
# No file means setup never allocated: nothing to do. Exit codes as brokerctl's.
set -euo pipefail

url="${BROKER_URL:?set BROKER_URL}"
token="${BROKER_TRACK_TOKEN:?set BROKER_TRACK_TOKEN}"
caller="${BROKER_CALLER:-${INSTRUQT_PARTICIPANT_ID:-}}"
file="${BROKER_SANDBOX_FILE:-/root/.sandbox/sandbox.env}"
if [ ! -f "$file" ]; then
  echo "cleanup-sandbox: no $file; nothing to release" >&2
  exit 0
fi
[ -n "$caller" ] || { echo "cleanup-sandbox: set BROKER_CALLER or INSTRUQT_PARTICIPANT_ID" >&2; exit 2; }
# shellcheck disable=SC1090
. "$file"
deadline=$(( $(date +%s) + ${BROKER_DEADLINE_SECONDS:-300} ))
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
headers=(-H "Authorization: Bearer $token" -H "X-Instruqt-Sandbox-ID: $caller")
# The lease token setup kept (0600) proves the allocation where the broker requires it.
lease="${BROKER_LEASE_FILE:-$(dirname "$file")/lease}"
lease_token=$(sed -n 's/^lease_token=//p' "$lease" 2>/dev/null || true)
[ -z "$lease_token" ] || headers+=(-H "X-Lease-Token: $lease_token")
id=$(printf %s "$SANDBOX_ID" | jq -sRr @uri 2>/dev/null || printf %s "$SANDBOX_ID")

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

attempt=0
while :; do
  attempt=$((attempt + 1))
  signature_header POST "/v1/sandboxes/$id/mark-for-deletion"
  status=$(curl -sS -o "$work/body" -D "$work/headers" -w '%{http_code}' --max-time 30 \
    -X POST "${headers[@]}" ${sig[@]+"${sig[@]}"} "$url/v1/sandboxes/$id/mark-for-deletion" 2>"$work/curl-error" || true)
  case "$status" in
    200) echo "cleanup-sandbox: released $SANDBOX_ID" >&2; exit 0 ;;
    404) echo "cleanup-sandbox: the broker has no sandbox $SANDBOX_ID; nothing was released: $(cat "$work/body")" >&2; exit 6 ;;
    429|500|502|503|504|000)
      retry_after=$(tr -d '\r' < "$work/headers" | sed -n 's/^[Rr]etry-[Aa]fter: *\([0-9]*\).*/\1/p' | head -n1)
      if [ -n "$retry_after" ]; then
        wait_ms=$(( retry_after * 1000 + RANDOM % (retry_after * 200 + 100) ))
      else
        step=$(( attempt < 7 ? attempt : 7 ))
        cap=$(( 250 * (1 << step) )); [ "$cap" -le 15000 ] || cap=15000
        wait_ms=$(( cap / 2 + RANDOM % (cap / 2 + 1) ))
      fi
      if [ $(( $(date +%s) * 1000 + wait_ms )) -ge $(( deadline * 1000 )) ]; then
        echo "cleanup-sandbox: broker failing or unreachable ($status)" >&2; exit 5
      fi
      echo "cleanup-sandbox: $status; retrying in ${wait_ms}ms" >&2
      sleep "$(printf '%d.%03d' $((wait_ms / 1000)) $((wait_ms % 1000)))" ;;
    401|403) echo "cleanup-sandbox: not authorised: $(cat "$work/body")" >&2; exit 3 ;;
    400) echo "cleanup-sandbox: bad input: $(cat "$work/body")" >&2; exit 2 ;;
    *) echo "cleanup-sandbox: unexpected $status: $(cat "$work/body")" >&2; exit 1 ;;
  esac
done
