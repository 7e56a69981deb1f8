#!/usr/bin/env bash
# Runs Tiny SNS on this machine: makes sure RabbitMQ is up (installing it
# from Debian's packages if missing), builds sns-node and tsc, and starts the
# local launcher (coordinator + 3 clusters x master/slave + synchronizers).
# Extra arguments go to `sns-node local` (see `sns-node local --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust 1.85 or newer (https://rustup.rs), then run this again" >&2
  exit 1
fi
bash scripts/ensure-rabbitmq.sh
echo "building (release)..."
cargo build --release -p sns-node -p sns-client --quiet
echo "tsc is at $(pwd)/target/release/tsc"
exec target/release/sns-node local "$@"
