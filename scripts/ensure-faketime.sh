#!/usr/bin/env bash
# Makes sure libfaketime is installed (Debian's `faketime` package): the
# end-to-end suite runs a coordinator on a clock a day behind through it.
# Where it cannot be installed, the clock tests skip, saying why.
set -euo pipefail

if compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || [ -e /usr/lib/faketime/libfaketime.so.1 ]; then
  exit 0
fi
exec bash "$(dirname "$0")/apt-install.sh" faketime "the skewed-clock tests"
