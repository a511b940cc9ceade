#!/usr/bin/env bash
# 507 Insufficient Storage: a real server whose artifact directory is a 16 MiB
# tmpfs (below the 64 MiB the API keeps free) rejects job submissions with a
# problem document and stores no job. Mounting needs root, as CI runs; without
# it the test fails with the mount error.
set -u
cd "$(dirname "$0")/.."
bin=${TOPIARY_BIN:-./topiary}
data=$(cd "${TOPIARY_DATA_DIR:-data}" && pwd)
tmp=$(mktemp -d)
passed=0 failed=0 server_pid=
cleanup() {
  [[ -z $server_pid ]] || { kill -TERM "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; }
  mountpoint -q "$tmp/artifacts" && umount "$tmp/artifacts"
  rm -rf "$tmp"
}
trap cleanup EXIT
check() { local name=$1; shift; if "$@"; then passed=$((passed + 1)); echo "ok   $name"; else failed=$((failed + 1)); echo "FAIL $name"; fi; }

mkdir -p "$tmp/artifacts"
if ! mount -t tmpfs -o size=16m tmpfs "$tmp/artifacts" 2>"$tmp/mount.err"; then
  echo "FAIL test_api_disk_full: cannot mount a tmpfs ($(cat "$tmp/mount.err")); run as root"
  echo "0 passed, 1 failed"
  exit 1
fi
token=t-$RANDOM$RANDOM
printf '%s\n' "$token" >"$tmp/tokens"
"$bin" serve --listen 127.0.0.1 --port 0 --db "$tmp/topiary.db" --artifact-dir "$tmp/artifacts" \
  --file-roots "$data" --token-file "$tmp/tokens" >"$tmp/server.log" 2>&1 &
server_pid=$!
port=
for _ in $(seq 100); do
  port=$(sed -nE 's/.*msg=listening .*port=([0-9]+).*/\1/p' "$tmp/server.log" | tail -n 1)
  [[ -n $port ]] && break
  sleep 0.1
done
check "server starts on a small artifact disk" test -n "$port"
url=http://127.0.0.1:$port
auth=(-H "Authorization: Bearer $token")

code=$(curl -s -o "$tmp/body" -w '%{http_code}' "${auth[@]}" -H 'Content-Type: application/json' \
  --data-binary "{\"uri\":\"file://$data/models/nsfwjs/mobilenet_v2\"}" "$url/v1/models")
check "model registration still works" test "$code" = 201
model=$(sed -nE 's/^\{"id":"([^"]+)".*/\1/p' "$tmp/body")
curl -s -o /dev/null "${auth[@]}" -H 'Content-Type: application/json' \
  --data-binary "{\"id\":\"digits\",\"uri\":\"digits-grid:$data/datasets/digits/digits.png\"}" "$url/v1/tasks"
code=$(curl -s -D "$tmp/headers" -o "$tmp/body" -w '%{http_code}' "${auth[@]}" -H 'Content-Type: application/json' \
  --data-binary "{\"model\":\"$model\",\"sparsity\":0.3,\"evaluation\":{\"tasks\":[\"digits\"]}}" "$url/v1/jobs")
check "job submission is 507" test "$code" = 507
check "the 507 is a problem document" grep -qi '^Content-Type: application/problem+json' "$tmp/headers"
check "the problem names insufficient storage" grep -q '"status":507' "$tmp/body"
code=$(curl -s -o /dev/null -w '%{http_code}' "${auth[@]}" "$url/v1/jobs")
check "no job was stored" grep -q '"jobs":\[\]' <(curl -s "${auth[@]}" "$url/v1/jobs")
check "reads still work" test "$code" = 200

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
