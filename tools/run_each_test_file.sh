#!/usr/bin/env bash
# Run every test file alone, each in a fresh pytest process (and so in its own random order):
# a file that passes only after another one ran shows here. Prints each file's time and the
# total; exits non-zero if any file failed. Usage: bash tools/run_each_test_file.sh [pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
start=$SECONDS
for file in tests/test_*.py tests/*/test_*.py; do
  t0=$SECONDS
  if python -m pytest -q -p no:cacheprovider "$@" "$file" > /tmp/run_each_test_file.log 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$file")
    tail -n 30 /tmp/run_each_test_file.log
  fi
  printf '%-45s %4d s  %s\n' "$file" $((SECONDS - t0)) "$status"
done
echo "all files alone: $((SECONDS - start)) s, ${#failed[@]} failed ${failed[*]:-}"
[ ${#failed[@]} -eq 0 ]
