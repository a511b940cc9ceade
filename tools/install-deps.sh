#!/usr/bin/env bash
# Installs the Debian packages listed in tools/deps/<set>.txt that are missing.
# usage: tools/install-deps.sh [build] [runtime] [test]   (default: build test)
# Needs root (or sudo) only when something is missing. Node.js and npm come
# from Debian's nodejs and npm packages unless a node is already on PATH.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sets=("$@")
[[ ${#sets[@]} -gt 0 ]] || sets=(build test)

wanted=()
for set in "${sets[@]}"; do
  file="$here/deps/$set.txt"
  [[ -f "$file" ]] || { echo "install-deps: no package list $file (known: build, runtime, test)" >&2; exit 2; }
  while read -r pkg; do wanted+=("$pkg"); done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$file")
done
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  wanted+=(nodejs npm)
fi

missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#wanted[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
