#!/usr/bin/env bash
# Start (or stop) InfluxDB 1.6 on 127.0.0.1, Debian's `influxdb` package unpacked into a cache
# folder (no root, no system service): the stand-in for Telegraf's listeners in tests. It
# accepts the same line protocol over HTTP /write and UDP.
#
#   scripts/influxdb.sh start | stop | status
#
# Environment: INFLUX_HTTP_PORT (default 18086), INFLUX_UDP_PORT (default 18089, database
# "udp"), JOBSTREAM_RUN (default .services/ in the repo), JOBSTREAM_CACHE (default .cache/).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
HTTP_PORT="${INFLUX_HTTP_PORT:-18086}"
UDP_PORT="${INFLUX_UDP_PORT:-18089}"
RUN="${JOBSTREAM_RUN:-$here/.services}/influxdb-$HTTP_PORT"
CACHE="${JOBSTREAM_CACHE:-$here/.cache}/influxdb"

log() { printf 'influxdb: %s\n' "$*" >&2; }
# shellcheck source=scripts/lib.sh
. "$here/scripts/lib.sh"

binary() {
  local bin="$CACHE/root/usr/bin/influxd"
  if [[ ! -x "$bin" ]]; then
    unpack_debs "$CACHE" influxdb
  fi
  echo "$bin"
}

answers() { curl -fsS -o /dev/null "http://127.0.0.1:$HTTP_PORT/ping" 2>/dev/null; }

start() {
  local bin; bin="$(binary)"
  if answers; then log "already running on 127.0.0.1:$HTTP_PORT"; return; fi
  mkdir -p "$RUN"
  cat >"$RUN/influxdb.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:$((HTTP_PORT + 2))"
[meta]
  dir = "$RUN/meta"
[data]
  dir = "$RUN/data"
  wal-dir = "$RUN/wal"
  query-log-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:$HTTP_PORT"
  log-enabled = false
[[udp]]
  enabled = true
  bind-address = "127.0.0.1:$UDP_PORT"
  database = "udp"
  batch-size = 1000
  batch-timeout = "50ms"
[monitor]
  store-enabled = false
CONF
  nohup "$bin" -config "$RUN/influxdb.conf" >"$RUN/server.log" 2>&1 &
  echo $! >"$RUN/pid"
  wait_answering 150 0.2 "$RUN/server.log"
  curl -fsS -XPOST "http://127.0.0.1:$HTTP_PORT/query" --data-urlencode "q=CREATE DATABASE udp" >/dev/null
  log "ready on 127.0.0.1:$HTTP_PORT (HTTP) and udp 127.0.0.1:$UDP_PORT (logs: $RUN/server.log)"
}

stop() { stop_pid "$RUN"; }

service_main "$@"
