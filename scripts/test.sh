#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests, in-process gRPC
# tests, the end-to-end suites against real processes and the real RabbitMQ
# broker (installed and started here if missing), and the offline
# Kubernetes checks. Ends with one line counting every test.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_INCREMENTAL=0 CARGO_TERM_COLOR=never
bash scripts/ensure-rabbitmq.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The end-to-end suites run the real binaries: build them first.
cargo build --workspace --bins --quiet
mkdir -p target
log=target/test-output.log
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
tests=${PIPESTATUS[0]}
set -e
bash scripts/check-k8s.sh
passed=$(grep -E '^test result:' "$log" | grep -oE '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')
failed=$(grep -E '^test result:' "$log" | grep -oE '[0-9]+ failed' | awk '{s += $1} END {print s + 0}')
echo "cargo-tests: $passed passed, $failed failed"
exit "$tests"
