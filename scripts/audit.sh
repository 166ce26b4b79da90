#!/usr/bin/env bash
# Audit the installed Python dependencies for known vulnerabilities (pip-audit against the
# PyPI advisory data). Exit 1 on any known vulnerability; exit 3 when the advisory service
# could not be asked about every package (nothing is called clean that was not checked).
#
#   scripts/audit.sh            (make audit)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="$("$here/.venv/bin/pip-audit" -l --progress-spinner off -f json 2>/dev/null || true)"
python3 - "$out" <<'PY'
import json, sys
try:
    deps = json.loads(sys.argv[1])["dependencies"]
except (ValueError, KeyError):
    print("audit: pip-audit gave no report (is the advisory service reachable?)")
    sys.exit(3)
vulns = [(d["name"], d["version"], v["id"]) for d in deps for v in d.get("vulns", [])]
skipped = [d["name"] for d in deps if "skip_reason" in d]
for name, version, vid in vulns:
    print(f"audit: {name} {version}: {vid}")
print(f"audit: {len(deps) - len(skipped)} of {len(deps)} packages checked, "
      f"{len(vulns)} known vulnerabilities")
if vulns:
    sys.exit(1)
if skipped:
    print(f"audit: {len(skipped)} could not be checked (the index did not serve their "
          f"advisory data), e.g. {', '.join(skipped[:5])}")
    sys.exit(3)
PY
