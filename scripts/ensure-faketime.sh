#!/usr/bin/env bash
# Makes sure libfaketime is installed (Debian's `faketime` package): the
# end-to-end suite runs a coordinator on a clock a day behind through it.
# Where it cannot be installed (no apt-get), says so and goes on: that test
# then skips, naming the reason.
set -euo pipefail

if compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || [ -e /usr/lib/faketime/libfaketime.so.1 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "faketime: libfaketime is missing and there is no apt-get; the clock-skew test will skip" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "faketime: installing libfaketime from Debian's packages"
$sudo apt-get update -qq
# env, not a plain assignment: sudo drops the caller's environment.
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null
