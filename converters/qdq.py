"""ONNX QDQ int8 models (ONNX Runtime static quantization) with a sensitivity search.

Plain post-training quantization is not enough for this backbone. On an AVX2 CPU without VNNI,
ONNX Runtime's u8*s8 int8 convolutions add products pairwise in int16 and saturate: with every layer
int8 the mean feature cosine is 0.82, where the same QDQ model evaluated in float reaches 0.99. Most
of the loss comes from two layers (the stem and the first depthwise convolution). The search finds
such layers by measurement and keeps them in float until the tolerance holds:

1. calibrate once (MinMax, per-channel weights; the ranges are cached per model and images) and
   quantize every layer; measure on the first calibration images (never on held-out ones);
2. if that misses the tolerance (with a margin), shortlist candidates: the first weighted layers
   (an early error is amplified by everything after it) and the layers with the worst *local* SQNR
   (one extra model holds, for every layer, an isolated quantized copy fed with the float model's
   input to that layer, so one run gives each layer's own error as its kernel computes it);
3. measure each candidate's damage when it is the *only* int8 layer, then keep candidates in float,
   most damaging first, accepting one only when it improves the result, until the tolerance holds
   (or ``MAX_KEPT`` layers are float: then the conversion fails and writes nothing).

A transformer (a text bundle's backbone) quantizes only its weighted matrix products, less those that read
a GELU's output (the FFN's second projection): ONNX Runtime's default list also quantizes the Add of the
attention mask (-1e4 for padding: a uint8 range over [-1e4, 10] wipes out the scores; all-MiniLM-L6-v2 on
fortunes7, every default op int8: mean cosine 0.42) and the GELU's long positive tail sets a per-tensor
range that crushes the rest of its values (weighted MatMuls only: cosine 0.93; without the six FFN
projections after a GELU: 0.991, no accuracy lost). See :func:`transformer_quantizable`.

Two recipes: ``asymmetric`` (uint8 activations, int8 symmetric per-channel weights; the usual choice
for ONNX Runtime on CPU, validated with ONNX Runtime's own kernels) and ``symmetric`` (int8
activations and weights, zero points 0, float bias: what TensorRT's explicit quantization requires;
validated with the QDQ reference semantics, i.e. ONNX Runtime without fusions, because its target's
int8 kernels run on the GPU, not here).
"""
from __future__ import annotations

import importlib
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.converters.calibration import EngineInputs, LabelledImages, inputs_digest, single_feeds, take
from edgexfer.converters.validate import feature_figures, reference_features, run_batched
from edgexfer.runtime.backends.base import EngineRunner, TensorSpec
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.compare import Tolerance, meets
from edgexfer.runtime.errors import ValidationError
from edgexfer.runtime.fsutil import file_sha256
from edgexfer.runtime.modalities import modality_of
from edgexfer.runtime.optional import require

#: layers whose weights are quantized; the search keeps these in float
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
#: the search aims this much above the cosine tolerance, so held-out images still meet it
SEARCH_COSINE_MARGIN = 0.01
#: images used to measure each layer's own error (one at a time, so memory stays small)
SENSITIVITY_IMAGES = 8
#: calibration images each search trial is measured on (the first ones: the split interleaves classes)
SEARCH_IMAGES = 96
#: the first weighted layers are always search candidates, with the TOP_LOCAL worst by local SQNR
FIRST_LAYERS = 4
TOP_LOCAL = 4
#: images each candidate's damage alone is measured on
PROBE_IMAGES = 16
#: most layers the search keeps in float before it gives up
MAX_KEPT = 4


@dataclass(frozen=True)
class QdqRecipe:
    name: str
    symmetric: bool
    #: True: validated on ONNX Runtime with all optimisations (its int8 kernels, as the runtime backend runs
    #: it); False: ONNX Runtime with graph optimisations off, i.e. Q/DQ computed as defined in float
    int8_kernels: bool
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


ASYMMETRIC = QdqRecipe(
    "asymmetric", False, True,
    "QDQ, uint8 asymmetric activations, int8 symmetric per-channel weights, MinMax calibration")
SYMMETRIC = QdqRecipe(
    "symmetric", True, False,
    "QDQ for TensorRT explicit int8: int8 symmetric activations and per-channel weights (zero points 0), "
    "float bias, MinMax calibration", {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})


class QdqRunner(EngineRunner):
    """Runs a QDQ ONNX model with ONNX Runtime, with or without graph optimisations (see QdqRecipe.int8_kernels).

    Without optimisations the Q/DQ pairs are evaluated in float: the quantization error without any
    engine's int8 kernels (what TensorRT's builder starts from).
    """

    name = "onnxruntime-qdq-reference"

    def __init__(self, path: Path, optimized: bool):
        super().__init__(path, "int8")
        ort = require("onnxruntime", "validating a QDQ model")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if not optimized:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self.inference_precision = "f32 (Q/DQ simulated)"
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        # images: one uint8 input; texts: int64 input_ids and attention_mask; audio: a float32 waveform
        from edgexfer.runtime.backends.onnxruntime import ONNX_TYPES

        self._inputs = tuple(TensorSpec(i.name, tuple(d if isinstance(d, int) else None for d in i.shape),
                                        ONNX_TYPES.get(i.type, i.type)) for i in self.session.get_inputs())
        self._input = self._inputs[0]
        self.details = {"onnxruntime": ort.__version__, "graph_optimizations": "all" if optimized else "off"}

    def input_spec(self) -> TensorSpec:
        return self._input

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input.name: batch})[0]

    def run_feed_impl(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feed)[0]

    def close(self) -> None:
        self.session = None


def open_runner(path: Path, recipe: QdqRecipe):
    if recipe.int8_kernels:
        from edgexfer.runtime.backends.registry import open_backend

        return open_backend("onnxruntime", path, precision="int8")
    return QdqRunner(path, optimized=False)


def quantize_with_search(float_model: Path, out_path: Path, recipe: QdqRecipe, bundle: Bundle,
                         calib: LabelledImages, tolerance: Tolerance, workdir: Path, *,
                         progress: bool = True) -> dict[str, Any]:
    """Write a QDQ model of ``float_model`` to ``out_path`` that meets ``tolerance`` on ``calib``.

    Returns what the report records: recipe, layers kept in float, every trial's figures.
    Raises :class:`ValidationError` when the trial budget is spent without meeting the tolerance.
    """
    scope: dict[str, Any] = {}
    after_gelu: list[str] = []
    target = modality_of(bundle).quantization_scope
    if target:  # which operators and nodes the modality's backbones quantize (a transformer's matrix products)
        module, _, name = target.partition(":")
        scope, after_gelu = getattr(importlib.import_module(module), name)(float_model)
    quantize = Quantizer(float_model, workdir, recipe, calib.pixels, **scope)
    head = bundle.head()
    ref = reference_features(bundle, calib.pixels)

    search = calib.subset(min(len(calib), SEARCH_IMAGES))
    ref = ref[:len(search)]

    def evaluate(path: Path) -> dict[str, Any]:
        with open_runner(path, recipe) as runner:
            return feature_figures(ref, run_batched(runner.run, search.pixels), head, search.labels)

    start = time.perf_counter()
    plural = modality_of(bundle).plural  # what the calibration samples are called in messages
    _say(progress, f"quantizing ({recipe.name} QDQ) with {len(calib)} calibration {plural}")
    candidate = workdir / "trial.onnx"
    quantize([], candidate)
    best = evaluate(candidate)
    trials = [{"kept_in_float": [], **_short(best)}]
    excluded: list[str] = []
    ranking: list[dict[str, Any]] = []
    damage: dict[str, float] = {}
    if not meets(best, tolerance, SEARCH_COSINE_MARGIN):
        _say(progress, f"all layers int8: mean cosine {best['mean_cosine']:.4f}, top-1 agreement "
                       f"{best['top1_agreement']:.3f} on {len(search)} calibration {plural}; searching layers to keep in float")
        shutil.copyfile(candidate, workdir / "best.onnx")
        ranking, damage = rank_layers(quantize, candidate, bundle, calib)
        for node in list(damage)[:MAX_KEPT]:
            trial = excluded + [node]
            quantize(trial, candidate)
            fig = evaluate(candidate)
            trials.append({"kept_in_float": trial, **_short(fig)})
            if _score(fig) > _score(best):
                excluded, best = trial, fig
                shutil.copyfile(candidate, workdir / "best.onnx")
                _say(progress, f"  keep {', '.join(trial)} in float: mean cosine {fig['mean_cosine']:.4f}, "
                               f"top-1 agreement {fig['top1_agreement']:.3f}")
            if meets(best, tolerance, SEARCH_COSINE_MARGIN):
                break
        shutil.copyfile(workdir / "best.onnx", candidate)
    # judged on calibration images: a drop of one of them is accepted, as during the search (a 96-image
    # search set makes one image 1.04 points); the held-out validation that follows applies the tolerance
    if not meets(best, tolerance, one_sample=True):
        raise ValidationError(
            f"int8 ({recipe.name} QDQ) cannot meet the tolerance on the calibration {plural}",
            [f"- features (calibration, {len(search)} {plural}): mean cosine = {best['mean_cosine']:.4f} "
             f"(min {tolerance.min_cosine}), accuracy drop {100 * best.get('accuracy_drop', 0):.1f} points, "
             f"with {len(excluded)} layer(s) kept in float after {len(trials)} trial(s)"],
            todo=f"nothing was written; try more --calib {plural} or a larger --max-drop")
    shutil.move(str(candidate), out_path)
    if scope:
        excluded = [*after_gelu, *excluded]  # every weighted layer left in float
    return {"recipe": recipe.name, "description": recipe.description, "validated_runtime": "onnxruntime" if recipe.int8_kernels else "reference",
            "calibration_images": len(calib), "calibration_method": "MinMax", "per_channel": True,
            "search_images": len(search), "kept_in_float": excluded, "search": trials,
            "sensitivity": ranking[:TOP_LOCAL * 2], "damage_alone": damage,
            "search_seconds": round(time.perf_counter() - start, 1)}


_CALIBRATIONS: dict[tuple[str, str], bytes] = {}


class Quantizer:
    """ONNX Runtime static QDQ quantization of one model, calibrated once (the ranges are cached).

    ``quantizer(excluded, target)`` writes a QDQ model keeping the ``excluded`` nodes in float.
    """

    def __init__(self, float_model: Path, workdir: Path, recipe: QdqRecipe, pixels: EngineInputs,
                 op_types: list[str] | None = None, nodes: list[str] | None = None):
        self.q = require("onnxruntime.quantization", "int8 quantization for ONNX Runtime")
        workdir.mkdir(parents=True, exist_ok=True)
        # quantize_static writes '<model>-inferred.onnx' beside its input: work on a copy, never in the bundle
        self.source = workdir / "float.onnx"
        shutil.copyfile(float_model, self.source)
        self.cache = workdir / "calibration.json"
        self.recipe = recipe
        self.pixels = pixels
        #: op types to quantize (None: ONNX Runtime's default list), and the nodes (None: every node of them)
        self.op_types = op_types
        self.nodes = nodes
        # MinMax ranges depend on the model and the images only (not on the recipe): calibrate once per process
        self.key = (file_sha256(float_model), inputs_digest(pixels))
        if self.key in _CALIBRATIONS:
            self.cache.write_bytes(_CALIBRATIONS[self.key])

    def _reader(self):
        # a single-input model's feeds are named by the model itself (image, audio, ...), never assumed
        onnx = require("onnx", "int8 quantization for ONNX Runtime")
        first_input = onnx.load(str(self.source), load_external_data=False).graph.input[0].name
        items = iter(single_feeds(self.pixels, first_input))

        class Reader(self.q.CalibrationDataReader):
            def get_next(self):
                return next(items, None)

        return Reader()

    def __call__(self, excluded: list[str], target: Path, only: list[str] | None = None) -> None:
        q = self.q
        logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs advice on the root logger
        q.quantize_static(
            str(self.source), str(target), None if self.cache.exists() else self._reader(),
            quant_format=q.QuantFormat.QDQ, per_channel=True,
            activation_type=q.QuantType.QInt8 if self.recipe.symmetric else q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax,
            nodes_to_exclude=list(excluded), nodes_to_quantize=only if only is not None else self.nodes,
            extra_options=dict(self.recipe.extra),
            op_types_to_quantize=self.op_types,
            calibration_cache_path=str(self.cache))
        _CALIBRATIONS.setdefault(self.key, self.cache.read_bytes())


def transformer_scope(float_model: Path) -> tuple[dict[str, Any], list[str]]:
    """The quantizer's scope for a transformer (a text backbone): its weighted matrix products, less those
    that read a GELU's output (:func:`transformer_quantizable`), and those left in float."""
    nodes, after_gelu = transformer_quantizable(float_model)
    return {"op_types": ["MatMul", "Gemm"], "nodes": nodes}, after_gelu


def transformer_quantizable(float_model: Path) -> tuple[list[str], list[str]]:
    """A transformer's matrix products with a weight (names), split into those to quantize and those that
    read a GELU's output (kept in float; see the module docstring). The GELU is found by its Erf."""
    onnx = require("onnx", "int8 quantization of a transformer")
    graph = onnx.load(str(float_model), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    producer = {t: n for n in graph.node for t in n.output}

    def reads_gelu(tensor: str) -> bool:
        # x * 0.5 * (1 + erf(x / sqrt 2)): an Erf within a few elementwise steps up any input
        frontier = [tensor]
        for _ in range(4):
            nodes = [producer[t] for t in frontier if t in producer]
            if any(n.op_type in ("Erf", "Gelu") for n in nodes):
                return True
            frontier = [t for n in nodes if n.op_type in ("Mul", "Add", "Div") for t in n.input if t not in weights]
        return False

    quantize, after_gelu = [], []
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm") and any(t in weights for t in node.input[1:]):
            (after_gelu if reads_gelu(node.input[0]) else quantize).append(node.name)
    return quantize, after_gelu


def rank_layers(quantize: Quantizer, qdq_model: Path, bundle: Bundle,
                calib: LabelledImages) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Candidates to keep in float, most harmful first, as ``{node: damage}``, and the local SQNR ranking.

    Local SQNR (one run, see :func:`layer_sensitivity`) does not see how much the rest of the network
    amplifies an early layer's error, so the first layers are always candidates too. Each candidate's
    damage is ``1 - mean cosine`` of the features when it is the *only* int8 layer.
    """
    ranking = layer_sensitivity(quantize.source, qdq_model, take(calib.pixels, slice(0, SENSITIVITY_IMAGES)),
                                quantize.recipe)
    shortlist = list(dict.fromkeys(_first_quantized(ranking, quantize.source, FIRST_LAYERS)
                                   + [r["node"] for r in ranking[:TOP_LOCAL]]))
    probe = calib.subset(min(len(calib), PROBE_IMAGES))
    ref = reference_features(bundle, probe.pixels)
    head = bundle.head()
    target = qdq_model.with_name("probe.onnx")
    damage: dict[str, float] = {}
    for node in shortlist:
        quantize([], target, only=[node])
        with open_runner(target, quantize.recipe) as runner:
            damage[node] = round(1.0 - feature_figures(ref, run_batched(runner.run, probe.pixels), head)["mean_cosine"], 6)
    return ranking, dict(sorted(damage.items(), key=lambda kv: kv[1], reverse=True))


def _first_quantized(ranking: list[dict[str, Any]], float_model: Path, count: int) -> list[str]:
    """The first ``count`` ranked (i.e. quantized) weighted layers in graph order."""
    onnx = require("onnx", "the int8 sensitivity search")
    ranked = {r["node"] for r in ranking}
    order = [n.name for n in onnx.load(str(float_model), load_external_data=False).graph.node if n.name in ranked]
    return order[:count]


def _score(fig: dict[str, Any]) -> float:
    return fig["mean_cosine"] + fig["top1_agreement"] - max(0.0, fig.get("accuracy_drop", 0.0))


def _short(fig: dict[str, Any]) -> dict[str, Any]:
    keys = ("mean_cosine", "top1_agreement", "accuracy_reference", "accuracy", "accuracy_drop")
    return {k: round(fig[k], 4) for k in keys if k in fig}


# long: one walk over the QDQ graph builds every layer's measuring branch from the maps it shares (producers,
# consumers, initializers, the float tensors); split up, each step would take all of them
def layer_sensitivity(float_path: Path, qdq_path: Path, pixels: EngineInputs, recipe: QdqRecipe) -> list[dict[str, Any]]:
    """Each quantized weighted layer's own SQNR (worst first), measured with the recipe's runtime.

    One model is built from the float model plus, for every quantized layer of the QDQ model, a copy
    of that layer with its Q/DQ nodes, fed by the float model's tensor at the layer's input. Running
    it compares each copy's output with the float output at the same point.
    """
    onnx = require("onnx", "the int8 sensitivity search")
    ort = require("onnxruntime", "the int8 sensitivity search")
    from onnx import helper

    fm, qm = onnx.load(str(float_path)), onnx.load(str(qdq_path))
    float_tensors = {t for n in fm.graph.node for t in n.output} | {i.name for i in fm.graph.input} \
        | {i.name for i in fm.graph.initializer}
    producer = {t: n for n in qm.graph.node for t in n.output}
    consumers: dict[str, list] = {}
    for n in qm.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    q_inits = {i.name: i for i in qm.graph.initializer}
    branches: list[tuple[str, str, str]] = []  # (layer name, branch output, float tensor to compare with)
    added_inits: set[str] = set()
    for index, node in enumerate(qm.graph.node):
        if node.op_type not in WEIGHTED_OPS:
            continue
        dq_a = producer.get(node.input[0])
        q_a = producer.get(dq_a.input[0]) if dq_a is not None and dq_a.op_type == "DequantizeLinear" else None
        if q_a is None or q_a.op_type != "QuantizeLinear" or q_a.input[0] not in float_tensors:
            continue  # this layer's input is not quantized
        chain, tail = [], node.output[0]
        while len(consumers.get(tail, [])) == 1 and consumers[tail][0].op_type in ("Clip", "Relu"):
            chain.append(consumers[tail][0])
            tail = chain[-1].output[0]
        q_o = next((c for c in consumers.get(tail, []) if c.op_type == "QuantizeLinear"), None)
        compare = q_o.input[0] if q_o is not None else tail
        if compare not in float_tensors:
            continue
        p = f"sensitivity{index}/"
        new_nodes = [_copy(helper, q_a, {q_a.input[0]: q_a.input[0]}, p),
                     _copy(helper, dq_a, {dq_a.input[0]: p + dq_a.input[0]}, p)]
        inputs = [p + node.input[0]]
        usable = True
        for t in node.input[1:]:
            src = producer.get(t)
            if src is not None and src.op_type == "DequantizeLinear":
                q_src = producer.get(src.input[0])
                if q_src is not None and q_src.op_type == "QuantizeLinear":
                    # a second quantized activation (a transformer's Q·Kᵀ and attention·V): quantize the
                    # float model's tensor here too
                    usable = usable and q_src.input[0] in float_tensors
                    new_nodes.append(_copy(helper, q_src, {}, p))
                    new_nodes.append(_copy(helper, src, {src.input[0]: p + src.input[0]}, p))
                else:
                    new_nodes.append(_copy(helper, src, {}, p))
                inputs.append(p + t)
            else:
                inputs.append(t)
        if not usable:
            continue
        new_nodes.append(helper.make_node(node.op_type, inputs, [p + node.output[0]], name=p + node.name,
                                          domain=node.domain))
        new_nodes[-1].attribute.extend(node.attribute)
        for c in chain:
            new_nodes.append(_copy(helper, c, {c.input[0]: p + c.input[0]}, p))
        out = p + tail
        if q_o is not None:
            dq_o = next(c for c in consumers[q_o.output[0]] if c.op_type == "DequantizeLinear") \
                if any(c.op_type == "DequantizeLinear" for c in consumers.get(q_o.output[0], [])) else None
            new_nodes.append(_copy(helper, q_o, {q_o.input[0]: out}, p))
            scale_zp = list(dq_o.input[1:]) if dq_o is not None else list(q_o.input[1:])
            new_nodes.append(helper.make_node("DequantizeLinear", [p + q_o.output[0], *scale_zp], [p + "out"],
                                              name=p + "dq_out"))
            out = p + "out"
            # Conv -> Q -> DQ -> Clip (symmetric recipes keep the activation after the Q/DQ pair): measure
            # after the activation, where values outside its range no longer matter.
            after = dq_o.output[0] if dq_o is not None else None
            while after is not None and len(consumers.get(after, [])) == 1 \
                    and consumers[after][0].op_type in ("Clip", "Relu") and consumers[after][0].output[0] in float_tensors:
                act = consumers[after][0]
                new_nodes.append(_copy(helper, act, {act.input[0]: out}, p))
                out, compare, after = p + act.output[0], act.output[0], act.output[0]
        for n in new_nodes:
            for t in n.input:
                if t in q_inits and t not in float_tensors and t not in added_inits:
                    fm.graph.initializer.append(q_inits[t])
                    added_inits.add(t)
        fm.graph.node.extend(new_nodes)
        branches.append((node.name, out, compare))
    present = {o.name for o in fm.graph.output}
    for _, out, compare in branches:
        for t in (out, compare):
            if t not in present:
                fm.graph.output.append(helper.ValueInfoProto(name=t))
                present.add(t)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not recipe.int8_kernels:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(fm.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [t for _, out, compare in branches for t in (out, compare)]
    signal = np.zeros(len(branches))
    noise = np.zeros(len(branches))
    for feed in single_feeds(pixels, fm.graph.input[0].name):
        values = dict(zip(names, session.run(names, feed)))
        for k, (_, out, compare) in enumerate(branches):
            a, b = values[compare].astype(np.float64), values[out].astype(np.float64)
            signal[k] += float(np.sum(a * a))
            noise[k] += float(np.sum((a - b) ** 2))
    sqnr = 10 * np.log10(np.maximum(signal, 1e-30) / np.maximum(noise, 1e-30))
    rows = [{"node": name, "sqnr_db": round(float(s), 2)} for (name, _, _), s in zip(branches, sqnr)]
    return sorted(rows, key=lambda r: r["sqnr_db"])


def _copy(helper, node, rename: dict[str, str], prefix: str):
    """A copy of ``node`` whose outputs get ``prefix``; inputs renamed by ``rename`` (others kept)."""
    inputs = [rename.get(t, t) for t in node.input]
    copy = helper.make_node(node.op_type, inputs, [prefix + t for t in node.output], name=prefix + node.name,
                            domain=node.domain)
    copy.attribute.extend(node.attribute)
    return copy


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)

