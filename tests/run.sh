#!/usr/bin/env bash
# Runs every test binary in $BUILD/tests and every tests/test_*.sh script,
# adds up their "N passed, M failed" lines and prints the total last.
# A binary that crashes or prints no summary counts as one failed test.
# VALGRIND=1 runs the binaries under valgrind memcheck.
# TEST_FILTER=regex runs only the tests whose file name matches.
set -u
cd "$(dirname "$0")/.."
build=${BUILD:-build}
# The same OpenMP wait policy that topiary sets for itself (server/runtime.h).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
passed=0 failed=0
failed_names=()

run_one() {
  local name=$1; shift
  local log
  log=$(mktemp)
  "$@" >"$log" 2>&1
  local rc=$?
  local line
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
  if [[ -z "$line" ]]; then
    echo "FAIL $name: exit code $rc and no summary line"
    tail -n 30 "$log"
    failed=$((failed + 1)); failed_names+=("$name")
  else
    local p f
    p=$(echo "$line" | awk '{print $1}')
    f=$(echo "$line" | awk '{print $3}')
    passed=$((passed + p)); failed=$((failed + f))
    if [[ $f -gt 0 || $rc -ne 0 ]]; then
      grep -E '^(FAIL|  )' "$log" | head -n 60
      [[ $f -gt 0 ]] || { failed=$((failed + 1)); echo "FAIL $name: exit code $rc"; }
      failed_names+=("$name")
    fi
    echo "$name: $line"
  fi
  rm -f "$log"
}

for bin in "$build"/tests/test_*; do
  [[ -x "$bin" ]] || continue
  name=$(basename "$bin")
  [[ -z "${TEST_FILTER:-}" || "$name" =~ $TEST_FILTER ]] || continue
  if [[ "${VALGRIND:-0}" = 1 ]]; then
    run_one "$name" valgrind --quiet --error-exitcode=99 --leak-check=full "$bin"
  else
    run_one "$name" "$bin"
  fi
done
for script in tests/test_*.sh; do
  [[ -f "$script" ]] || continue
  name=$(basename "$script")
  [[ -z "${TEST_FILTER:-}" || "$name" =~ $TEST_FILTER ]] || continue
  run_one "$name" bash "$script"
done

[[ ${#failed_names[@]} -eq 0 ]] || echo "failing: ${failed_names[*]}"
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
