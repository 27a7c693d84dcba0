#!/usr/bin/env bash
# Static checks of the AWS deployment (terraform/ and the Dockerfile), for CI.
#
#   scripts/check-terraform.sh [CODE_TABLES_JSON]
#
# 1. scripts/check_terraform.py: every .tf parses (python-hcl2), references
#    resolve, variables/outputs are described, no hard-coded region, checkov
#    skips carry a reason, and the DynamoDB tables equal
#    terraform/tables.expected.json and, when given, CODE_TABLES_JSON (the
#    output of `cargo run -q -p projector -- tables --json`).
# 2. checkov on terraform/ and on the Dockerfile (every skip is justified inline).
#
# There is no terraform binary here: `terraform validate` / `plan` are for
# users (docs/deploy-aws.md).
#
# The tools are pinned and installed into two virtual environments under a
# cache directory (reused between runs). Two, because checkov depends on
# bc-python-hcl2, which installs a module with the same name (`hcl2`) as
# python-hcl2: in one environment one would overwrite the other.
set -euo pipefail

PYTHON_HCL2_VERSION="8.1.4"
CHECKOV_VERSION="3.3.30"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${TFCHECK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sandbox-broker-tfcheck}"
CODE_TABLES="${1:-}"

export PIP_DISABLE_PIP_VERSION_CHECK=1

# ensure_venv DIR PACKAGE VERSION: a venv at DIR with PACKAGE==VERSION in it.
ensure_venv() {
    local dir="$1" package="$2" version="$3"
    if [[ -x "$dir/bin/python" ]] && [[ "$(cat "$dir/.pinned" 2>/dev/null)" == "$package==$version" ]]; then
        return 0
    fi
    echo "installing $package==$version into $dir"
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet "$package==$version"
    echo "$package==$version" > "$dir/.pinned"
}

HCL_VENV="$CACHE_DIR/python-hcl2-$PYTHON_HCL2_VERSION"
CHECKOV_VENV="$CACHE_DIR/checkov-$CHECKOV_VERSION"
ensure_venv "$HCL_VENV" python-hcl2 "$PYTHON_HCL2_VERSION"
ensure_venv "$CHECKOV_VENV" checkov "$CHECKOV_VERSION"

cd "$ROOT"

echo "== terraform: parse, references, tables"
args=(--code-tables terraform/tables.expected.json)
if [[ -n "$CODE_TABLES" ]]; then
    if [[ ! -s "$CODE_TABLES" ]]; then
        echo "error: code table definitions '$CODE_TABLES' are missing or empty" >&2
        exit 1
    fi
    args+=(--code-tables "$CODE_TABLES")
fi
"$HCL_VENV/bin/python" scripts/check_terraform.py "${args[@]}"

# Offline: no guideline download, no update check (the machines reach only the
# package registries).
export BC_SKIP_MAPPING=TRUE
export CKV_SKIP_PACKAGE_UPDATE_CHECK=TRUE

echo "== checkov: terraform/"
"$CHECKOV_VENV/bin/checkov" -d terraform --quiet --compact --skip-download

echo "== checkov: Dockerfile"
"$CHECKOV_VENV/bin/checkov" -f Dockerfile --framework dockerfile --quiet --compact --skip-download

echo "terraform and Dockerfile checks: OK"
