#!/usr/bin/env bash
# Lints openapi.yaml with Redocly CLI, pinned in tools/openapi/package.json and
# installed from npm into tools/openapi/node_modules on first use.
# usage: tools/openapi-lint.sh [SPEC]   (default: openapi.yaml at the repo root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
spec=${1:-$root/openapi.yaml}
dir=$root/tools/openapi
if [[ ! -x $dir/node_modules/.bin/redocly ]]; then
  command -v npm >/dev/null || { echo "openapi-lint: npm is missing; run tools/install-deps.sh" >&2; exit 2; }
  (cd "$dir" && npm install --no-audit --no-fund --silent)
fi
cd "$root"
REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true \
  "$dir/node_modules/.bin/redocly" lint --config "$dir/redocly.yaml" "$spec"
