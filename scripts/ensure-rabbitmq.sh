#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672 (or on the host and
# port of $AMQP_URL): uses one that is already listening, else starts the
# installed rabbitmq-server, else installs it from Debian's packages first.
set -euo pipefail

url="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
hostport="${url#*://}"; hostport="${hostport%%/*}"; hostport="${hostport##*@}"
host="${hostport%:*}"; port="${hostport##*:}"
[ "$host" = "$hostport" ] && port=5672
[ -n "$host" ] || host=127.0.0.1

listening() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }
local_host() { case "$host" in 127.*|localhost|::1) return 0 ;; *) return 1 ;; esac; }

# A test that raises the local broker's free-disk alarm (tests/src/broker.rs,
# DiskAlarm: the limit set to 10^15 bytes) and is killed before it puts the
# limit back leaves every publisher blocked: put RabbitMQ's default back.
clear_left_alarm() {
  local ctl=rabbitmqctl limit configured
  command -v "$ctl" >/dev/null 2>&1 || ctl=/usr/sbin/rabbitmqctl
  [ -x "$(command -v "$ctl" 2>/dev/null)" ] || return 0
  limit=$(timeout 30 "$ctl" eval 'rabbit_disk_monitor:get_disk_free_limit().' 2>/dev/null) || return 0
  if [ "$limit" = "1000000000000000" ]; then
    # The configured limit when it is a number of bytes, else RabbitMQ's
    # default (50 MB).
    configured=$(timeout 30 "$ctl" eval 'application:get_env(rabbit, disk_free_limit).' 2>/dev/null) || configured=""
    case "$configured" in
      "{ok,"*[0-9]"}") limit="${configured#\{ok,}"; limit="${limit%\}}" ;;
      *) limit=50000000 ;;
    esac
    case "$limit" in *[!0-9]*|"") limit=50000000 ;; esac
    timeout 30 "$ctl" set_disk_free_limit "$limit" >/dev/null 2>&1 || true
    echo "rabbitmq: a test's free-disk alarm was left raised; limit put back to $limit bytes"
  fi
}

if listening; then
  if local_host; then clear_left_alarm; fi
  echo "rabbitmq: broker answering on $host:$port"
  exit 0
fi
if ! local_host; then
  echo "rabbitmq: nothing answers on $host:$port and it is not this machine; start your broker or fix AMQP_URL" >&2
  exit 1
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
  echo "rabbitmq: installing rabbitmq-server from Debian's packages"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
export PATH="$PATH:/usr/sbin"
if ! listening; then
  echo "rabbitmq: starting rabbitmq-server"
  # Under systemd the package may have started it already; -detached is
  # for machines without it (containers, CI runners).
  $sudo rabbitmq-server -detached >/dev/null 2>&1 || true
fi
for _ in $(seq 1 180); do
  if listening; then
    # The port opens before the broker accepts AMQP sessions.
    timeout 60 $sudo rabbitmqctl await_startup >/dev/null 2>&1 || true
    echo "rabbitmq: broker answering on $host:$port"
    exit 0
  fi
  sleep 0.5
done
echo "rabbitmq: rabbitmq-server did not start listening on $host:$port within 90 s; see /var/log/rabbitmq/" >&2
exit 1
