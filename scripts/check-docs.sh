#!/usr/bin/env bash
# The docs check CI runs: builds the book (docs/, mdBook; output in target/book/) and checks every
# relative link and #anchor of README.md and docs/**/*.md, in the sources and in the rendered
# book (scripts/check_docs.py says what is checked). Lists each broken link; exits 1 if any.
#
#   bash scripts/check-docs.sh              build, then check sources and the rendered book
#   bash scripts/check-docs.sh --no-build   check the sources only (no mdbook needed)
#
# Needs python3 and, to build, mdbook on PATH (.ci/run installs it from crates.io:
# cargo install mdbook --version 0.5.4 --locked --no-default-features --features search).
# A warning from mdbook fails the check too.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/book

if [ "${1:-}" = "--no-build" ]; then
    exec python3 scripts/check_docs.py
fi
command -v mdbook >/dev/null 2>&1 || {
    echo "check-docs: mdbook not found; install it with:" >&2
    echo "  cargo install mdbook --version 0.5.4 --locked --no-default-features --features search" >&2
    exit 2
}
mkdir -p target
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! mdbook build docs >"$log" 2>&1; then
    cat "$log"
    echo "check-docs: mdbook build failed" >&2
    exit 1
fi
cat "$log"
if grep -qE '\b(WARN|ERROR)\b' "$log"; then
    echo "check-docs: mdbook printed warnings (above)" >&2
    exit 1
fi
python3 scripts/check_docs.py --html "$out"
