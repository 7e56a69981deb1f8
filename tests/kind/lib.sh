# Helpers of the kind suite: logging, polling with a deadline, and `tsc`
# clients driven through FIFOs (commands in, output to a log that the
# expectations poll). Sourced by run.sh; needs OUT, START and, for client,
# TSC, PORT_OF[<cr>] (the local port forwarded to that SnsCluster's
# coordinator) and CA_OF[<cr>] (a file with that SnsCluster's CA: TLS is on
# by default, and tsc checks the coordinator's certificate against it).
# shellcheck shell=bash

log() { printf '[%4ds] %s\n' "$(($(date +%s) - START))" "$*"; }
die() {
  log "FAIL: $*"
  exit 1
}

# Background processes (port-forwards) and clients, for run.sh's cleanup.
# BG_PIDS and CPID are only read by run.sh, which sources this file: seen
# alone, this file seems to leave them unused (SC2034).
# shellcheck disable=SC2034
BG_PIDS=()
declare -A CPID CFD MARK PORT_OF CA_OF

# Polls `cmd` (a shell string) until it succeeds or `secs` pass.
eventually() {
  local secs=$1 what=$2 cmd=$3
  local deadline=$(($(date +%s) + secs))
  until eval "$cmd" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${secs}s waiting for $what"
    sleep 0.5
  done
}

# client NAME CR USER: a tsc reading commands from a FIFO, output to a log;
# it talks to the coordinator's gateway (tsc --gateway) over TLS, trusting
# the SnsCluster's CA (tsc --tls --ca).
client() {
  local name=$1 cr=$2 user=$3 fd
  mkfifo "$OUT/client-$name.in"
  "$TSC" -h 127.0.0.1 -k "${PORT_OF[$cr]}" -u "$user" --gateway --tls --ca "${CA_OF[$cr]}" \
    <"$OUT/client-$name.in" >"$OUT/client-$name.log" 2>&1 &
  # shellcheck disable=SC2034 # read by run.sh's cleanup (see BG_PIDS above)
  CPID[$name]=$!
  exec {fd}>"$OUT/client-$name.in"
  CFD[$name]=$fd
  MARK[$name]=0
  expect "$name" '^=====================================$' 30
}
send() { printf '%s\n' "$2" >&"${CFD[$1]}"; }
mark() { MARK[$1]=$(wc -l <"$OUT/client-$1.log"); }
# expect NAME REGEX [SECS]: a line after the mark matches (extended regex).
expect() {
  local name=$1 re=$2 secs=${3:-30}
  eventually "$secs" "client $name to print /$re/" \
    "tail -n +$((${MARK[$name]} + 1)) '$OUT/client-$name.log' | grep -Eq -- '$re'"
}
OK='Command completed successfully$'
run() {
  mark "$1"
  send "$1" "$2"
  expect "$1" "$OK"
}
# poll_list NAME "1, 2, 3, " "2, 3, ": LIST until both lines read so.
poll_list() {
  local name=$1 users=$2 followers=$3
  local deadline=$(($(date +%s) + 60))
  while :; do
    mark "$name"
    send "$name" LIST
    if expect_quiet "$name" "All users: ${users}\$" && expect_quiet "$name" "Followers: ${followers}\$"; then
      return 0
    fi
    [ "$(date +%s)" -lt "$deadline" ] || die "client $name: LIST never showed users [$users] followers [$followers]"
    sleep 0.5
  done
}
expect_quiet() { (expect "$1" "$2" 3) >/dev/null 2>&1; }
post_re() { printf '(^|[^0-9])%s \\(.*\\) >> %s$' "$1" "$2"; }
expect_post() { expect "$1" "$(post_re "$2" "$3")" "${4:-30}"; }
enter_timeline() {
  run "$1" TIMELINE
  expect "$1" 'Now you are in the timeline$'
}

# writer NAME: acknowledged writes from client NAME (FOLLOW 1 and
# UNFOLLOW 1 in turn, each waited for) until $OUT/stop-writers exists; the
# time of each acknowledgement (ms since the epoch) goes to
# $OUT/acks-NAME. Meant to run in the background: its MARK is its own.
writer() {
  local name=$1 i=0 cmd
  until [ -e "$OUT/stop-writers" ]; do
    if [ $((i % 2)) -eq 0 ]; then cmd="FOLLOW 1"; else cmd="UNFOLLOW 1"; fi
    i=$((i + 1))
    mark "$name"
    send "$name" "$cmd"
    expect "$name" "$OK|command failed|Command failed|connection failed" 60
    if tail -n +$((${MARK[$name]} + 1)) "$OUT/client-$name.log" | grep -Eq -- "$OK"; then
      echo $(($(date +%s%N) / 1000000)) >>"$OUT/acks-$name"
    fi
  done
}
# blackout NAME: the longest time between two acknowledged writes of
# writer NAME, in ms.
blackout() {
  awk 'NR > 1 && $1 - prev > max { max = $1 - prev } { prev = $1 } END { print max + 0 }' "$OUT/acks-$1"
}
