#!/usr/bin/env bash
# Start (or stop) a PostgreSQL server for tests on 127.0.0.1, from Debian's packages.
#
#   scripts/postgres.sh start | stop | status
#
# Environment: PG_PORT (default 15432), JOBSTREAM_RUN (default .services/ in the repo).
# Trust authentication on loopback only: a throw-away test server, never a production one.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
PG_PORT="${PG_PORT:-15432}"
RUN="${JOBSTREAM_RUN:-$here/.services}/pg-$PG_PORT"

log() { printf 'postgres: %s\n' "$*" >&2; }

bindir() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
  if [[ -z "$d" ]]; then
    log "installing PostgreSQL (Debian package postgresql)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
    d="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
  fi
  echo "$d"
}

as_pg() {
  if [[ "$(id -u)" == 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$PG_PORT") 2>/dev/null; }

start() {
  local bin; bin="$(bindir)"
  if answers; then log "already running on 127.0.0.1:$PG_PORT"; return; fi
  mkdir -p "$RUN"
  if [[ "$(id -u)" == 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    chown -R postgres "$RUN"
    # the server user must be able to reach its data directory
    local p="$RUN"; while [[ "$p" != "/" ]]; do chmod o+x "$p" 2>/dev/null || true; p="$(dirname "$p")"; done
  fi
  if [[ ! -f "$RUN/data/PG_VERSION" ]]; then
    as_pg "$bin/initdb" -D "$RUN/data" -U postgres --auth=trust --encoding=UTF8 --no-sync >"$RUN/initdb.log" 2>&1 \
      || { cat "$RUN/initdb.log" >&2; exit 1; }
    cat >>"$RUN/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$RUN'
max_connections = 300
shared_buffers = 256MB
fsync = on
synchronous_commit = on
CONF
  fi
  as_pg "$bin/pg_ctl" -D "$RUN/data" -l "$RUN/server.log" -w -t 60 start >/dev/null
  log "ready on 127.0.0.1:$PG_PORT (logs: $RUN/server.log)"
}

stop() {
  local bin; bin="$(bindir)"
  if [[ -f "$RUN/data/postmaster.pid" ]]; then
    as_pg "$bin/pg_ctl" -D "$RUN/data" -m fast -w stop >/dev/null || true
    log "stopped"
  fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) answers ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
