# Shared by the scripts that run a Debian-packaged program from a cache folder (sourced, not
# run): fetch-and-unpack, waiting for an answer, stopping by pid file, the start|stop|status
# entry point. The sourcing script defines `log`, `start`, `answers` (and `stop` if not by pid).

# unpack_debs DIR PKG...: `apt-get download` the packages (after an index update if the first
# try fails) and unpack them into DIR/root (no root rights, no maintainer scripts).
unpack_debs() {
  local dir="$1"; shift
  log "fetching Debian's $* into $dir"
  mkdir -p "$dir"
  (cd "$dir" && rm -f ./*.deb && {
    apt-get download "$@" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get download "$@" >/dev/null 2>&1; }
  }) || { log "cannot download $* (apt-get download $*)"; exit 1; }
  local deb
  for deb in "$dir"/*.deb; do dpkg -x "$deb" "$dir/root"; done
}

# wait_answering TRIES DELAY LOGFILE: until `answers` succeeds; on giving up, the log's tail.
wait_answering() {
  local i
  for ((i = 0; i < $1; i++)); do
    if answers; then return 0; fi
    sleep "$2"
  done
  log "did not answer in time"; tail -20 "$3" >&2; exit 1
}

# stop_pid RUN: stop what RUN/pid names.
stop_pid() {
  if [[ -f "$1/pid" ]]; then
    kill "$(cat "$1/pid")" 2>/dev/null || true
    rm -f "$1/pid"
    log "stopped"
  fi
}

service_main() {
  case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) answers ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
  esac
}
