#!/usr/bin/env bash
# Start (or stop) Redis 7 on 127.0.0.1 from Debian's packages unpacked into a cache folder (no
# root, no system service): the broker and result backend of the Celery peer in `bench/`.
#
#   scripts/redis.sh start | stop | status
#
# Environment: REDIS_PORT (default 16379), JOBSTREAM_RUN (default .services/ in the repo),
# JOBSTREAM_CACHE (default .cache/). Persistence: append-only file, fsync every second
# (Redis's own durable setting), so Celery's state survives a restart like ours does.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${REDIS_PORT:-16379}"
RUN="${JOBSTREAM_RUN:-$here/.services}/redis-$PORT"
CACHE="${JOBSTREAM_CACHE:-$here/.cache}/redis"
LIB="$CACHE/root/usr/lib/x86_64-linux-gnu"

log() { printf 'redis: %s\n' "$*" >&2; }
# shellcheck source=scripts/lib.sh
. "$here/scripts/lib.sh"

binary() {
  # Debian's redis-server is a link to the one binary redis-tools ships (it dispatches on its
  # name), so the server package itself (and its service scripts) is not needed.
  local bin="$CACHE/root/usr/bin/redis-server"
  if [[ ! -x "$bin" ]]; then
    unpack_debs "$CACHE" redis-tools libjemalloc2 liblzf1
    ln -sf redis-check-rdb "$bin"
  fi
  echo "$bin"
}

cli() { LD_LIBRARY_PATH="$LIB" "$CACHE/root/usr/bin/redis-cli" -h 127.0.0.1 -p "$PORT" "$@"; }
answers() { [[ -x "$CACHE/root/usr/bin/redis-cli" ]] && [[ "$(cli ping 2>/dev/null)" == PONG ]]; }

start() {
  local bin; bin="$(binary)"
  if answers; then log "already running on 127.0.0.1:$PORT"; return; fi
  mkdir -p "$RUN"
  LD_LIBRARY_PATH="$LIB" nohup "$bin" --bind 127.0.0.1 --port "$PORT" --dir "$RUN" \
    --appendonly yes --appendfsync everysec --save "" --protected-mode yes \
    --daemonize no >"$RUN/server.log" 2>&1 &
  echo $! >"$RUN/pid"
  wait_answering 100 0.1 "$RUN/server.log"
  log "ready on 127.0.0.1:$PORT (logs: $RUN/server.log)"
}

stop() { stop_pid "$RUN"; }

service_main "$@"
