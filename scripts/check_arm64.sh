#!/usr/bin/env bash
# `make check-arm64`: the device side run on arm64, emulated here (docs/jetson.md, "Checked here under emulation").
#
# An arm64 Debian bookworm Python 3.11 runs as a user-mode program under Debian's qemu-user-static 7.2
# (`qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11`: no binfmt, no chroot, no root needed). ROOT is made
# with `dpkg -x` of the arm64 .debs that apt downloads with its own state under build/ (the host's dpkg is not
# touched). The device extras' arm64 wheels are installed into a folder by the host's pip, the project itself
# (pure Python) with --no-deps. The host venv builds the demo bundle and its OpenVINO engines; the emulated
# Python then runs the device side on it, which must never need torch:
#   device install (ONNX Runtime; OpenVINO fp32, fp16, int8) with its golden check, learn, retrain, predict,
#   a signed head update from a TUF repository on loopback, device serve answering one request, a text
#   bundle (MiniLM, tokenizers): install with its golden check, a topic learned from 10 texts, predict, and an
#   audio bundle (speech_embedding; soundfile's own libsndfile and soxr): install with its golden check, a
#   word learned from 5 clips, predict, a 44.1 kHz stereo recording resampled and mixed on the device.
# Everything downloaded is kept under build/arm64/; a second run downloads nothing. It prints versions and
# timings and fails naming the step that broke. ARM64_FRESH_BUNDLE=1 rebuilds the host bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ARM=build/arm64
VENV=${VENV:-.venv}
HOST_PY=$VENV/bin/python
HOST_EDGEXFER=$VENV/bin/edgexfer
HELPER="$HOST_PY scripts/check_arm64.py"
DATA=data/clipart8-demo
NEW_CLASS=vehicles
# the audio bundle: the host trains on 3 of the 4 words of the audio demo set, the device learns the 4th
AUDIO_DATA=data/spoken-demo
AUDIO_NEW_WORD=yes

# ONNX Runtime is pinned to 1.19.2, the age of the ONNX Runtime builds made for JetPack 6, so the check also
# covers the oldest ONNX Runtime a Jetson is likely to have. Newer arm64 wheels (1.32 was tried) die with a
# segmentation fault while loading their extension under qemu-user 7.2 when /proc/cpuinfo is the host's
# x86 one: qemu-user 7.2 passes the host's file through (later releases emulate it for aarch64), and ONNX
# Runtime reads it as an arm64 one when it loads. The arm64 /proc/cpuinfo below (found in ROOT through
# -L) cures that: ARM64_ORT_VERSION=1.32.0 passes the whole check too (docs/jetson.md).
ORT_VERSION=${ARM64_ORT_VERSION:-1.19.2}
# OpenVINO: the host's version, so the IR the host converted is read by the same release on arm64.
OV_VERSION=$($HOST_PY -c "import openvino; print(openvino.get_version().split('-')[0])")
# Debian bookworm's arm64 packages: Python 3.11 (its dependencies follow), and the C++ and OpenMP runtimes
# that manylinux wheels expect from the system.
DEB_PACKAGES="python3.11 libstdc++6 libgomp1"
# The emulated CPU: qemu 7.2's model closest to a Jetson Orin's Cortex-A78AE (Armv8.2-A with fp16 arithmetic
# and the int8 dot product; no SVE, no i8mm, no bf16). With QEMU_CPU=max (SVE, SVE2, i8mm, ...) OpenVINO's
# int8 engine computes garbage here (golden mean cosine 0.18, which device install refuses) while fp32 and
# fp16 stay right; with max,sve=off it is right again. Whether qemu 7.2's SVE emulation or OpenVINO's SVE
# int8 kernels are at fault cannot be told without an SVE machine (docs/jetson.md).
export QEMU_CPU=${QEMU_CPU:-cortex-a76}

ROOTFS=$ARM/root
QEMU=$ARM/qemu/usr/bin/qemu-aarch64-static
WORK=$ARM/work
LOGS=$ARM/logs
mkdir -p "$ARM" "$LOGS"

T_START=$EPOCHREALTIME
declare -a TIMINGS=()
CURRENT=setup
trap 'rc=$?; [ $rc -eq 0 ] || [ -z "$CURRENT" ] || echo "check-arm64: FAILED at step '"'"'$CURRENT'"'"' (exit $rc)" >&2' EXIT
# step NAME FUNCTION: run a step (in a subshell, with -e), its output shown and kept in build/arm64/logs/NAME.log, timed
step() {
  local name=$1; shift
  CURRENT=$name
  printf '\n\033[1m== %s\033[0m\n' "$name"
  local t0=$EPOCHREALTIME rc dt
  set +e
  ( set -e; trap cleanup EXIT; "$@" ) 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  dt=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')
  TIMINGS+=("$(printf '%-26s %7s s' "$name" "$dt")")
  if [ "$rc" -ne 0 ]; then
    CURRENT=""
    echo "check-arm64: FAILED at step '$name' (exit $rc after $dt s; log: $LOGS/$name.log)" >&2
    exit 1
  fi
  echo "   ($name: $dt s)"
}
# background processes a step starts (the update's HTTP server, device serve), ended when the step ends
BACKGROUND=()
# a background shell function is a subshell whose child is the emulated program: stop the child too
stop_tree() { pkill -TERM -P "$1" 2>/dev/null || true; kill -TERM "$1" 2>/dev/null || true; }
cleanup() { local p; for p in "${BACKGROUND[@]}"; do stop_tree "$p"; done; }

# --- the emulated Python ------------------------------------------------------------------------------
APT_DIR=$ARM/apt
apt_opts() {
  local d=$REPO/$APT_DIR
  echo "-oAPT::Architecture=arm64 -oAPT::Architectures::=arm64 -oAPT::Architectures::=amd64
        -oDir::Etc::SourceList=$d/sources.list -oDir::Etc::SourceParts=$d/sources.list.d
        -oDir::Etc::Preferences=$d/preferences -oDir::Etc::PreferencesParts=$d/preferences.d
        -oDir::State=$d/state -oDir::State::status=$d/state/status -oDir::Cache=$d/cache
        -oDebug::NoLocking=1 -oAcquire::Retries=3 -qq"
}
arm64_python() {
  local want="$DEB_PACKAGES qemu-user-static:amd64"
  if [ -x "$QEMU" ] && [ -f "$ROOTFS/.complete" ] && [ "$(cat "$ROOTFS/.complete")" = "$want" ]; then
    echo "cached: $ROOTFS and $QEMU"
  else
    rm -rf "$ROOTFS" "$ARM/qemu"
    mkdir -p "$APT_DIR"/{sources.list.d,preferences.d,state/lists/partial,cache/archives/partial}
    touch "$APT_DIR/state/status"
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -f "$keyring" ] || { echo "missing $keyring (Debian's archive keyring)"; return 1; }
    local mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
    local security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
    cat > "$APT_DIR/sources.list" <<EOF
deb [arch=arm64,amd64 signed-by=$keyring] $mirror bookworm main
deb [arch=arm64,amd64 signed-by=$keyring] $mirror bookworm-updates main
deb [arch=arm64,amd64 signed-by=$keyring] $security bookworm-security main
EOF
    # shellcheck disable=SC2046
    apt-get $(apt_opts) update
    # With an empty dpkg status, --download-only fetches the packages and every dependency (this host's
    # installed packages do not count: they are amd64 and are not looked at).
    # shellcheck disable=SC2046,SC2086
    apt-get $(apt_opts) install --download-only --no-install-recommends -y $DEB_PACKAGES qemu-user-static:amd64
    mkdir -p "$ROOTFS" "$ARM/qemu.tmp"
    local deb
    for deb in "$APT_DIR"/cache/archives/*_arm64.deb "$APT_DIR"/cache/archives/*_all.deb; do
      dpkg -x "$deb" "$ROOTFS"
    done
    dpkg -x "$(ls "$APT_DIR"/cache/archives/qemu-user-static_*_amd64.deb | tail -1)" "$ARM/qemu.tmp"
    # only the aarch64 emulator is kept
    mkdir -p "$ARM/qemu/usr/bin"
    mv "$ARM/qemu.tmp/usr/bin/qemu-aarch64-static" "$ARM/qemu/usr/bin/"
    rm -rf "$ARM/qemu.tmp"
    # qemu -L looks a path up in ROOT first and falls back to the host's: empty folders where Debian's
    # python3.11 looks for site packages keep the host's x86 packages out of the emulated Python
    mkdir -p "$ROOTFS/usr/lib/python3/dist-packages" "$ROOTFS/usr/local/lib/python3.11/dist-packages" \
             "$ROOTFS/usr/lib/python3.11/site-packages"
    echo "$want" > "$ROOTFS/.complete"
    echo "debs: $(ls "$APT_DIR"/cache/archives/*.deb | wc -l) ($(du -sh "$APT_DIR/cache/archives" | cut -f1))"
  fi
  arm64_cpuinfo
  "$QEMU" --version | head -1
}
# qemu -L looks every absolute path up in ROOT first, /proc/cpuinfo and /sys too: what the emulated CPU is
# described as there is what edgexfer's cpu_features(), ONNX Runtime and OpenVINO read (else the host's
# x86 /proc/cpuinfo, and no MIDR_EL1 in /sys). The description is qemu 7.2's cortex-a76 model: its ID
# registers as Linux would print them (the same features as a Jetson Orin's Cortex-A78AE).
arm64_cpuinfo() {
  rm -rf "$ROOTFS/proc" "$ROOTFS/sys"
  if [ "$QEMU_CPU" != cortex-a76 ]; then
    echo "QEMU_CPU=$QEMU_CPU: no arm64 /proc/cpuinfo in ROOT (the emulated programs read the host's)"
    return 0
  fi
  mkdir -p "$ROOTFS/proc" "$ROOTFS/sys/devices/system/cpu/cpu0/regs/identification"
  local n
  for n in $(seq 0 $(($(nproc) - 1))); do
    printf '%s\n' "processor	: $n" "BogoMIPS	: 50.00" \
      "Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs" \
      "CPU implementer	: 0x41" "CPU architecture: 8" "CPU variant	: 0x4" "CPU part	: 0xd0b" "CPU revision	: 1" ""
  done > "$ROOTFS/proc/cpuinfo"
  echo 0x00000000414fd0b1 > "$ROOTFS/sys/devices/system/cpu/cpu0/regs/identification/midr_el1"
  echo "emulated CPU described in $ROOTFS/proc/cpuinfo: $(grep -m1 Features "$ROOTFS/proc/cpuinfo" | cut -d: -f2)"
}

# the emulated Python, niced (-P: the tree's edgexfer/ in the working directory must not shadow the
# installed package, whose edgexfer.runtime comes from runtime/): it competes with everything else on this machine
arm_py() {
  nice -n 19 env -u PYTHONHOME -u PYTHONSTARTUP PYTHONNOUSERSITE=1 \
    PYTHONPATH="$REPO/$PROJECT:$REPO/$SITE" \
    "$QEMU" -L "$REPO/$ROOTFS" "$REPO/$ROOTFS/usr/bin/python3.11" -s -P "$@"
}
arm_edgexfer() { arm_py -m edgexfer.cli "$@"; }

# --- the arm64 wheels and the project ---------------------------------------------------------------------
REQS=$($HELPER requirements "$ORT_VERSION" "$OV_VERSION")
REQ_KEY=$(printf '%s\n' "$REQS" "$(cat constraints.txt)" | sha256sum | cut -c1-12)
SITE=$ARM/site-$REQ_KEY
PROJECT=$ARM/project
arm64_wheels() {
  if [ -f "$SITE/.complete" ]; then
    echo "cached: $SITE"
  else
    rm -rf "$SITE" "$SITE.tmp"
    local platforms=() v
    # bookworm's glibc is 2.36: any manylinux wheel up to that runs
    for v in 17 28 31 34 35 36; do platforms+=(--platform "manylinux_2_${v}_aarch64"); done
    # shellcheck disable=SC2086
    nice -n 19 "$VENV/bin/pip" install --quiet --disable-pip-version-check --target "$SITE.tmp" \
      "${platforms[@]}" --python-version 3.11 --implementation cp --only-binary=:all: \
      -c constraints.txt $REQS 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    [ "${PIPESTATUS[0]}" -eq 0 ]
    # the device side must never need torch: it must not even be there
    if [ -e "$SITE.tmp/torch" ]; then echo "torch was pulled into the arm64 site"; return 1; fi
    mv "$SITE.tmp" "$SITE"
    touch "$SITE/.complete"
    # older sites of other requirement sets go
    find "$ARM" -maxdepth 1 -name 'site-*' ! -name "site-$REQ_KEY" -exec rm -rf {} +
  fi
  echo "$(ls -d "$SITE"/*.dist-info | wc -l) distributions, $(du -sh "$SITE" | cut -f1)"
}
project() {
  rm -rf "$PROJECT" "$ARM/src"
  mkdir -p "$ARM/src"
  # pure Python: a wheel built by the host venv's setuptools (no download) from a copy of what the package
  # is made of (setuptools' build/lib in the tree would keep files deleted since)
  git ls-files -z --cached --others --exclude-standard -- edgexfer converters runtime pyproject.toml README.md \
    'LICEN[CS]E*' | while IFS= read -r -d '' f; do [ ! -e "$f" ] || printf '%s\0' "$f"; done \
    | xargs -0 cp --parents -t "$ARM/src"
  nice -n 19 "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --target "$PROJECT" "./$ARM/src" > "$LOGS/project-pip.log" 2>&1 || { cat "$LOGS/project-pip.log"; return 1; }
  rm -rf "$ARM/src"
  echo "$(ls -d "$PROJECT"/*.dist-info | xargs -n1 basename) in $PROJECT"
}
versions() {
  echo "host: $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) CPUs, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "host venv: $("$HOST_PY" -c "import sys, onnxruntime, openvino; print(f'Python {sys.version.split()[0]}, onnxruntime {onnxruntime.__version__}, openvino {openvino.get_version()}')")"
  echo "emulator: $("$QEMU" --version | head -1), QEMU_CPU=$QEMU_CPU"
  arm_py - <<'PY'
import importlib.metadata as md, importlib.util, platform, sys
print(f"emulated: Python {platform.python_version()} on {platform.machine()}, {platform.libc_ver()[0]} {platform.libc_ver()[1]}")
names = ["edgexfer", "numpy", "scipy", "pillow", "onnxruntime", "openvino", "tuf", "securesystemslib",
         "starlette", "uvicorn", "python-multipart", "prometheus-client", "opencv-python-headless", "tokenizers",
         "soundfile", "soxr"]
print("emulated packages: " + ", ".join(f"{n} {md.version(n)}" for n in names))
assert platform.machine() == "aarch64", platform.machine()
# the device side never needs torch, and none must leak in from the host
assert importlib.util.find_spec("torch") is None, "torch is importable in the emulated Python"
for p in sys.path:
    assert "/.venv" not in p and "/.pyenv" not in p, f"a host path on sys.path: {p}"
import numpy, onnxruntime, openvino, cv2, starlette, uvicorn, tuf.ngclient, soxr  # noqa: F401  every device import loads
import soundfile
# soundfile's wheel carries libsndfile for its platform (_soundfile_data/libsndfile_arm64.so here)
print(f"soundfile: libsndfile {soundfile.__libsndfile_version__} from "
      f"{getattr(soundfile, '_full_path', None) or getattr(soundfile, '_libname', '?')}")
print(f"onnxruntime providers: {onnxruntime.get_available_providers()}")
print(f"openvino devices: {openvino.Core().available_devices}, {openvino.get_version()}")
from edgexfer.runtime.cpu import cpu_features
print(f"edgexfer sees: {cpu_features().describe()}")
PY
}

# --- the host side: the demo bundle, its OpenVINO engines, a second head for the signed update -----------
HOST=$ARM/host
host_key() {
  # what the bundle depends on: this tree's sources and data (as they are, committed or not), the host
  # venv's packages
  { git ls-files -z --cached --others --exclude-standard -- edgexfer converters runtime pyproject.toml \
      constraints.txt "$DATA" data/fortunes-demo "$AUDIO_DATA" | while IFS= read -r -d '' f; do [ ! -e "$f" ] || printf '%s\0' "$f"; done \
      | xargs -0 sha256sum
    "$VENV/bin/pip" freeze --disable-pip-version-check 2>/dev/null | grep -v '^-e'; } | sha256sum | cut -c1-12
}
host_bundle() {
  local key; key=$(host_key)
  if [ -z "${ARM64_FRESH_BUNDLE:-}" ] && [ -f "$HOST/.complete" ] && [ "$(cat "$HOST/.complete")" = "$key" ]; then
    echo "cached: $HOST (sources, packages and data unchanged: $key)"
    cat "$HOST/bundle/reports/engines.md"
    return 0
  fi
  rm -rf "$HOST"; mkdir -p "$HOST/host-data"
  # as in the demo: the host trains on 7 classes, the device learns the 8th
  local d
  for d in "$DATA"/*/; do
    [ "$(basename "$d")" = "$NEW_CLASS" ] || ln -s "$REPO/$d" "$HOST/host-data/$(basename "$d")"
  done
  nice -n 19 "$HOST_EDGEXFER" train "$HOST/host-data" --out "$HOST/run" --cache "$ARM/c.sqlite" --quiet
  nice -n 19 "$HOST_EDGEXFER" export "$HOST/run" --out "$HOST/bundle" --name clipart7-arm64 --quiet
  local p
  for p in fp32 fp16; do
    nice -n 19 "$HOST_EDGEXFER" convert "$HOST/bundle" --to openvino --precision $p --quiet > "$HOST/convert-$p.txt"
  done
  nice -n 19 "$HOST_EDGEXFER" convert "$HOST/bundle" --to openvino --precision int8 --calib "$HOST/host-data" \
    --calib-size 120 --max-drop 0.02 --quiet > "$HOST/convert-int8.txt"
  cat "$HOST/bundle/reports/engines.md"
  # the field update: a head on all 8 classes, signed and published to a TUF repository
  nice -n 19 "$HOST_EDGEXFER" train "$DATA" --out "$HOST/run-v2" --cache "$ARM/c.sqlite" --quiet
  nice -n 19 "$HOST_EDGEXFER" heads keygen --out "$HOST/offline/root.key"
  nice -n 19 "$HOST_EDGEXFER" heads init --repo "$HOST/heads-repo" --keys "$HOST/keys" --root-key "$HOST/offline/root.key"
  nice -n 19 "$HOST_EDGEXFER" heads publish "$HOST/run-v2" --bundle "$HOST/bundle" --repo "$HOST/heads-repo" \
    --keys "$HOST/keys" --group all
  # a text bundle (MiniLM, 4 topics of the text demo): the device side needs tokenizers on arm64
  nice -n 19 "$HOST_EDGEXFER" train data/fortunes-demo --out "$HOST/text-run" --cache "$ARM/t.sqlite" --quiet
  nice -n 19 "$HOST_EDGEXFER" export "$HOST/text-run" --out "$HOST/text-bundle" --name fortunes-arm64 --quiet
  # an audio bundle (speech_embedding, 3 of the 4 words of the audio demo): the device side needs soundfile
  # (libsndfile) and soxr on arm64
  mkdir -p "$HOST/audio-data"
  for d in "$AUDIO_DATA"/*/; do
    [ "$(basename "$d")" = "$AUDIO_NEW_WORD" ] || ln -s "$REPO/$d" "$HOST/audio-data/$(basename "$d")"
  done
  nice -n 19 "$HOST_EDGEXFER" train "$HOST/audio-data" --backbone speech_embedding --out "$HOST/audio-run" \
    --cache "$ARM/a.sqlite" --quiet
  nice -n 19 "$HOST_EDGEXFER" export "$HOST/audio-run" --out "$HOST/audio-bundle" --name spoken3-arm64 --quiet
  echo "$key" > "$HOST/.complete"
}

# --- the device side, emulated ---------------------------------------------------------------------------
# A golden check within 1e-4 of the x86 reference for the fp32 engines; fp16/int8 pass the install's own
# tolerances and report what they computed in.
install_one() {  # backend precision state [max-diff]
  local backend=$1 precision=$2 state=$3 max=${4:-}
  arm_edgexfer device install "$HOST/bundle" --state "$state" --backend "$backend" --precision "$precision" \
    --json > "$WORK/install-$backend-$precision.json"
  $HELPER golden "$WORK/install-$backend-$precision.json" "$backend/$precision" ${max:+--max-diff "$max"} \
    ${max:+--ran f32}
}
install_ort() { install_one onnxruntime fp32 "$WORK/device" 1e-4; }
install_ov_fp32() {
  install_one openvino fp32 "$WORK/device-ov-fp32" 1e-4
  # what OpenVINO computes in when not told (the reason every compile states its precision)
  arm_py - "$HOST/bundle" <<'PY'
import sys
import numpy as np
import openvino as ov
from edgexfer.runtime.backends.openvino import openvino_inference_precision
bundle = sys.argv[1]
golden = np.load(f"{bundle}/golden.npz")
core = ov.Core()
model = core.read_model(f"{bundle}/engines/openvino/fp32/backbone.xml")
model.reshape({0: ov.PartialShape([1, *golden["images"].shape[1:]])})  # static, as the device compiles batch 1
compiled = core.compile_model(model, "CPU")
# two golden images keep this probe short under emulation
features = np.concatenate([compiled([img[None]])[0] for img in golden["images"][:2]])
diff = float(np.abs(features - golden["features"][:2]).max())
print(f"  OpenVINO's own default (no INFERENCE_PRECISION_HINT) on this CPU: "
      f"{openvino_inference_precision(compiled)}, max feature diff {diff:.3g} on the fp32 IR (2 golden images)")
PY
}
install_ov_fp16() { install_one openvino fp16 "$WORK/device-ov-fp16"; }
install_ov_int8() { install_one openvino int8 "$WORK/device-ov-int8"; }
mapfile -t NEW_IMAGES < <(ls "$DATA/$NEW_CLASS"/* | sort)
LEARN=("${NEW_IMAGES[@]:0:12}")
UNSEEN=("${NEW_IMAGES[@]:20:3}")
learn() { arm_edgexfer device learn --label "$NEW_CLASS" "${LEARN[@]}" --state "$WORK/device" --backend onnxruntime; }
retrain() { arm_edgexfer device retrain --state "$WORK/device"; }
predict() {
  arm_edgexfer device predict "${UNSEEN[@]}" --state "$WORK/device" --backend onnxruntime --json > "$WORK/predict.json"
  $HELPER predict "$WORK/predict.json"
  arm_edgexfer device predict "${UNSEEN[0]}" --state "$WORK/device-ov-fp32" --backend openvino --json > "$WORK/predict-ov.json"
  $HELPER predict "$WORK/predict-ov.json"
}
update() {
  local port; port=$($HELPER free-port)
  "$HOST_PY" -m http.server --bind 127.0.0.1 "$port" --directory "$HOST/heads-repo" >/dev/null 2>&1 &
  local server=$!
  BACKGROUND+=("$server")
  local _
  for _ in $(seq 50); do
    "$HOST_PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
    sleep 0.1
  done
  arm_edgexfer device update --state "$WORK/device" --repo "http://127.0.0.1:$port" \
    --root "$HOST/heads-repo/metadata/1.root.json" --backend onnxruntime
  kill "$server"; wait "$server" 2>/dev/null || true
  arm_edgexfer device heads --state "$WORK/device"
}
serve() {
  arm_edgexfer device serve --state "$WORK/device" --port 0 --backend onnxruntime > "$WORK/serve.log" 2>&1 &
  local pid=$! url
  BACKGROUND+=("$pid")
  url=$($HELPER serve-wait "$WORK/serve.log" "$pid" 600) || { cat "$WORK/serve.log"; return 1; }
  echo "  $url"
  $HELPER serve-predict "$url" "${UNSEEN[0]}"
  stop_tree "$pid"; wait "$pid" 2>/dev/null || true
  # the emulated server shuts down gracefully (uvicorn, up to 5 s, slower under emulation): wait for it
  local left=60
  while pgrep -f -- "--state $WORK/device --port 0" >/dev/null; do
    left=$((left - 1))
    if [ "$left" -le 0 ]; then echo "  FAIL: device serve still running 30 s after SIGTERM"; return 1; fi
    sleep 0.5
  done
  echo "  device serve stopped"
}

# text: tokenizers (Rust) and the MiniLM engine on arm64; install's golden check re-tokenizes the golden
# texts and compares features with the x86 reference; a topic learned from 10 texts
text() {
  arm_edgexfer device install "$HOST/text-bundle" --state "$WORK/text-device" --backend onnxruntime --precision fp32 \
    --json > "$WORK/install-text.json"
  $HELPER golden "$WORK/install-text.json" "text onnxruntime/fp32" --max-diff 1e-4 --ran f32
  local love; mapfile -t love < <(ls data/fortunes-love/*.txt | sort)
  arm_edgexfer device learn --label love "${love[@]:0:10}" --state "$WORK/text-device" --backend onnxruntime
  arm_edgexfer device retrain --state "$WORK/text-device"
  arm_edgexfer device predict "${love[@]:10:10}" --state "$WORK/text-device" --backend onnxruntime --json \
    > "$WORK/predict-text.json"
  $HELPER predict "$WORK/predict-text.json" love 7
}

# audio: the composed speech_embedding graph (waveform -> mel -> embedding windows -> pooled) under arm64's
# ONNX Runtime; install's golden check feeds the golden waveforms and compares features with the x86
# reference; a word learned from 5 clips read by soundfile (libsndfile inside its aarch64 wheel); the unseen
# clips, and one of them again as a 44.1 kHz stereo 24-bit file that the device resamples with soxr and mixes
audio() {
  arm_edgexfer device install "$HOST/audio-bundle" --state "$WORK/audio-device" --backend onnxruntime --precision fp32 \
    --json > "$WORK/install-audio.json"
  $HELPER golden "$WORK/install-audio.json" "audio onnxruntime/fp32" --max-diff 1e-4 --ran f32
  local clips; mapfile -t clips < <(ls "$AUDIO_DATA/$AUDIO_NEW_WORD"/*.wav | sort)
  arm_edgexfer device learn --label "$AUDIO_NEW_WORD" "${clips[@]:0:5}" --state "$WORK/audio-device" --backend onnxruntime
  arm_edgexfer device retrain --state "$WORK/audio-device"
  $HELPER wav-44k "${clips[5]}" "$WORK/${AUDIO_NEW_WORD}-44k-stereo.wav"
  arm_edgexfer device predict "${clips[@]:5:3}" "$WORK/${AUDIO_NEW_WORD}-44k-stereo.wav" --state "$WORK/audio-device" \
    --backend onnxruntime --json > "$WORK/predict-audio.json"
  # on x86 each of the four is '$AUDIO_NEW_WORD' with probability 1.00
  $HELPER predict "$WORK/predict-audio.json" "$AUDIO_NEW_WORD" 4
}

step arm64-python arm64_python
step arm64-wheels arm64_wheels
step project project
step versions versions
step host-bundle host_bundle
rm -rf "$WORK"; mkdir -p "$WORK"
step install-onnxruntime-fp32 install_ort
step install-openvino-fp32 install_ov_fp32
step install-openvino-fp16 install_ov_fp16
step install-openvino-int8 install_ov_int8
step learn learn
step retrain retrain
step predict predict
step update update
step serve serve
step text text
step audio audio
CURRENT=""
printf '\n\033[1m== check-arm64 passed\033[0m\n'
printf '%s\n' "${TIMINGS[@]}"
awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN{printf "total                        %7.1f s\n", b-a}'
