#!/usr/bin/env bash
# Runs the whole test suite: formatting and lints (Rust; shellcheck and
# actionlint through scripts/lint.sh, which installs them where missing),
# unit tests, in-process gRPC tests, the end-to-end suites against real
# processes and the real RabbitMQ broker (installed and started here if
# missing; libfaketime too, for a coordinator run on a skewed clock, and
# nftables, to cut a master and its slave off from each other), and
# the offline Kubernetes checks. A lint failure stops the run;
# the tests all run, then scripts/test-summary.sh lists the skipped tests
# and ends with `tests: N passed, N failed, N skipped`. Exits non-zero when
# anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_INCREMENTAL=0 CARGO_TERM_COLOR=never
mkdir -p target
cargo fmt --all -- --check
bash scripts/lint.sh
cargo clippy --workspace --all-targets --quiet -- -D warnings
bash scripts/ensure-rabbitmq.sh
bash scripts/ensure-faketime.sh
bash scripts/ensure-nftables.sh
# The end-to-end suites run the real binaries: build them first.
cargo build --workspace --bins --quiet

# The contract with the tests: one that skips appends one line
# `<test name>: <reason>` here and returns Ok.
export SNS_SKIP_LOG="$PWD/target/test-skips.log"
: >"$SNS_SKIP_LOG"
log=target/test-output.log
k8s_log=target/k8s-check.log
set +e
# Into a file, shown as it grows: a process a failed test left behind can
# hold the file open, but not keep this run waiting on a pipe.
: >"$log"
cargo test --workspace --no-fail-fast >>"$log" 2>&1 &
cargo_pid=$!
tail -n +1 -f --pid="$cargo_pid" "$log"
wait "$cargo_pid"
tests=$?
SNS_OPERATOR_BIN=target/debug/sns-operator bash scripts/check-k8s.sh 2>&1 | tee "$k8s_log"
k8s=${PIPESTATUS[0]}
echo
bash scripts/test-summary.sh "$log" "$tests" "$SNS_SKIP_LOG" "$k8s_log" "$k8s"
summary=$?
set -e
if [ "$tests" -ne 0 ] || [ "$k8s" -ne 0 ] || [ "$summary" -ne 0 ]; then
  exit 1
fi
