#!/usr/bin/env bash
# Print the path of libfaketime (Debian's libfaketime package unpacked into a cache folder,
# no root): `make chaos` preloads it into one worker to step that process's wall clock.
#
# Environment: JOBSTREAM_CACHE (default .cache/ in the repo).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${JOBSTREAM_CACHE:-$here/.cache}/faketime"
lib="$CACHE/root/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
log() { printf 'faketime: %s\n' "$*" >&2; }
# shellcheck source=scripts/lib.sh
. "$here/scripts/lib.sh"
[[ -f "$lib" ]] || unpack_debs "$CACHE" libfaketime
echo "$lib"
