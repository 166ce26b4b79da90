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

binary() {
  # Debian's redis-server is a link to the one binary redis-tools ships (it dispatches on its
  # name), so the server package itself (and its service scripts) is not needed.
  local bin="$CACHE/root/usr/bin/redis-server"
  if [[ ! -x "$bin" ]]; then
    log "fetching Debian's redis-tools (+ libjemalloc2, liblzf1) into $CACHE"
    mkdir -p "$CACHE"
    (cd "$CACHE" && rm -f ./*.deb && {
      apt-get download redis-tools libjemalloc2 liblzf1 >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 \
             && apt-get download redis-tools libjemalloc2 liblzf1 >/dev/null 2>&1; }
    }) || { log "cannot download the packages (apt-get download redis-tools)"; exit 1; }
    for deb in "$CACHE"/*.deb; do dpkg -x "$deb" "$CACHE/root"; done
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
  for _ in $(seq 1 100); do
    if answers; then log "ready on 127.0.0.1:$PORT (logs: $RUN/server.log)"; return; fi
    sleep 0.1
  done
  log "did not answer within 10 s"; tail -20 "$RUN/server.log" >&2; exit 1
}

stop() {
  if [[ -f "$RUN/pid" ]]; then
    kill "$(cat "$RUN/pid")" 2>/dev/null || true
    rm -f "$RUN/pid"
    log "stopped"
  fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) answers ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
