#!/usr/bin/env bash
# The embedded migrations (server/migrations_gen.c) must match the .sql files
# in migrations/; regenerate with tools/embed-migrations.sh when this fails.
set -u
cd "$(dirname "$0")/.."
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
if bash tools/embed-migrations.sh "$tmp" && cmp -s "$tmp" server/migrations_gen.c; then
  echo "ok   migrations embedded in sync"
  echo "1 passed, 0 failed"
else
  echo "FAIL migrations embedded in sync: server/migrations_gen.c differs from migrations/*.sql;"
  echo "  run tools/embed-migrations.sh and commit the result"
  diff "$tmp" server/migrations_gen.c | head -20
  echo "0 passed, 1 failed"
  exit 1
fi
