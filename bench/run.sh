#!/usr/bin/env bash
# Forward and forward+backward throughput of topiary and PyTorch side by side,
# in one run on this machine, plus the OpenBLAS sgemm rate for scale.
#
# usage: bench/run.sh [--quick] [--rounds R] [--iters I] [--batch N]
#   default: batch 32, 1 timed iteration (after a warm-up one) per process, 3 rounds
#   --quick: batch 8, 1 timed iteration, 1 round
#
# Each row runs topiary and PyTorch alternately, R rounds of one process
# each, and keeps the best figure of each side: on a shared machine other
# load only ever slows a run down, and alternating spreads it over both
# sides. CPU s is the least process CPU time (all threads, spinning
# included) of one batch, which that load disturbs less than the wall clock.
# Prints the load average before and after, then a markdown table;
# docs/benchmarks.md records a run and this command.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD:-build}
data=${TOPIARY_DATA_DIR:-data}
batch=32 iters=1 rounds=3
while (($#)); do
  case $1 in
    --quick) batch=8 iters=1 rounds=1 ;;
    --rounds) rounds=$2; shift ;;
    --iters) iters=$2; shift ;;
    --batch) batch=$2; shift ;;
    *) echo "usage: bench/run.sh [--quick] [--rounds R] [--iters I] [--batch N]" >&2; exit 2 ;;
  esac
  shift
done

make -s "$build/bench/bench_model" "$build/bench/bench_sgemm"
mkdir -p "$build/bench"
for arch in resnet50 vit_b_16; do
  [[ -f "$build/bench/$arch.safetensors" ]] ||
    /usr/bin/python3 bench/torch_bench.py export --arch "$arch" --out "$build/bench/$arch.safetensors"
done

field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
sgemm=$("$build/bench/bench_sgemm" | field gflops)
echo "OpenBLAS sgemm (2048^3): $sgemm GFLOP/s; batch $batch; $iters timed iterations x $rounds rounds;" \
  "$(nproc) cores; $(date -u '+%Y-%m-%d %H:%M UTC'); load average before: $(load)"
echo
echo "| model | px | pass | topiary img/s | PyTorch img/s | ratio | topiary GFLOP/s | % of sgemm |" \
  "topiary CPU s | PyTorch CPU s | topiary peak MiB | PyTorch peak MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"

# Prints the best (largest or, with min, smallest) of the numbers on stdin.
best() { sort -g | if [[ ${1:-max} = min ]]; then head -1; else tail -1; fi; }

row() {
  local label=$1 arch=$2 model=$3 size=$4 backward=$5
  local flag=() pass=forward ours="" theirs=""
  [[ $backward = 0 ]] || { flag=(--backward); pass=forward+backward; }
  for ((r = 0; r < rounds; r++)); do
    ours+=$("$build/bench/bench_model" --model "$model" --size "$size" --batch "$batch" \
      --iters "$iters" "${flag[@]}")$'\n'
    theirs+=$(/usr/bin/python3 bench/torch_bench.py run --arch "$arch" --size "$size" \
      --batch "$batch" --iters "$iters" "${flag[@]}")$'\n'
  done
  local a b g ca cb ma mb
  a=$(field images_per_s <<<"$ours" | best); b=$(field images_per_s <<<"$theirs" | best)
  g=$(field gflops <<<"$ours" | best)
  ca=$(field cpu_s <<<"$ours" | best min); cb=$(field cpu_s <<<"$theirs" | best min)
  ma=$(field peak_rss_mib <<<"$ours" | best); mb=$(field peak_rss_mib <<<"$theirs" | best)
  awk -v l="$label" -v s="$size" -v p="$pass" -v a="$a" -v b="$b" -v g="$g" -v r="$sgemm" \
    -v ca="$ca" -v cb="$cb" -v ma="$ma" -v mb="$mb" \
    'BEGIN { printf "| %s | %s | %s | %.2f | %.2f | %.2f | %.1f | %.0f%% | %.2f | %.2f | %s | %s |\n",
             l, s, p, a, b, a / b, g, 100 * g / r, ca, cb, ma, mb }'
}
mnv2="$data/models/nsfwjs/mobilenet_v2/model.json"
for backward in 0 1; do
  row "MobileNetV2 (nsfwjs)" mobilenet_v2 "$mnv2" 112 $backward
  row "MobileNetV2 (nsfwjs)" mobilenet_v2 "$mnv2" 224 $backward
  row "ResNet-50 (random)" resnet50 "$build/bench/resnet50.safetensors" 224 $backward
  row "ViT-B/16 (random)" vit_b_16 "$build/bench/vit_b_16.safetensors" 224 $backward
done
echo
echo "load average after: $(load)"
