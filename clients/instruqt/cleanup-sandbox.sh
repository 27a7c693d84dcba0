#!/usr/bin/env bash
# Instruqt track cleanup: end this participant's allocation (the broker deletes the CSP account
# afterwards). Reads the sandbox id from the file setup-sandbox.sh wrote. Safe to re-run: a
# repeated release and an allocation the broker already expired count as done; no file means
# setup never allocated, so there is nothing to release. An id the broker does not know exits 6:
# nothing was released.
#
# Environment: as setup-sandbox.sh (BROKER_URL, BROKER_TRACK_TOKEN, BROKER_CALLER or
# INSTRUQT_PARTICIPANT_ID, BROKER_SANDBOX_FILE, BROKER_LEASE_FILE, BROKER_DEADLINE default 5m).
set -euo pipefail

export BROKER_CALLER="${BROKER_CALLER:-${INSTRUQT_PARTICIPANT_ID:-}}"
export BROKER_DEADLINE="${BROKER_DEADLINE:-5m}"
file="${BROKER_SANDBOX_FILE:-/root/.sandbox/sandbox.env}"
# brokerctl sends the lease token kept there by setup (X-Lease-Token).
export BROKER_LEASE_FILE="${BROKER_LEASE_FILE:-$(dirname "$file")/lease}"
if [ ! -f "$file" ]; then
  echo "cleanup-sandbox: no $file; nothing to release" >&2
  exit 0
fi
if [ -z "$BROKER_CALLER" ]; then
  echo "cleanup-sandbox: set BROKER_CALLER or INSTRUQT_PARTICIPANT_ID" >&2
  exit 2
fi
# shellcheck disable=SC1090
. "$file"
brokerctl release "$SANDBOX_ID"
echo "cleanup-sandbox: released $SANDBOX_ID" >&2
