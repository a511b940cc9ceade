#!/usr/bin/env bash
# openapi.yaml against the code: the Redocly linter (tools/openapi-lint.sh,
# installed from npm on first use) must pass, and every route in the route
# table of api/api.c must be documented with its method.
set -u
cd "$(dirname "$0")/.."
passed=0 failed=0
check() { # name, then a command that must succeed
  local name=$1; shift
  if "$@"; then passed=$((passed + 1)); echo "ok   $name"
  else failed=$((failed + 1)); echo "FAIL $name"; fi
}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

lint() { bash tools/openapi-lint.sh >"$log" 2>&1 || { tail -n 40 "$log" | sed 's/^/  | /'; return 1; }; }
check "openapi.yaml passes the linter" lint

# Each route: {"METHOD", "/path", ...} in api/api.c.
documented() { # method path
  python3 - "$1" "$2" <<'PY'
import re, sys
method, path = sys.argv[1].lower(), sys.argv[2]
text = open("openapi.yaml").read()
m = re.search(r"^  " + re.escape(path) + r":\n(.*?)(?=^  /|^components:)", text, re.M | re.S)
if not m or not re.search(r"^    " + method + r":", m.group(1), re.M):
    print(f"  {method.upper()} {path} is not in openapi.yaml")
    sys.exit(1)
PY
}
routes=$(sed -nE 's/^ *\{"([A-Z]+)", "(\/[^"]*)", api_.*/\1 \2/p' api/api.c)
check "the route table is not empty" test -n "$routes"
while read -r method path; do
  check "openapi documents $method $path" documented "$method" "$path"
done <<<"$routes"

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
