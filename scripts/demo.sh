#!/usr/bin/env bash
# The end-to-end demo behind `make demo`: train on the host, export a bundle, install it on a
# "device" (a local state directory) and teach the device a class the host never saw.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=data/clipart8-demo
OUT=demo-out
NEW_CLASS=vehicles
rm -rf "$OUT"
mkdir -p "$OUT/host-data"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# the host trains on 7 of the 8 classes; the device will learn the 8th in the field
for d in "$DATA"/*/; do
  name=$(basename "$d")
  [ "$name" = "$NEW_CLASS" ] || ln -s "$(cd "$d" && pwd)" "$OUT/host-data/$name"
done
mapfile -t NEW_IMAGES < <(ls "$DATA/$NEW_CLASS"/* | sort)
LEARN=("${NEW_IMAGES[@]:0:20}")      # what the device is taught
UNSEEN=("${NEW_IMAGES[@]:20:6}")     # what it is asked about afterwards

say "1. Train on the host: a frozen ImageNet EfficientNet-Lite0 extracts features, a new linear head learns 7 classes"
echo "   data: $OUT/host-data (210 public-domain clip-art images, 30 per class; '$NEW_CLASS' left out on purpose)"
edgexfer train "$OUT/host-data" --out "$OUT/run" --cache "$OUT/features.sqlite"

say "2. Train again on the same data: every feature now comes from the SQLite feature cache"
edgexfer train "$OUT/host-data" --out "$OUT/run" --cache "$OUT/features.sqlite" --quiet

say "3. Export the bundle: backbone.onnx (uint8 pixels in, features out) + head + golden images + manifest"
edgexfer export "$OUT/run" --out "$OUT/bundle" --name clipart-demo
ls -l "$OUT/bundle"

say "3b. Convert for the engines a device may have, each validated against the fp32 reference"
CALIB=../shared/datasets/clipart8; CALIB_SIZE=300
# ~180 held-out images: one image is half a point, so the demo accepts a 2-point int8 drop
# (the default and the tests hold int8 to 1 point; a conversion that misses fails with its figures)
MAX_DROP=0.02
if [ ! -d "$CALIB" ]; then CALIB="$OUT/host-data"; CALIB_SIZE=120; fi
echo "   calibration and held-out validation images: $CALIB (folders the head does not know are ignored)"
# what INT8 buys depends on this CPU's ISA (edgexfer.runtime.cpu reads it, as conversion and the engine store do)
python - <<'PY'
from edgexfer.runtime.cpu import cpu_features

cpu = cpu_features()
if cpu.int8_dot:
    gain = "it has an int8 dot product (VNNI/AMX/SDOT), so INT8 is smaller and usually faster than FP32"
else:
    gain = "it has no int8 dot product (VNNI), so INT8 is not faster than FP32 - its gain is size"
print(f"   INT8 keeps the layers that hurt accuracy most in float. This CPU is {cpu.describe()}:")
print(f"   {gain}. On a Jetson, TensorRT INT8 is where it pays.")
PY
edgexfer convert "$OUT/bundle" --to openvino --precision fp32 --quiet > "$OUT/convert-openvino-fp32.txt"; grep -m1 "engine\|reused" "$OUT/convert-openvino-fp32.txt"
edgexfer convert "$OUT/bundle" --to openvino --precision int8 --calib "$CALIB" --calib-size "$CALIB_SIZE" --max-drop "$MAX_DROP" --quiet > "$OUT/convert-openvino-int8.txt"; grep -m1 "engine\|reused" "$OUT/convert-openvino-int8.txt"
edgexfer convert "$OUT/bundle" --to onnxruntime --precision int8 --calib "$CALIB" --calib-size "$CALIB_SIZE" --max-drop "$MAX_DROP" --quiet > "$OUT/convert-onnxruntime-int8.txt"; grep -m1 "engine\|reused" "$OUT/convert-onnxruntime-int8.txt"
cat "$OUT/bundle/reports/engines.md"

say "4. Evaluate the bundle with ONNX Runtime and the numpy head (the code path a device runs)"
echo "   note: most of these images were seen in training; the honest figure is the validation accuracy of step 1"
edgexfer eval "$OUT/bundle" "$OUT/host-data" --quiet | head -3

say "5. Install the bundle on a device (here a local state directory; on a Jetson: /var/lib/edgexfer)"
edgexfer device install "$OUT/bundle" --state "$OUT/device"

say "6. The device has never heard of '$NEW_CLASS': it answers with the closest class it knows"
edgexfer device predict "${UNSEEN[@]}" --state "$OUT/device" || true

say "7. Teach the device '$NEW_CLASS' from 20 local images (the backbone runs once per image; features are cached)"
edgexfer device learn --label "$NEW_CLASS" "${LEARN[@]}" --state "$OUT/device"

say "8. Retrain only the head, in well under a second, and switch to it if it passes the holdout gate"
edgexfer device retrain --state "$OUT/device"

say "9. Ask again about the same unseen '$NEW_CLASS' images"
edgexfer device predict "${UNSEEN[@]}" --state "$OUT/device" || true

say "10. Device status and head history (roll back any time with: edgexfer device rollback --state $OUT/device)"
edgexfer device status --state "$OUT/device"
edgexfer device heads --state "$OUT/device"

say "11. A field update: the host trains a better head on all 8 classes, signs it (TUF) with its logits on the bundle's golden features, and publishes it"
edgexfer train "$DATA" --out "$OUT/run-v2" --cache "$OUT/features.sqlite" --quiet
edgexfer heads keygen --out "$OUT/offline/root.key"
edgexfer heads init --repo "$OUT/heads-repo" --keys "$OUT/keys" --root-key "$OUT/offline/root.key"
edgexfer heads publish "$OUT/run-v2" --bundle "$OUT/bundle" --repo "$OUT/heads-repo" --keys "$OUT/keys" --group all

say "12. The device fetches it from an HTTP server on loopback, verifies signatures, switches, health-checks"
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python -m http.server --bind 127.0.0.1 "$PORT" --directory "$OUT/heads-repo" >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null && break; sleep 0.1; done
edgexfer device update --state "$OUT/device" --repo "http://127.0.0.1:$PORT" --root "$OUT/heads-repo/metadata/1.root.json"
edgexfer device heads --state "$OUT/device"
kill $SERVER

say "13. The device as a service: one process keeps the engine open and answers over HTTP (docs/service.md)"
edgexfer device serve --state "$OUT/device" --port 0 > "$OUT/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
URL=""
for _ in $(seq 300); do
  URL=$(grep -o 'listening on http://[^ ]*' "$OUT/serve.log" | head -1 | cut -d' ' -f3) && [ -n "$URL" ] && break
  kill -0 $SERVE 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 0.1
done
echo "   web page (status, upload, review queue, retrain, head history): $URL"
echo "   curl --data-binary @${UNSEEN[0]} ${URL}v1/predict"
curl -sS --fail --data-binary "@${UNSEEN[0]}" "${URL}v1/predict"; echo
echo "   tritonclient.http (Open Inference Protocol, binary tensor data), as a Triton or OpenVINO Model Server client:"
python - "${URL}" "${UNSEEN[@]:0:3}" <<'PY'
import sys, urllib.request, json
import numpy as np
import tritonclient.http as triton
url, images = sys.argv[1], sys.argv[2:]
model = json.load(urllib.request.urlopen(url + "v1/status"))["model"]
client = triton.InferenceServerClient(url.split("//")[1].rstrip("/"))
tensor = triton.InferInput("image", [len(images)], "BYTES")
tensor.set_data_from_numpy(np.array([open(p, "rb").read() for p in images], dtype=np.object_))
result = client.infer(model, [tensor])
probs = result.as_numpy("probabilities")
for path, label, row in zip(images, result.as_numpy("label"), probs):
    print(f"   {path.split('/')[-1]}: {label.decode()} ({row.max():.2f}) [head {result.get_response()['model_version']}]")
PY
curl -sS "${URL}metrics" | grep -E '^edgexfer_(predictions_total|active_head_version|model_info)' | head -5
kill -TERM $SERVE; wait $SERVE 2>/dev/null || true

say "14. Fleet learning with Flower: 3 local devices train the head together; only head weights and counts travel (docs/fleet.md)"
# each device holds 3 classes (10 images each, learned on the device); 'vehicles' is new to the bundle's head
FLEET_PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
FLEET_CLASSES=("beverages desserts $NEW_CLASS" "fruit hardware music" "sports tools $NEW_CLASS")
for k in 0 1 2; do
  edgexfer device install "$OUT/bundle" --state "$OUT/fleet-device-$k" > /dev/null
  for class in ${FLEET_CLASSES[$k]}; do
    mapfile -t IMAGES < <(ls "$DATA/$class"/* | sort | sed -n "$((21 + k)),$((30 + k))p")
    edgexfer device learn --label "$class" "${IMAGES[@]}" --state "$OUT/fleet-device-$k" > /dev/null
  done
  echo "   device $k: ${FLEET_CLASSES[$k]} (10 images each)"
done
# secure by default: TLS (a CA and the server's certificate) and one key pair per device; only the
# registered keys join, and the SuperLink's Control API answers only this host
edgexfer fleet tls --out "$OUT/fleet-tls" > /dev/null
for k in 0 1 2; do
  edgexfer fleet keygen --out "$OUT/fleet-keys/device-$k.key" > /dev/null
done
mkdir -p "$OUT/fleet-server-keys" && cp "$OUT"/fleet-keys/*.pub "$OUT/fleet-server-keys/"
edgexfer fleet serve --bundle "$OUT/bundle" --out "$OUT/bundle-fleet" --rounds 3 --min-devices 3 \
  --address "127.0.0.1:$FLEET_PORT" --round-timeout 120 --tls-dir "$OUT/fleet-tls" --auth-keys "$OUT/fleet-server-keys" \
  > "$OUT/fleet-serve.txt" 2> "$OUT/fleet-serve.log" &
FLEET=$!
NODES=()
for k in 0 1 2; do
  # a device started before the server registered its key retries activation (1, 2, 4 ... s)
  edgexfer device federate --state "$OUT/fleet-device-$k" --server "127.0.0.1:$FLEET_PORT" \
    --tls-ca "$OUT/fleet-tls/ca.crt" --auth-key "$OUT/fleet-keys/device-$k.key" > "$OUT/fleet-device-$k.log" 2>&1 &
  NODES+=($!)
done
trap 'kill $FLEET "${NODES[@]}" 2>/dev/null || true' EXIT
wait $FLEET || { cat "$OUT/fleet-serve.log"; exit 1; }
kill "${NODES[@]}" 2>/dev/null || true; wait "${NODES[@]}" 2>/dev/null || true
grep '^fleet round=' "$OUT/fleet-serve.log" | sed 's/^/   /'
cat "$OUT/fleet-serve.txt"
echo "   the federated head ships like any head: signed, published, verified and health-checked on the device"
edgexfer heads publish "$OUT/bundle-fleet" --repo "$OUT/heads-repo" --keys "$OUT/keys" --group all
edgexfer device update --state "$OUT/device" --dir "$OUT/heads-repo" || true

say "15. Text takes the same path: a frozen MiniLM sentence encoder (all-MiniLM-L6-v2) and a linear head (docs/text.md)"
TEXT_DATA=data/fortunes-demo
echo "   data: $TEXT_DATA (60 short texts from Debian's fortunes, 4 topics: $(ls "$TEXT_DATA" | grep -v '\.md$' | tr '\n' ' '))"
edgexfer train "$TEXT_DATA" --out "$OUT/text-run" --cache "$OUT/text-features.sqlite" --quiet
edgexfer export "$OUT/text-run" --out "$OUT/text-bundle" --name fortunes-demo > /dev/null
echo "   bundle: $OUT/text-bundle (backbone.onnx takes input_ids + attention_mask; tokenizer.json ships with it)"
edgexfer device install "$OUT/text-bundle" --state "$OUT/text-device" > /dev/null
mapfile -t LOVE < <(ls data/fortunes-love/*.txt | sort)
edgexfer device predict "${LOVE[@]:10:10}" --state "$OUT/text-device" > "$OUT/text-before.txt"
echo "   the device has never heard of 'love': of 10 unseen love texts it calls $(grep -c ': love (' "$OUT/text-before.txt" || true) 'love'"
echo "   taught 'love' from 10 other texts, the head retrained on the device (no torch there):"
edgexfer device learn --label love "${LOVE[@]:0:10}" --state "$OUT/text-device" | sed 's/^/   /'
edgexfer device retrain --state "$OUT/text-device" | sed 's/^/   /'
edgexfer device predict "${LOVE[@]:10:10}" --state "$OUT/text-device" > "$OUT/text-after.txt"
echo "   asked again about the same 10 unseen love texts: $(grep -c ': love (' "$OUT/text-after.txt") called 'love'"
sed 's/^/   /' "$OUT/text-after.txt"
echo "   and a literal text:"
edgexfer device predict --text "My cat sleeps on the keyboard all day." --state "$OUT/text-device" | sed 's/^/   /'

say "16. Sounds take the same path: Google's speech-embedding model (keyword spotting, ONNX) and a linear head (docs/audio.md)"
AUDIO_DATA=data/spoken-demo
AUDIO_NEW_WORD=yes
mkdir -p "$OUT/audio-data"
for d in "$AUDIO_DATA"/*/; do
  name=$(basename "$d")
  [ "$name" = "$AUDIO_NEW_WORD" ] || ln -s "$(cd "$d" && pwd)" "$OUT/audio-data/$name"
done
mapfile -t CLIPS < <(ls "$AUDIO_DATA/$AUDIO_NEW_WORD"/*.wav | sort)
echo "   data: $AUDIO_DATA (32 synthetic 1 s WAV clips at 16 kHz, noisy, 8 each of: $(ls "$AUDIO_DATA" | grep -v '\.md$' | tr '\n' ' ')- see its ATTRIBUTION.md)"
echo "   the host trains on 3 words; '$AUDIO_NEW_WORD' is left out on purpose"
edgexfer train "$OUT/audio-data" --backbone speech_embedding --out "$OUT/audio-run" --cache "$OUT/audio-features.sqlite" \
  --quiet | sed -n '1s/^/   /p'
echo "   (6 held-out clips are few: on spoken14's 210 clips by unseen voices the same recipe scores 0.87, docs/audio.md)"
edgexfer export "$OUT/audio-run" --out "$OUT/audio-bundle" --name spoken-demo --quiet > /dev/null
echo "   bundle: $OUT/audio-bundle (backbone.onnx takes the raw samples, float32 [N, 16000]: the mel front end,"
echo "   9 embedding windows of 0.775 s and their pooling are inside that one graph)"
edgexfer device install "$OUT/audio-bundle" --state "$OUT/audio-device" | sed -n "s/^golden *\(.*\)/   install's golden check: \1/p"
edgexfer device predict "${CLIPS[@]:5:3}" --state "$OUT/audio-device" > "$OUT/audio-before.txt"
echo "   the device has never heard '$AUDIO_NEW_WORD'; asked about 3 recordings of it, it answers with the words it knows:"
sed 's/^/   /' "$OUT/audio-before.txt"
echo "   taught '$AUDIO_NEW_WORD' from 5 other recordings, the head retrained on the device (few-shot, no torch there):"
edgexfer device learn --label "$AUDIO_NEW_WORD" "${CLIPS[@]:0:5}" --state "$OUT/audio-device" | sed 's/^/   /'
edgexfer device retrain --state "$OUT/audio-device" | sed 's/^/   /'
echo "   asked again about the same 3 recordings, and about one of them saved again as 44.1 kHz stereo 24-bit"
echo "   (as a phone or a PC records: the device resamples it with soxr and mixes it to mono):"
python - "${CLIPS[5]}" "$OUT/$AUDIO_NEW_WORD-44k-stereo.wav" <<'PY'
import sys
import numpy as np
import soundfile
import soxr
wave, rate = soundfile.read(sys.argv[1], dtype="float32")
resampled = soxr.resample(wave, rate, 44100)
soundfile.write(sys.argv[2], np.stack([0.5 * resampled, resampled], axis=1), 44100, subtype="PCM_24")
PY
edgexfer device predict "${CLIPS[@]:5:3}" "$OUT/$AUDIO_NEW_WORD-44k-stereo.wav" --state "$OUT/audio-device" | sed 's/^/   /'

say "17. Bring your own backbone: a small ResNet written in a file (docs/examples/small_resnet.py, random init: a demo of the path, not of accuracy)"
edgexfer train "$OUT/host-data" --out "$OUT/byob-run" --cache "$OUT/features.sqlite" --quiet \
  --backbone py:docs/examples/small_resnet.py:build --input-size 64,64 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \
  | sed -n '1s/^/   /p'
edgexfer export "$OUT/byob-run" --out "$OUT/byob-bundle" --name clipart-byob --quiet | tail -1 | sed 's/^/   /'
edgexfer device install "$OUT/byob-bundle" --state "$OUT/byob-device" > /dev/null
echo "   installed; the manifest names it $(python3 -c 'import json,sys; b=json.load(open(sys.argv[1]))["backbone"]; print(b["arch"], "weights", b["weights_sha256"][:12] + "…")' "$OUT/byob-bundle/manifest.json")"
edgexfer device predict "${UNSEEN[0]}" --state "$OUT/byob-device" | sed 's/^/   /'

say "Done. Host run: $OUT/run (metrics.json, plots/*.png); bundle: $OUT/bundle; device state: $OUT/device"
