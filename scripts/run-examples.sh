#!/usr/bin/env bash
# Runs every marked example command of README.md and docs/ against a live embedded service, so an
# example that no longer works fails the build (CI runs it after the docs check):
#
#   scripts/run-examples.sh                # every file
#   scripts/run-examples.sh docs/api.md    # some files
#
# Builds command-api and brokerctl (debug), then scripts/run_examples.py starts a fresh service
# per file (embedded store in a temporary directory, demo pool, dev tokens, a free 127.0.0.1
# port) and runs the file's marked blocks in order with bash -Eeuo pipefail. How blocks are
# marked: docs/contributing.md, "Examples that run". Exits non-zero, naming the file and line,
# when a block fails or lacks its expected output; reports how many blocks ran and which are
# unmarked.
#
# Settings (environment): EXAMPLES_TIMEOUT (seconds per file, default 120).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

(cd "$ROOT" && cargo build -q -p command-api -p brokerctl)
# Loopback only: no proxy may see this traffic.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
exec python3 "$ROOT/scripts/run_examples.py" --bin-dir "$TARGET_DIR/debug" \
    --timeout "${EXAMPLES_TIMEOUT:-120}" "$@"
