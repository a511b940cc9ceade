#!/usr/bin/env bash
# Wall time and peak memory of topiary's pruning methods next to the same
# algorithms written with PyTorch (bench/prune_torch.py), in one run on this
# machine, plus the OpenBLAS sgemm rate for scale.
#
# usage: bench/prune_bench.sh [--quick]
#   default: the rows below (about 22 minutes on 2 busy cores)
#   --quick: MobileNetV2 only, 32 calibration images (16 for the BN row), and
#            an obs row with a 256 MiB budget that both sides reject
#
# Each row runs `topiary prune` and then `prune_torch.py` once, with the same
# method, sparsity 0.5, calibration images (Fashion-MNIST), a small
# evaluation task (Fashion-MNIST test, 10 head-fit and 10 scored images) and
# batch 16. Method rows turn the batch-norm correction off; the "+ bn" row
# runs magnitude with the default correction (match-dense), whose cost does
# not depend on the method. Seconds are the in-process total of the stages
# (topiary's report timings_s.total; the same stages in prune_torch.py),
# without process start-up; the stage table also lists the process wall
# time. Peak MiB is the peak resident set of the process, from
# getrusage(RUSAGE_CHILDREN) around it. ratio = PyTorch s / topiary s, so
# above 1 topiary is faster. Both sides run 2 threads with
# OMP_WAIT_POLICY=PASSIVE, which topiary sets for itself.
# docs/benchmarks.md records a run and this command.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD:-build}
data=${TOPIARY_DATA_DIR:-data}
quick=0
while (($#)); do
  case $1 in
    --quick) quick=1 ;;
    *) echo "usage: bench/prune_bench.sh [--quick]" >&2; exit 2 ;;
  esac
  shift
done

# Row: arch method calibration-images bn-correction obs-memory-MiB
if ((quick)); then
  rows=(
    "mobilenet_v2 magnitude 32 none 4096"
    "mobilenet_v2 obd 32 none 4096"
    "mobilenet_v2 obs 32 none 4096"
    "mobilenet_v2 obs 32 none 256"
    "mobilenet_v2 layer_obs 32 none 4096"
    "mobilenet_v2 magnitude 16 match-dense 4096"
  )
else
  rows=(
    "mobilenet_v2 magnitude 512 none 4096"
    "mobilenet_v2 obd 512 none 4096"
    "mobilenet_v2 obs 512 none 4096"
    "mobilenet_v2 obs 256 none 4096"
    "mobilenet_v2 layer_obs 64 none 4096"
    "mobilenet_v2 magnitude 32 match-dense 4096"
    "resnet50 magnitude 512 none 4096"
    "resnet50 obd 32 none 4096"
    "resnet50 obs 512 none 4096"
    "resnet50 obs 16 none 4096"
    "resnet50 layer_obs 16 none 4096"
    "resnet50 magnitude 8 match-dense 4096"
  )
fi

# Set-up: the models, the data and the binaries, each only when missing, so
# that a run does not rebuild files that others are editing.
[[ -f $data/models/nsfwjs/mobilenet_v2/model.json ]] || bash tools/fetch-models.sh
fm=$data/datasets/fashion-mnist
[[ -f $fm/train-images-idx3-ubyte.gz ]] || bash tools/fetch-data.sh
[[ -x ./topiary ]] || make -s topiary
[[ -x $build/bench/bench_sgemm ]] || make -s "$build/bench/bench_sgemm"
mkdir -p "$build/bench"
[[ -f $build/bench/resnet50.safetensors ]] ||
  /usr/bin/python3 bench/torch_bench.py export --arch resnet50 --out "$build/bench/resnet50.safetensors"
calibration="idx:$fm/train-images-idx3-ubyte.gz,$fm/train-labels-idx1-ubyte.gz"
evaluation="idx:$fm/t10k-images-idx3-ubyte.gz,$fm/t10k-labels-idx1-ubyte.gz"
declare -A model_file=(
  [mobilenet_v2]=$data/models/nsfwjs/mobilenet_v2/model.json
  [resnet50]=$build/bench/resnet50.safetensors
)
declare -A model_label=([mobilenet_v2]="MobileNetV2 (nsfwjs)" [resnet50]="ResNet-50 (random)")
export OMP_WAIT_POLICY=PASSIVE
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# Runs a command with stdout and stderr to files; prints its exit code, wall
# seconds and peak resident MiB.
measure() {
  /usr/bin/python3 -c '
import resource, subprocess, sys, time
t0 = time.perf_counter()
with open(sys.argv[1], "wb") as so, open(sys.argv[2], "wb") as se:
    rc = subprocess.call(sys.argv[3:], stdout=so, stderr=se)
wall = time.perf_counter() - t0
print(rc, "%.2f" % wall, round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
' "$@"
}

load() { cut -d' ' -f1-3 /proc/loadavg; }
sgemm=$("$build/bench/bench_sgemm" | jq -r .gflops)
echo "OpenBLAS sgemm (2048^3): $sgemm GFLOP/s; $(nproc) cores;" \
  "$(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD);" \
  "load average before: $(load)"
echo

# Prints the stage seconds of a report as table cells.
stages() {
  jq -r '[.timings_s | .dense_features, .saliency, .mask, .update, .bn_recalibration,
          .total] | map(. * 100 | round / 100) | join(" | ")' "$1"
}

table="| model | method | calibration images | BN correction | topiary s | PyTorch s | ratio |"
table+=" topiary peak MiB | PyTorch peak MiB |"$'\n'"|---|---|---|---|---|---|---|---|---|"
detail="| model | method | images | side | dense features | saliency | mask | update |"
detail+=" bn correction | total | process wall s | status |"$'\n'"|---|---|---|---|---|---|---|---|---|---|---|---|"
for row in "${rows[@]}"; do
  read -r arch method images bn budget <<<"$row"
  label=${model_label[$arch]}
  name=$method
  [[ $bn = none ]] || name="$method + bn"
  ((budget == 4096)) || name="$name (budget $budget MiB)"
  bn_flag=()
  [[ $bn = none ]] && bn_flag=(--bn-correction none)

  read -r rc_a wall_a peak_a < <(measure "$out/a.json" "$out/a.err" ./topiary prune \
    --model "${model_file[$arch]}" --method "$method" --sparsity 0.5 \
    --calibration "$calibration" --calibration-split "$images,200" \
    --eval "$evaluation" --eval-split 10,10 --obs-memory "$budget" "${bn_flag[@]}")
  read -r rc_b wall_b peak_b < <(measure "$out/b.json" "$out/b.err" /usr/bin/python3 \
    bench/prune_torch.py --arch "$arch" --method "$method" --data "$data" --images "$images" \
    --fit-images 200 --eval-images 10 --bn-correction "$bn" --obs-memory "$budget")

  if ((rc_a == 0)); then
    total_a=$(jq -r '.timings_s.total * 100 | round / 100' "$out/a.json")
    detail+=$'\n'"| $label | $name | $images | topiary | $(stages "$out/a.json") | $wall_a | ok |"
  else
    total_a="rejected"
    reason=$(grep -m1 'topiary prune:' "$out/a.err" | sed 's/^topiary prune: //' || true)
    detail+=$'\n'"| $label | $name | $images | topiary | | | | | | | $wall_a | exit $rc_a: $reason |"
  fi
  status_b=$(jq -r '.status // "failed"' "$out/b.json" 2>/dev/null || echo failed)
  if [[ $rc_b = 0 && $status_b = ok ]]; then
    total_b=$(jq -r '.timings_s.total * 100 | round / 100' "$out/b.json")
    detail+=$'\n'"| $label | $name | $images | PyTorch | $(stages "$out/b.json") | $wall_b | ok |"
  elif [[ $rc_b = 0 ]]; then
    total_b="rejected"
    detail+=$'\n'"| $label | $name | $images | PyTorch | | | | | | | $wall_b | $(jq -r .message "$out/b.json") |"
  else
    total_b="failed"
    detail+=$'\n'"| $label | $name | $images | PyTorch | | | | | | | $wall_b | exit $rc_b: $(tail -1 "$out/b.err") |"
  fi
  ratio=n/a
  [[ $total_a = rejected || $total_b =~ ^[a-z] ]] ||
    ratio=$(awk -v a="$total_a" -v b="$total_b" 'BEGIN { printf "%.2f", b / a }')
  table+=$'\n'"| $label | $name | $images | $bn | $total_a | $total_b | $ratio | $peak_a | $peak_b |"
  echo "done: $label $name $images ($(date -u +%H:%M:%S), load $(load))" >&2
done

echo "$table"
echo
echo "$detail"
echo
echo "load average after: $(load)"
