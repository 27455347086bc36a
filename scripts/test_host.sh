#!/usr/bin/env bash
# The host suite: `make test-host`. Usage: scripts/test_host.sh PYTHON
#
# tests/fleet run in a second pytest beside the rest: a real Flower SuperNode polls its SuperLink every
# 3 seconds (a constant in Flower), so a federation's rounds are mostly waiting, not computing. Beside the
# CPU-bound rest they cost little wall time; after it they cost minutes. Their output follows the rest's.
set -u
PY=${1:?usage: scripts/test_host.sh PYTHON}
cd "$(dirname "$0")/.."
mkdir -p build
log=build/test-host-fleet.log
"$PY" -m pytest -q --durations=10 tests/fleet >"$log" 2>&1 &
fleet=$!
trap 'kill $fleet 2>/dev/null' INT TERM
"$PY" -m pytest -q --durations=20 tests --ignore=tests/fleet
rc=$?
wait $fleet
frc=$?
echo "---------------- tests/fleet (ran beside the rest; $log) ----------------"
cat "$log"
# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code
for code in $rc $frc; do
  if [ "$code" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
done
[ "$rc" -eq 0 ] && [ "$frc" -eq 0 ]
