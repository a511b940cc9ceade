#!/usr/bin/env bash
# Golden tests of the PyTorch importers against PyTorch itself: runs
# $BUILD/tests/test_torch --golden DIR on the fixtures of tools/torch_golden.py.
#
# The fixtures (about 170 MB, not committed) are generated when they are
# missing or were made by another version of the generator. Generating needs
# Debian's /usr/bin/python3 with python3-torch and python3-torchvision. Without
# them this test fails with a message naming the packages instead of skipping.
#   TOPIARY_TORCH_GOLDEN_DIR  fixture directory (default build/golden/torch)
#   TOPIARY_TORCH_PYTHON      interpreter with torch (default /usr/bin/python3)
set -u
cd "$(dirname "$0")/.."
build=${BUILD:-build}
dir=${TOPIARY_TORCH_GOLDEN_DIR:-build/golden/torch}
python=${TOPIARY_TORCH_PYTHON:-/usr/bin/python3}
bin=$build/tests/test_torch

fail() {
  echo "FAIL test_torch_golden: $*"
  echo "0 passed, 1 failed"
  exit 1
}

[[ -x $bin ]] || fail "$bin is not built; run 'make $bin'"

stamp=$(sha256sum tools/torch_golden.py | cut -d' ' -f1)
fresh=1
[[ -f $dir/generator.sha256 && $(cat "$dir/generator.sha256") == "$stamp" ]] || fresh=0
for model in resnet18 resnet50 vit_torchvision vit_torchvision_linear vit_timm vit_dino; do
  [[ -f $dir/$model.safetensors && -f $dir/$model.golden.safetensors ]] || fresh=0
done

if [[ $fresh == 0 ]]; then
  "$python" -c 'import torch, torchvision' 2>/dev/null ||
    fail "$python cannot import torch and torchvision, so the golden fixtures cannot be" \
         "generated; install the Debian packages python3-torch and python3-torchvision"
  echo "generating golden fixtures in $dir"
  rm -f "$dir/generator.sha256"
  "$python" tools/torch_golden.py "$dir" || fail "tools/torch_golden.py $dir failed"
  echo "$stamp" >"$dir/generator.sha256"
fi

exec "$bin" --golden "$dir"
