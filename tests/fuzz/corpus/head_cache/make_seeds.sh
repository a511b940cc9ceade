#!/usr/bin/env bash
# Writes the seed inputs for fuzz_head_cache into this directory: a valid
# entry for the target's key and shape (2 classes x 3 features), the same
# entry with another key, and one with a 3 x 2 coef. Rerun it after changing
# the entry layout or the target's key.
set -eu
cd "$(dirname "$0")"
key=5f0c2b6a1e9d4c3b8a7f6e5d4c3b2a1908f7e6d5c4b3a29180f7e6d5c4b3a291

# Little-endian float64 bytes of 1, -1, 0.5, 2, 0, 0.25 (coef), 0, 1
# (intercept) and 0.75 (dense accuracy), as printf escapes.
values='\x00\x00\x00\x00\x00\x00\xf0\x3f\x00\x00\x00\x00\x00\x00\xf0\xbf'
values+='\x00\x00\x00\x00\x00\x00\xe0\x3f\x00\x00\x00\x00\x00\x00\x00\x40'
values+='\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xd0\x3f'
values+='\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xf0\x3f'
values+='\x00\x00\x00\x00\x00\x00\xe8\x3f'

# seed FILE KEY ROWS COLS: an entry whose coef has shape [ROWS, COLS].
seed() {
  local file=$1 stored_key=$2 rows=$3 cols=$4 digest header len
  digest=$({ printf "$values"; printf '20\0'; printf '10\0'; } | sha256sum | cut -d' ' -f1)
  header="{\"__metadata__\":{\"format\":\"topiary-head-cache\",\"format_version\":\"1\","
  header+="\"key\":\"$stored_key\",\"fit_images\":\"20\",\"eval_images\":\"10\","
  header+="\"content_sha256\":\"$digest\"},"
  header+="\"coef\":{\"dtype\":\"F64\",\"shape\":[$rows,$cols],\"data_offsets\":[0,48]},"
  header+="\"intercept\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[48,64]},"
  header+="\"dense_accuracy\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[64,72]}}"
  len=${#header}
  {
    for i in 0 1 2 3 4 5 6 7; do printf "\\x$(printf %02x $(((len >> (8 * i)) & 255)))"; done
    printf '%s' "$header"
    printf "$values"
  } >"$file"
}

seed valid.safetensors "$key" 2 3
seed other_key.safetensors "${key%?}0" 2 3
seed transposed.safetensors "$key" 3 2
