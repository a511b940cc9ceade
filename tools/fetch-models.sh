#!/usr/bin/env bash
# Fetches the nsfwjs@4.4.0 Keras models (MobileNetV2, InceptionV3) from the
# npm registry and unwraps them into standard TF.js layers models:
#
#   $TOPIARY_DATA_DIR/models/nsfwjs/<name>/model.json
#   $TOPIARY_DATA_DIR/models/nsfwjs/<name>/group1-shardNofM.bin
#   $TOPIARY_DATA_DIR/models/nsfwjs/<name>/labels.txt  (the 5 class names)
#
# TOPIARY_DATA_DIR defaults to data/ in the repository root. Every output file
# is checked against the sha256 recorded below. A run whose files already
# match does nothing, so the script is safe to run again. Needs bash, npm,
# node, tar and sha256sum. Exits non-zero with a message on any failure.
set -euo pipefail

PACKAGE=nsfwjs@4.4.0
MODELS=(mobilenet_v2 inception_v3)

# sha256 of each output file, relative to models/nsfwjs/.
declare -A SHA256=(
  [mobilenet_v2/model.json]=bfdf31de4f26b977a771a60eb1f26ed6e52c71a2889ee1d81e36b28d375599be
  [mobilenet_v2/group1-shard1of1.bin]=8e7dddbb16acacc1bf1601b1b8a761e730ff934b7f2d7771312b2f000e5f5f13
  [inception_v3/model.json]=a89a44c028ab4d37ec9773ae6a57c188f9938a70cc3e9616b5989456e3820a47
  [inception_v3/group1-shard1of6.bin]=7a3a4c075cfcaa7f0b095f55b2ba54a288c2f770e504c8537394efda9545994b
  [inception_v3/group1-shard2of6.bin]=8826da12bda0db9415aef0e6a8d1f178a0d950deab28c4e79b9da994748702a4
  [inception_v3/group1-shard3of6.bin]=4557a96cf87ceb8df6c9647b647ac9843251a4455457cb40f35c02250a63e51c
  [inception_v3/group1-shard4of6.bin]=399b99397ccd64351b59f04cdabe30000a15494c82f75c1e2ccb41c9b6338b7d
  [inception_v3/group1-shard5of6.bin]=994515b0f73407d71740301e9877511b086609dbdc7ead1b31bcb82b3397ae74
  [inception_v3/group1-shard6of6.bin]=cfb856c9d8fcefacca87b6063ed4949adf69f0372407d6edca8cec0c1694a28b
)

die() {
  echo "fetch-models.sh: $*" >&2
  exit 1
}

for tool in npm node tar sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is not installed; install it (Debian: apt-get install nodejs npm coreutils tar) and run again"
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data_dir=${TOPIARY_DATA_DIR:-$repo_root/data}
mkdir -p "$data_dir" || die "cannot create the data directory $data_dir"
dest=$(cd "$data_dir" && pwd)/models/nsfwjs

# Prints the files of one model whose sha256 is missing or wrong.
stale_files() {
  local model=$1 file
  for file in "${!SHA256[@]}"; do
    [[ $file == "$model"/* ]] || continue
    if [[ ! -f $dest/$file ]] ||
       [[ $(sha256sum "$dest/$file" | cut -d' ' -f1) != "${SHA256[$file]}" ]]; then
      echo "$file"
    fi
  done
}

# The class names of the nsfwjs head, in output order (from the package's
# documentation); `topiary forward` prints them from labels.txt.
write_labels() {
  printf '%s\n' Drawing Hentai Neutral Porn Sexy >"$dest/$1/labels.txt"
}

todo=()
for model in "${MODELS[@]}"; do
  if [[ -z $(stale_files "$model") ]]; then
    write_labels "$model"
    echo "$dest/$model: up to date (sha256 verified)"
  else
    todo+=("$model")
  fi
done
[[ ${#todo[@]} -eq 0 ]] && exit 0

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "fetching $PACKAGE with npm pack"
(cd "$tmp" && npm pack --silent "$PACKAGE" >/dev/null) ||
  die "npm pack $PACKAGE failed; check that the npm registry is reachable"
tarball=$(ls "$tmp"/nsfwjs-*.tgz 2>/dev/null | head -n 1)
[[ -n $tarball ]] || die "npm pack $PACKAGE produced no tarball"
tar -xzf "$tarball" -C "$tmp" package/dist/models ||
  die "$tarball has no dist/models folder"

for model in "${todo[@]}"; do
  src=$tmp/package/dist/models/$model
  [[ -f $src/model.min.js ]] || die "$PACKAGE has no dist/models/$model/model.min.js"
  # Unwrap into a staging folder, verify, then move the files into place.
  stage=$tmp/out/$model
  node "$repo_root/tools/tfjs/unwrap.js" "$src" "$stage" ||
    die "unwrapping $model failed"
  for file in "${!SHA256[@]}"; do
    [[ $file == "$model"/* ]] || continue
    name=${file#"$model"/}
    [[ -f $stage/$name ]] || die "$model: the unwrapped model has no $name"
    got=$(sha256sum "$stage/$name" | cut -d' ' -f1)
    [[ $got == "${SHA256[$file]}" ]] ||
      die "$model/$name: sha256 $got, expected ${SHA256[$file]}; the package or unwrap.js changed"
  done
  extra=$(cd "$stage" && ls | grep -v -x -F -f <(printf '%s\n' "${!SHA256[@]}" | sed -n "s|^$model/||p") || true)
  [[ -z $extra ]] || die "$model: unexpected files from unwrap.js: $extra"
  mkdir -p "$dest/$model"
  mv -f "$stage"/* "$dest/$model/"
  write_labels "$model"
  echo "$dest/$model: written $(ls "$dest/$model" | tr '\n' ' ')(sha256 verified)"
done
