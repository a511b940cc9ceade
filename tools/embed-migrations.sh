#!/usr/bin/env bash
# Generates server/migrations_gen.c from migrations/NNNN_name.sql so that the
# binary carries its schema and finds it regardless of the working directory.
# The .sql files are the source of truth: edit them, rerun this script and
# commit both. tests/test_migrations_sync.sh fails when the two disagree.
# usage: tools/embed-migrations.sh [OUTPUT]   (default server/migrations_gen.c)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-server/migrations_gen.c}

files=()
for f in migrations/[0-9][0-9][0-9][0-9]_*.sql; do
  [[ -f "$f" ]] || continue
  files+=("$f")
done
[[ ${#files[@]} -gt 0 ]] || { echo "embed-migrations: no migrations/NNNN_name.sql files" >&2; exit 1; }

{
  echo "/* Generated from migrations/NNNN_name.sql by tools/embed-migrations.sh; do not edit. */"
  echo '#include "store.h"'
  echo
  echo "static const store_migration migrations[] = {"
  prev=0
  for f in "${files[@]}"; do
    base=$(basename "$f" .sql)
    version=$((10#${base%%_*}))
    name=${base#*_}
    if [[ $version -le $prev ]]; then
      echo "embed-migrations: $f: version $version is not above the previous $prev" >&2
      exit 1
    fi
    if [[ ! $name =~ ^[a-z0-9_]+$ ]]; then
      echo "embed-migrations: $f: name '$name' must be lower-case letters, digits and _" >&2
      exit 1
    fi
    if [[ ! -s "$f" ]]; then
      echo "embed-migrations: $f is empty" >&2
      exit 1
    fi
    prev=$version
    echo "    {$version, \"$name\","
    # One C string literal per line; escape backslashes, quotes and tabs. The
    # closing brace joins the last line, as clang-format would place it.
    sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/\\t/g' -e 's/^/     "/' -e 's/$/\\n"/' \
      -e '$ s/$/},/' "$f"
  done
  echo "};"
  echo
  echo "const store_migration *store_migrations(size_t *count)"
  echo "{"
  echo "    *count = sizeof migrations / sizeof migrations[0];"
  echo "    return migrations;"
  echo "}"
} >"$out.tmp"
mv "$out.tmp" "$out"
