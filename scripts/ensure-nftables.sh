#!/usr/bin/env bash
# Makes sure the `nft` command is installed (Debian's `nftables`): the
# end-to-end suite cuts a master and its slave off from each other with it.
# Where it cannot be installed (no apt-get), says so and goes on: those
# tests then skip, and the fault schedules leave that fault out, saying so.
set -euo pipefail

if command -v nft >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "nftables: nft is missing and there is no apt-get; the tests that cut two servers apart will skip" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "nftables: installing nft from Debian's packages"
$sudo apt-get update -qq
# env, not a plain assignment: sudo drops the caller's environment.
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null
