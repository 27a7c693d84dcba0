#!/usr/bin/env bash
# Builds brokerctl as one statically linked executable (glibc static-pie, rustls with ring: no
# OpenSSL, no shared library needed at run time), so a lab image can just copy it in.
# Usage: scripts/build-brokerctl-static.sh [--check]
#   --check  also fail unless the result is statically linked (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p brokerctl --target "$target"
bin="${CARGO_TARGET_DIR:-target}/$target/release/brokerctl"
echo "built $bin ($(stat -c %s "$bin") bytes)"
if [[ "${1:-}" == "--check" ]]; then
  if ldd "$bin" 2>&1 | grep -q "=>"; then
    echo "brokerctl links shared libraries:"; ldd "$bin"; exit 1
  fi
  "$bin" --version
  echo "brokerctl is statically linked"
fi
