#!/usr/bin/env bash
# Create the virtual environment with a Python >= 3.11, installing one from Debian if needed.
set -euo pipefail
python="${1:-python3}"; venv="${2:-.venv}"
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; }
if ! command -v "$python" >/dev/null || ! ok "$python"; then
  echo "bootstrap: installing python3 (Debian packages)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq python3 python3-venv python3-dev >/dev/null
  python=/usr/bin/python3
fi
if ! "$python" -m venv --help >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
