#!/usr/bin/env bash
# The end of scripts/test.sh: the tests that skipped and why, then one line
#   tests: N passed, N failed, N skipped
# Exits 1 when anything failed.
#   test-summary.sh CARGO_LOG CARGO_STATUS SKIP_LOG K8S_LOG K8S_STATUS
# CARGO_LOG is the output of `cargo test`, whose `test result:` lines are
# summed. A Rust test that skips returns Ok, so cargo counts it as passed,
# and appends one line `<test name>: <reason>` to SKIP_LOG: each such line
# moves one test from passed to skipped. K8S_LOG is the output of
# scripts/check-k8s.sh: each property it proves counts as a passed test,
# each it finds broken as a failed one. A step that exits non-zero without
# a failure counted (a build error, a crash) counts as one failed test, so
# the line never says 0 failed for a failed run.
set -euo pipefail

cargo_log=$1 cargo_status=$2 skip_log=$3 k8s_log=$4 k8s_status=$5
problems=()

# sum WORD: the total of `N WORD` over cargo's `test result:` lines.
sum() {
  { grep -E '^test result:' "$cargo_log" || true; } | { grep -oE "[0-9]+ $1" || true; } |
    awk '{s += $1} END {print s + 0}'
}
passed=$(sum passed)
failed=$(sum failed)
skipped=0
[ -f "$skip_log" ] && skipped=$(grep -c . "$skip_log" || true)
if [ "$skipped" -gt "$passed" ]; then
  problems+=("$skip_log names $skipped skipped tests but cargo counted $passed passed")
  problems+=("a test that skips must return Ok and append exactly one line to \$SNS_SKIP_LOG")
  failed=$((failed + 1))
  passed=0
else
  passed=$((passed - skipped))
fi
if [ "$cargo_status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  problems+=("cargo test exited with status $cargo_status but no test failed (did it build?)")
  failed=1
fi
echo "cargo test: $passed passed, $failed failed, $skipped skipped"

k8s_re='^k8s-check: ([0-9]+) properties proven, ([0-9]+) failed'
k8s_line=$(grep -E "$k8s_re" "$k8s_log" 2>/dev/null | tail -n 1 || true)
if [ -n "$k8s_line" ]; then
  [[ $k8s_line =~ $k8s_re ]]
  k8s_passed=${BASH_REMATCH[1]} k8s_failed=${BASH_REMATCH[2]}
else
  k8s_passed=0 k8s_failed=0
fi
if [ "$k8s_status" -ne 0 ] && [ "$k8s_failed" -eq 0 ]; then
  problems+=("scripts/check-k8s.sh exited with status $k8s_status without a failed property (see its output)")
  k8s_failed=1
elif [ "$k8s_status" -eq 0 ] && [ -z "$k8s_line" ]; then
  problems+=("scripts/check-k8s.sh printed no summary line")
  k8s_failed=1
fi
echo "check-k8s.sh: $k8s_passed properties proven, $k8s_failed failed"

if [ "$skipped" -gt 0 ]; then
  echo "skipped ($skipped):"
  grep . "$skip_log" | sed 's/^/  /'
fi
for p in "${problems[@]}"; do
  echo "problem: $p"
done
total_failed=$((failed + k8s_failed))
echo "tests: $((passed + k8s_passed)) passed, $total_failed failed, $skipped skipped"
[ "$total_failed" -eq 0 ]
