#!/usr/bin/env bash
# Make sure headless Chromium is installed (Debian's chromium package) for the status page
# test; print its path. Installs with apt-get when missing (CI machines start without it).
set -euo pipefail
for c in chromium chromium-browser google-chrome; do
  if command -v "$c" >/dev/null 2>&1; then command -v "$c"; exit 0; fi
done
echo "chromium: installing Debian's chromium package" >&2
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [[ "$(id -u)" == 0 ]] || SUDO="sudo"
$SUDO apt-get update -qq >/dev/null 2>&1 || true
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium
