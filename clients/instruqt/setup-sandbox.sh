#!/usr/bin/env bash
# Instruqt track setup: allocate this participant's sandbox with brokerctl and write its details
# to ${BROKER_SANDBOX_FILE} (default /root/.sandbox/sandbox.env) as `export SANDBOX_…=` lines the
# lab sources. Safe to re-run: the broker replays the participant's live allocation (same caller,
# same idempotency key, kept in ${BROKER_LEASE_FILE}), so a re-run gets the same sandbox and
# rewrites the same file.
#
# Environment: BROKER_URL, BROKER_TRACK_TOKEN (or BROKER_TOKEN_FILE), BROKER_CALLER (default:
# INSTRUQT_PARTICIPANT_ID), BROKER_NAME_PREFIX, BROKER_TRACK_ID (default: INSTRUQT_TRACK_SLUG),
# BROKER_DEADLINE (default 10m), BROKER_CALLER_SECRET for per-track credentials, BROKER_LEASE_FILE
# (default: `lease` next to the sandbox file), BROKER_WAIT (seconds to wait in the broker's line
# per attempt when the pool is empty, served first come first served; unset: plain retries).
# Exit codes are brokerctl's: 0 ok, 2 bad input, 3 auth, 4 no sandbox before the deadline,
# 5 broker failing or unreachable, 8 no sandbox has a name with BROKER_NAME_PREFIX (not retried).
set -euo pipefail

export BROKER_CALLER="${BROKER_CALLER:-${INSTRUQT_PARTICIPANT_ID:-}}"
export BROKER_TRACK_ID="${BROKER_TRACK_ID:-${INSTRUQT_TRACK_SLUG:-}}"
export BROKER_DEADLINE="${BROKER_DEADLINE:-10m}"
[ -n "$BROKER_TRACK_ID" ] || unset BROKER_TRACK_ID
if [ -z "$BROKER_CALLER" ]; then
  echo "setup-sandbox: set BROKER_CALLER or INSTRUQT_PARTICIPANT_ID" >&2
  exit 2
fi
file="${BROKER_SANDBOX_FILE:-/root/.sandbox/sandbox.env}"
mkdir -p "$(dirname "$file")"
# The lease file (0600, written by brokerctl) keeps a generated 128-bit idempotency key and the
# allocation's lease token: a re-run replays with the key, cleanup proves the lease with the token.
export BROKER_LEASE_FILE="${BROKER_LEASE_FILE:-$(dirname "$file")/lease}"

# brokerctl waits out 409 (pool empty), 429 and 5xx itself, honouring Retry-After, and writes the
# file atomically: the lab never reads a half-written one.
brokerctl allocate --format env --output "$file"

# Expose the details to later challenges when running under the Instruqt agent.
if command -v agent >/dev/null 2>&1; then
  # shellcheck disable=SC1090
  . "$file"
  agent variable set SANDBOX_ID "$SANDBOX_ID"
  agent variable set SANDBOX_NAME "$SANDBOX_NAME"
  agent variable set SANDBOX_EXTERNAL_ID "$SANDBOX_EXTERNAL_ID"
fi
echo "setup-sandbox: sandbox details in $file" >&2
