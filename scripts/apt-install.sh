#!/usr/bin/env bash
# apt-install.sh <package> <what it is for>: installs a Debian package for
# the test suite, with sudo when not root. Where there is no apt-get, says
# what will be left out and succeeds: the tests that need it skip, saying so.
set -euo pipefail

package=$1
purpose=$2
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$package: missing, and there is no apt-get to install it; $purpose will be left out" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "$package: installing from Debian's packages ($purpose)"
$sudo apt-get update -qq
# env, not a plain assignment: sudo drops the caller's environment.
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
