#!/usr/bin/env bash
# The device suite: the runtime tests again, in the torch-free device venv, against an image and a text
# bundle the host venv builds. Usage: scripts/test_device.sh HOST_PYTHON DEVICE_PYTHON [--bundles-only|--tests-only [PART]]
#
# `make test-device` runs both steps; `make test` (scripts/test_all.sh) builds the bundles first and runs
# the tests in two parts beside the host suite: PART "device" (tests/device, the boundaries, the fleet's
# device side) and "service" (tests/service); without PART, both.
set -u
HOST=${1:?usage: scripts/test_device.sh HOST_PYTHON DEVICE_PYTHON [--bundles-only|--tests-only]}
DEVICE=${2:?usage: scripts/test_device.sh HOST_PYTHON DEVICE_PYTHON [--bundles-only|--tests-only]}
STEP=${3:-all}
PART=${4:-all}
cd "$(dirname "$0")/.."
BUNDLE=build/test-bundle
TEXT_BUNDLE=build/test-text-bundle
AUDIO_BUNDLE=build/test-audio-bundle
# spoken14 beside the clone (CI puts shared/ there); the audio bundle is trained without "zero", which the
# device tests learn from five recordings (tests/conftest.py AUDIO_NEW_WORD)
SPOKEN14=${EDGEXFER_SPOKEN14:-$PWD/../shared/datasets/spoken14}
# the device side of signed updates and of fleet learning (merge, local rounds), run without torch as a device runs it
FLEET_TESTS="tests/fleet/test_updates.py tests/fleet/test_update_health.py tests/fleet/test_holdout.py tests/fleet/test_federated.py tests/fleet/test_text_updates.py tests/fleet/test_audio_updates.py"

if [ "$STEP" != "--tests-only" ]; then
  mkdir -p build
  rm -rf build/test-run "$BUNDLE" build/test-text-run "$TEXT_BUNDLE"
  edgexfer() { "$HOST" -m edgexfer "$@" --quiet >/dev/null; }
  edgexfer train data/clipart8-demo --out build/test-run --cache build/test-cache.sqlite || exit 1
  edgexfer export build/test-run --out "$BUNDLE" || exit 1
  edgexfer train data/fortunes-demo --out build/test-text-run --cache build/test-cache.sqlite || exit 1
  edgexfer export build/test-text-run --out "$TEXT_BUNDLE" || exit 1
  rm -rf build/spoken13 build/test-audio-run "$AUDIO_BUNDLE"
  if [ -d "$SPOKEN14/train" ]; then
    mkdir -p build/spoken13
    for d in "$SPOKEN14"/train/*/; do [ "$(basename "$d")" = zero ] || ln -s "$(cd "$d" && pwd)" build/spoken13/; done
    edgexfer train build/spoken13 --backbone speech_embedding --out build/test-audio-run --cache build/test-cache.sqlite || exit 1
    edgexfer export build/test-audio-run --out "$AUDIO_BUNDLE" || exit 1
  fi
fi
[ "$STEP" = "--bundles-only" ] && exit 0

# shellcheck disable=SC2086
[ -d "$AUDIO_BUNDLE" ] && export EDGEXFER_TEST_AUDIO_BUNDLE=$PWD/$AUDIO_BUNDLE
case "$PART" in
  device) TESTS="tests/device tests/test_boundaries.py $FLEET_TESTS" ;;
  service) TESTS="tests/service" ;;
  all) TESTS="tests/device tests/service tests/test_boundaries.py $FLEET_TESTS" ;;
  *) echo "unknown part $PART: device, service or all"; exit 2 ;;
esac
EDGEXFER_TEST_BUNDLE=$PWD/$BUNDLE EDGEXFER_TEST_TEXT_BUNDLE=$PWD/$TEXT_BUNDLE \
  "$DEVICE" -m pytest -q --durations=10 $TESTS
rc=$?
# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit $rc
