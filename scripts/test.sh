#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, in-process gRPC
# tests, and the end-to-end suites against real processes and the real
# RabbitMQ broker (installed and started here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_INCREMENTAL=0 CARGO_TERM_COLOR=never
bash scripts/ensure-rabbitmq.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The end-to-end suites run the real binaries: build them first.
cargo build --workspace --bins --quiet
cargo test --workspace --no-fail-fast
bash scripts/check-k8s.sh
