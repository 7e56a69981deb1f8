#!/usr/bin/env bash
# Makes sure the `nft` command is installed (Debian's `nftables`): the
# end-to-end suite cuts a master and its slave off from each other with it.
# Where it cannot be installed, those tests skip and the fault schedules
# leave that fault out, saying so.
set -euo pipefail

if command -v nft >/dev/null 2>&1; then
  exit 0
fi
exec bash "$(dirname "$0")/apt-install.sh" nftables "the tests that cut two servers apart"
