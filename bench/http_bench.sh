#!/usr/bin/env bash
# HTTP benchmark of topiary serve with wrk, all on 127.0.0.1: requests/s and
# p99 latency of GET /v1/jobs/{id} and of the job list while a pruning job
# keeps one core busy, and the checkpoint download rate.
# usage: bench/http_bench.sh [--quick]   (--quick: 5 s per run instead of 15 s)
# Needs wrk (Debian package wrk), curl, and the data from tools/fetch-*.sh.
# Prints a markdown table; docs/benchmarks.md records a run and this command.
set -euo pipefail
cd "$(dirname "$0")/.."
data=$(cd "${TOPIARY_DATA_DIR:-data}" && pwd)
duration=15s
[[ "${1:-}" != --quick ]] || duration=5s
command -v wrk >/dev/null || { echo "http_bench: wrk is not installed (apt-get install wrk)" >&2; exit 1; }
make -s topiary

state=$(mktemp -d)
server_pid=
cleanup() {
  [[ -z $server_pid ]] || { kill -TERM "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null || true; }
  rm -rf "$state"
}
trap cleanup EXIT
token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '%s\n' "$token" >"$state/tokens"
./topiary serve --listen 127.0.0.1 --port 0 --db "$state/topiary.db" --artifact-dir "$state/artifacts" \
  --file-roots "$data" --token-file "$state/tokens" --workers 1 \
  >"$state/server.log" 2>&1 &
server_pid=$!
port=
for _ in $(seq 1 100); do
  port=$(sed -nE 's/.*msg=listening .*port=([0-9]+).*/\1/p' "$state/server.log" | tail -n 1)
  [[ -n $port ]] && break
  sleep 0.1
done
[[ -n $port ]] || { echo "http_bench: the server did not start:" >&2; cat "$state/server.log" >&2; exit 1; }
url=http://127.0.0.1:$port
auth=(-H "Authorization: Bearer $token")
post() {
  curl -sS --fail-with-body "${auth[@]}" -H 'Content-Type: application/json' --data-binary "$2" "$url$1"
}
field() { sed -nE "s/.*\"$1\":\"([^\"]+)\".*/\1/p" | head -n 1; }

model=$(post /v1/models "{\"uri\":\"file://$data/models/nsfwjs/mobilenet_v2\"}" | field id)
fashion=$data/datasets/fashion-mnist
post /v1/tasks "{\"id\":\"fashion\",\"uri\":\"idx:$fashion/t10k-images-idx3-ubyte.gz,$fashion/t10k-labels-idx1-ubyte.gz\"}" >/dev/null
post /v1/tasks "{\"id\":\"digits\",\"uri\":\"digits-grid:$data/datasets/digits/digits.png\"}" >/dev/null

# A small finished job gives a checkpoint to download; a long one keeps a core busy.
small=$(post /v1/jobs "{\"model\":\"$model\",\"sparsity\":0.3,\"evaluation\":{\"tasks\":[\"digits\"],\"head_fit_images\":20,\"images\":20}}" | field id)
for _ in $(seq 1 600); do
  status=$(curl -sS "${auth[@]}" "$url/v1/jobs/$small" | field status)
  [[ $status = succeeded || $status = failed ]] && break
  sleep 0.5
done
[[ $status = succeeded ]] || { echo "http_bench: the small job ended $status" >&2; exit 1; }
post /v1/jobs "{\"model\":\"$model\",\"sparsity\":0.5,\"method\":\"obd\",\"calibration\":{\"task\":\"fashion\",\"images\":2000,\"head_fit_images\":200},\"evaluation\":{\"tasks\":[\"digits\"]}}" >/dev/null

# run LABEL PATH CONNECTIONS: one wrk run, one table row.
run() {
  local out rps p99 transfer
  out=$(wrk -t2 -c"$3" -d"$duration" --latency "${auth[@]}" "$url$2")
  rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
  p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
  transfer=$(awk '/^Transfer\/sec:/ { print $2 }' <<<"$out")
  printf '| %s | %s | %s | %s | %s |\n' "$1" "$3" "$rps" "$p99" "$transfer"
}
echo "topiary serve on 127.0.0.1, 1 worker running an OBD job; wrk -t2, $duration per row; $(nproc) cores; $(date -u +%Y-%m-%d); load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| request | connections | requests/s | p99 latency | transfer/s |"
echo "|---|---|---|---|---|"
run "GET /v1/jobs/{id}" "/v1/jobs/$small" 16
run "GET /v1/jobs?limit=20" "/v1/jobs?limit=20" 16
run "GET /v1/jobs/{id}/checkpoint" "/v1/jobs/$small/checkpoint" 2
