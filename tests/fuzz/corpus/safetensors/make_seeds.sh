#!/usr/bin/env bash
# Writes the seed inputs for fuzz_safetensors into this directory: small
# valid safetensors files covering metadata, every dtype, a scalar, an empty
# tensor and an unpadded header. Rerun it after changing a seed.
set -eu
cd "$(dirname "$0")"

# seed FILE HEADER DATA_HEX: the 8-byte little-endian header length, the
# header and the data given as hex bytes.
seed() {
  local file=$1 header=$2 data=$3 len=${#2}
  {
    for i in 0 1 2 3 4 5 6 7; do printf "\\x$(printf %02x $(((len >> (8 * i)) & 255)))"; done
    printf '%s' "$header"
    for byte in $data; do printf "\\x$byte"; done
  } >"$file"
}

# A PyTorch-style 2x3 linear layer: header padded with spaces to a multiple
# of 8 bytes.
header='{"__metadata__":{"format":"pt"},"fc.bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"fc.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[8,32]}}'
while ((${#header} % 8)); do header+=' '; done
seed linear.safetensors "$header" \
  "00 00 00 3f 00 00 80 bf 00 00 80 3f 00 00 00 40 00 00 40 40 00 00 80 c0 00 00 80 3e 6f 12 83 3a"

# One two-element tensor per dtype, offsets in dtype order, header unpadded.
header='{' offset=0 data=''
for spec in F64:8 F32:4 F16:2 BF16:2 I64:8 I32:4 I16:2 I8:1 U64:8 U32:4 U16:2 U8:1 BOOL:1; do
  dtype=${spec%:*} size=${spec#*:}
  [[ $header == '{' ]] || header+=','
  header+="\"t.$dtype\":{\"dtype\":\"$dtype\",\"shape\":[2],\"data_offsets\":[$offset,$((offset + 2 * size))]}"
  offset=$((offset + 2 * size))
  for ((i = 0; i < 2 * size; i++)); do data+=" $(printf %02x $(((i * 37 + size) & 255)))"; done
done
seed every_dtype.safetensors "$header}" "$data"

seed scalar_and_empty.safetensors \
  '{"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0,4],"data_offsets":[8,8]}}' \
  "00 00 00 00 00 00 d8 bf"

seed no_tensors.safetensors '{}' ''
