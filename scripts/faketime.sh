#!/usr/bin/env bash
# Print the path of libfaketime (Debian's libfaketime package unpacked into a cache folder,
# no root): `make chaos` preloads it into one worker to step that process's wall clock.
#
# Environment: JOBSTREAM_CACHE (default .cache/ in the repo).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${JOBSTREAM_CACHE:-$here/.cache}/faketime"
lib="$CACHE/root/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
if [[ ! -f "$lib" ]]; then
  echo "faketime: fetching Debian's libfaketime into $CACHE" >&2
  mkdir -p "$CACHE"
  (cd "$CACHE" && rm -f ./*.deb && {
    apt-get download libfaketime >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get download libfaketime >/dev/null 2>&1; }
  }) || { echo "faketime: cannot download libfaketime" >&2; exit 1; }
  dpkg -x "$CACHE"/libfaketime_*.deb "$CACHE/root"
fi
echo "$lib"
