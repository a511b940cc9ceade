#!/usr/bin/env bash
# The TF.js export checked by TF.js itself. First, $BUILD/tests/test_tfjs_export
# --export prunes two models, exports them and records topiary's predictions:
# the nsfwjs MobileNetV2 (30% of each prunable weight by magnitude, block_6
# batch-norm statistics shifted) and a hand-written model with a depthwise
# multiplier of 2. Then tools/tfjs/check-export.js loads each export with
# @tensorflow/tfjs 4.22.0 and compares weights and predictions (tolerance
# 1e-5). Last, one kernel of each export is rewritten in topiary's engine
# layout, and the checker must fail on it.
#
# Needs tools/fetch-models.sh, tools/fetch-data.sh (the photos) and node.
# tools/tfjs/node_modules is installed from its package-lock.json on first
# use (npm ci), as tools/openapi-lint.sh does for its tools.
set -u
cd "$(dirname "$0")/.."
build=${BUILD:-build}
data=${TOPIARY_DATA_DIR:-data}
bin=$build/tests/test_tfjs_export
topiary=${TOPIARY_BIN:-./topiary}
tfjs=tools/tfjs
photos=$data/datasets/photos
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0

check() { # name, then a command that must succeed
  local name=$1; shift
  if "$@"; then passed=$((passed + 1)); echo "ok   $name"
  else failed=$((failed + 1)); echo "FAIL $name"; fi
}
contains() { grep -qE -- "$2" "$1" || { echo "  expected /$2/ in:"; sed 's/^/  | /' "$1" | head -20; return 1; }; }
stop() {
  echo "FAIL test_tfjs_export.sh: $*"
  echo "$passed passed, $((failed + 1)) failed"
  exit 1
}

[[ -x $bin ]] || stop "$bin is not built; run 'make $bin'"
[[ -f $data/models/nsfwjs/mobilenet_v2/model.json && -f $photos/dog.jpg ]] ||
  stop "the model or the photos are missing; run tools/fetch-models.sh and tools/fetch-data.sh"
command -v node >/dev/null || stop "node is missing; run tools/install-deps.sh"
if [[ ! -f $tfjs/node_modules/@tensorflow/tfjs/package.json ]]; then
  command -v npm >/dev/null || stop "npm is missing; run tools/install-deps.sh"
  (cd "$tfjs" && npm ci --no-audit --no-fund --silent) || stop "npm ci in $tfjs failed"
fi
version=$(node -p "require('./$tfjs/node_modules/@tensorflow/tfjs/package.json').version")
[[ $version == 4.22.0 ]] || stop "$tfjs has @tensorflow/tfjs $version; run 'npm ci' in $tfjs for 4.22.0"

# Runs the checker on a case folder; its ok/FAIL lines count as this
# script's checks. Stores the checker's exit code in $checker_rc.
run_checker() {
  local case_dir=$1 log=$2 p f
  node "$tfjs/check-export.js" "$case_dir" >"$log" 2>&1
  checker_rc=$?
  grep -E '^(ok|FAIL|  )' "$log"
  p=$(grep -cE '^ok ' "$log")
  f=$(grep -cE '^FAIL ' "$log")
  passed=$((passed + p)); failed=$((failed + f))
  if [[ $checker_rc -ne 0 && $f -eq 0 ]]; then
    failed=$((failed + 1)); echo "FAIL check-export.js exited with $checker_rc:"; tail -n 5 "$log"
  fi
}

images=()
for name in dog eagle scream; do images+=("$photos/$name.jpg"); done
"$bin" --export "$tmp/cases" "${images[@]}" >"$tmp/export.log" 2>&1 ||
  { cat "$tmp/export.log"; stop "test_tfjs_export --export failed"; }

echo "-- mobilenet_v2"
run_checker "$tmp/cases/mobilenet_v2" "$tmp/real.log"
echo "-- tiny"
run_checker "$tmp/cases/tiny" "$tmp/tiny.log"

if [[ -x $topiary ]]; then
  "$topiary" forward --model "$tmp/cases/mobilenet_v2/tfjs/model.json" --image "$photos/dog.jpg" \
    --top 1 >"$tmp/forward" 2>&1
  check "topiary forward loads the exported model.json" contains "$tmp/forward" "1\. class [0-4] "
fi

# One kernel in the engine layout must make the checker fail, on that weight.
cp -r "$tmp/cases/mobilenet_v2" "$tmp/bad-real"
node "$tfjs/check-export.js" --engine-layout block_1_expand/kernel "$tmp/bad-real/tfjs" >/dev/null
node "$tfjs/check-export.js" "$tmp/bad-real" >"$tmp/bad-real.log" 2>&1
check "a conv kernel in the engine layout fails the check" test $? -eq 1
check "the failure names the conv kernel" contains "$tmp/bad-real.log" "^  block_1_expand/kernel: [0-9]+ of 1536 elements differ"
check "the failure includes the predictions" contains "$tmp/bad-real.log" "^FAIL TF.js predictions match"
cp -r "$tmp/cases/tiny" "$tmp/bad-tiny"
node "$tfjs/check-export.js" --engine-layout dw/depthwise_kernel "$tmp/bad-tiny/tfjs" >/dev/null
node "$tfjs/check-export.js" "$tmp/bad-tiny" >"$tmp/bad-tiny.log" 2>&1
check "a depthwise kernel in the engine layout fails the check" test $? -eq 1
check "the failure names the depthwise kernel" contains "$tmp/bad-tiny.log" "dw/depthwise_kernel: [0-9]+ of 54 elements differ"

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
