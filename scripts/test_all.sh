#!/usr/bin/env bash
# `make test`: the whole suite in three streams on the CI machine's two cores. Usage: scripts/test_all.sh HOST_PYTHON DEVICE_PYTHON
#
#   1. the device suite's two bundles, built by the host venv (scripts/test_device.sh --bundles-only);
#   2. three streams at once: A, the host suite without tests/fleet, tests/conversion and tests/bench and without
#      the device suite's tests/device and tests/service but for the few that need host packages; B, tests/fleet,
#      then the device suite's tests/device (torch-free venv); C, tests/conversion, tests/bench, then the device
#      suite's tests/service (torch-free venv).
# The two cores are busy the whole run (vmstat, 2026-12-08 CI: 0 % idle from the first minute to the last),
# so the wall time follows the total work: the streams only decide who waits at the end. tests/fleet mostly wait
# (a real Flower SuperNode polls its SuperLink every 3 seconds, a constant in Flower), so stream B takes work
# after them. 2026-12-08 CIs, fresh clone: A 869 s, B (fleet) 617 s, C (conversions, then the whole device
# suite) 647 + 248 s; then A 830 s, B (fleet, then the device suite) 641 + 252 s, C 752 s.
# Streams B's and C's output follow A's.
set -u
HOST=${1:?usage: scripts/test_all.sh HOST_PYTHON DEVICE_PYTHON}
DEVICE=${2:?usage: scripts/test_all.sh HOST_PYTHON DEVICE_PYTHON}
cd "$(dirname "$0")/.."
mkdir -p build
start=$(date +%s)
bash scripts/test_device.sh "$HOST" "$DEVICE" --bundles-only || { echo "building the device suite's bundles failed"; exit 1; }
echo "device suite's bundles built in $(( $(date +%s) - start )) s"
# the host streams take the same audio and text bundles (each pytest session would otherwise train and export
# its own: ~1 min of CPU for audio, 30-45 s for text, on cores that every stream keeps busy)
[ -d build/test-audio-bundle ] && export EDGEXFER_TEST_AUDIO_BUNDLE=$PWD/build/test-audio-bundle
export EDGEXFER_TEST_TEXT_BUNDLE=$PWD/build/test-text-bundle

# stream B: tests/fleet (mostly waiting on Flower's polls), then the device suite's tests/device in the torch-free venv
log=build/test-fleet-device.log
(
  "$HOST" -m pytest -q --durations=10 tests/fleet; frc=$?
  echo "---------------- fleet done after $(( $(date +%s) - start )) s; the device suite (torch-free venv) ----------------"
  bash scripts/test_device.sh "$HOST" "$DEVICE" --tests-only device; drc=$?
  echo "device suite done after $(( $(date +%s) - start )) s (fleet exit $frc, device exit $drc)"
  [ "$frc" -ne 5 ] && [ "$frc" -eq 0 ] && [ "$drc" -eq 0 ]
) >"$log" 2>&1 &
fleet=$!
# stream C: the conversion tests (CPU-bound, but not timing-sensitive), then tests/bench, then the device suite's
# tests/service in the torch-free venv
side=build/test-conversion-bench-service.log
(
  "$HOST" -m pytest -q --durations=10 tests/conversion; crc=$?
  echo "---------------- conversions done after $(( $(date +%s) - start )) s; tests/bench ----------------"
  "$HOST" -m pytest -q --durations=10 tests/bench; brc=$?
  echo "---------------- tests/bench done after $(( $(date +%s) - start )) s; tests/service (torch-free venv) ----------------"
  bash scripts/test_device.sh "$HOST" "$DEVICE" --tests-only service; src_=$?
  echo "tests/service done after $(( $(date +%s) - start )) s (conversions exit $crc, bench exit $brc, service exit $src_)"
  [ "$crc" -ne 5 ] && [ "$crc" -eq 0 ] && [ "$brc" -ne 5 ] && [ "$brc" -eq 0 ] && [ "$src_" -eq 0 ]
) >"$side" 2>&1 &
conv=$!
trap 'kill $fleet $conv 2>/dev/null' INT TERM

# tests/device and tests/service run in the device venv; of them the host venv runs only what needs its packages
# (selenium for the page and browser tests, openvino for the engine store), not all ~480 twice
host_args=(tests/test_*.py)
for dir in tests/*/; do
  case "$dir" in tests/fleet/|tests/device/|tests/service/|tests/conversion/|tests/bench/|tests/__pycache__/) ;; *) host_args+=("$dir") ;; esac
done
host_args+=(tests/service/test_page.py tests/device/test_engine_store.py
            tests/service/test_serve_origin.py::test_a_page_from_another_site_cannot_change_the_device_in_chromium)
"$HOST" -m pytest -q --durations=20 "${host_args[@]}"
rc=$?
echo "---------------- host suite done after $(( $(date +%s) - start )) s; waiting for the other two streams ----------------"
wait $conv
src=$?
wait $fleet
frc=$?
echo "---------------- tests/conversion, tests/bench, then tests/service (ran beside; $side) ----------------"
cat "$side"
echo "---------------- tests/fleet, then tests/device (ran beside; $log) ----------------"
cat "$log"
echo "whole suite: $(( $(date +%s) - start )) s"
# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code
for code in $rc $frc; do
  if [ "$code" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
done
[ "$rc" -eq 0 ] && [ "$src" -eq 0 ] && [ "$frc" -eq 0 ]
