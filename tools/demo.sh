#!/usr/bin/env bash
# The README's first command (`make demo`): installs the Debian packages,
# fetches the real nsfwjs models and the data sets, builds topiary, and shows
# what the engine does on real input today: the imported MobileNetV2 and
# InceptionV3 (graph, parameters, FLOPs) and their predictions on real photos.
# Safe to run again: every step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${TOPIARY_DATA_DIR:-data}

bash tools/install-deps.sh build test
bash tools/fetch-models.sh
bash tools/fetch-data.sh
make -s -j"$(nproc)" topiary

photos=()
for name in dog eagle giraffe horses kite person scream; do
  photos+=(--image "$data/datasets/photos/$name.jpg")
done
for model in mobilenet_v2 inception_v3; do
  echo
  echo "== nsfwjs $model =="
  ./topiary inspect --model "$data/models/nsfwjs/$model"
  echo
  ./topiary forward --model "$data/models/nsfwjs/$model" --top 2 "${photos[@]}"
done
