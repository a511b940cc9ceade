#!/usr/bin/env bash
# Forward and forward+backward throughput of topiary and PyTorch side by side,
# in one run on this machine, plus the OpenBLAS sgemm rate for scale.
# usage: bench/run.sh [--quick]   (--quick: batch 8, one timed iteration)
# Prints a markdown table; docs/benchmarks.md records a run and this command.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD:-build}
data=${TOPIARY_DATA_DIR:-data}
batch=32 iters=2
[[ "${1:-}" != --quick ]] || { batch=8; iters=1; }

make -s "$build/bench/bench_model" "$build/bench/bench_sgemm"
mkdir -p "$build/bench"
for arch in resnet50 vit_b_16; do
  [[ -f "$build/bench/$arch.safetensors" ]] ||
    /usr/bin/python3 bench/torch_bench.py export --arch "$arch" --out "$build/bench/$arch.safetensors"
done

field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
sgemm=$("$build/bench/bench_sgemm" | field gflops)
echo "OpenBLAS sgemm (2048^3): $sgemm GFLOP/s; batch $batch; $(nproc) cores; $(date -u +%Y-%m-%d)"
echo
echo "| model | px | pass | topiary img/s | PyTorch img/s | ratio | topiary GFLOP/s | % of sgemm | topiary peak MiB | PyTorch peak MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|"
row() {
  local label=$1 arch=$2 model=$3 size=$4 backward=$5
  local flag=() pass=forward
  [[ $backward = 0 ]] || { flag=(--backward); pass=forward+backward; }
  local ours theirs
  ours=$("$build/bench/bench_model" --model "$model" --size "$size" --batch "$batch" --iters "$iters" "${flag[@]}")
  theirs=$(/usr/bin/python3 bench/torch_bench.py run --arch "$arch" --size "$size" --batch "$batch" --iters "$iters" "${flag[@]}")
  local a b g ma mb
  a=$(echo "$ours" | field images_per_s); b=$(echo "$theirs" | field images_per_s)
  g=$(echo "$ours" | field gflops)
  ma=$(echo "$ours" | field peak_rss_mib); mb=$(echo "$theirs" | field peak_rss_mib)
  awk -v l="$label" -v s="$size" -v p="$pass" -v a="$a" -v b="$b" -v g="$g" -v r="$sgemm" -v ma="$ma" -v mb="$mb" \
    'BEGIN { printf "| %s | %s | %s | %.2f | %.2f | %.2f | %.1f | %.0f%% | %s | %s |\n", l, s, p, a, b, a / b, g, 100 * g / r, ma, mb }'
}
mnv2="$data/models/nsfwjs/mobilenet_v2/model.json"
for backward in 0 1; do
  row "MobileNetV2 (nsfwjs)" mobilenet_v2 "$mnv2" 112 $backward
  row "MobileNetV2 (nsfwjs)" mobilenet_v2 "$mnv2" 224 $backward
  row "ResNet-50 (random)" resnet50 "$build/bench/resnet50.safetensors" 224 $backward
  row "ViT-B/16 (random)" vit_b_16 "$build/bench/vit_b_16.safetensors" 224 $backward
done
