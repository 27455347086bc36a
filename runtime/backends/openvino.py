"""OpenVINO backend: an IR (``backbone.xml`` + ``.bin``) compiled for CPU (or another OpenVINO device).

The IR's batch dimension is dynamic (any N). OpenVINO runs a dynamic-shape model 5-8 % slower than the
same model with static shapes (shape inference and memory planning on every call; measured on
EfficientNet-Lite0, fp32/bf16/int8, see benchmarks/README.md), so batch 1, the latency path of
``predict`` and the device, runs a copy compiled for exactly [1, H, W, 3]; other batch sizes run the
dynamic model, compiled on the first call that needs it.

With ``cache_dir`` (the device's ``state/engines/<key>/``) the compiled models are kept as blobs and
imported on later loads instead of compiled again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.backends.base import EngineRunner, TensorSpec
from edgexfer.runtime.backends.spec import BackendSpec, Located, source_sha
from edgexfer.runtime.cpu import CpuFeatures, cpu_features
from edgexfer.runtime.engine_store import EngineKey, package_version
from edgexfer.runtime.errors import BundleError, InputError
from edgexfer.runtime.optional import require
from edgexfer.runtime.precision import PRECISIONS, PrecisionError, check_precision


def openvino_config(precision: str, device: str = "CPU", features: CpuFeatures | None = None) -> dict[str, Any]:
    """The compile properties that make OpenVINO compute in ``precision`` on ``device``."""
    if not device.startswith("CPU") and precision == "bf16":
        raise PrecisionError("bf16 on OpenVINO", got=f"device {device}", expected="device CPU",
                             todo="use fp16 on OpenVINO GPU/NPU devices")
    check_precision(precision, OpenVinoSpec.name, features)
    if device.startswith("CPU"):
        # fp16 and int8 float parts stay f32 on CPUs: bf16 only when asked for by name
        return {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    # GPUs: fp32 stays f32; fp16 and the float parts of int8 compute in f16 (the GPU plugin's native type)
    return {"INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "f16"}


def openvino_inference_precision(compiled) -> str:
    """What a compiled OpenVINO model computes its float parts in (``f32``, ``bf16``, ``f16``)."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    text = str(getattr(value, "get_type_name", lambda: value)()).lower()
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(text, text)


def check_openvino_ran(precision: str, device: str, ran: str) -> None:
    """The compiled model must compute in what was asked for (a plugin may silently ignore a hint)."""
    want = openvino_config(precision, device)["INFERENCE_PRECISION_HINT"]
    if ran != want:
        raise PrecisionError(f"OpenVINO {precision} engine on {device}", got=f"computes in {ran}",
                             expected=f"computes in {want}",
                             todo="report this: the OpenVINO plugin ignored INFERENCE_PRECISION_HINT")



class OpenVinoBackend(EngineRunner):
    name = "openvino"
    takes_threads = True  # INFERENCE_NUM_THREADS of the compiled model

    def __init__(self, model_path: str | Path, precision: str = "fp32", *, device: str = "CPU",
                 threads: int | None = None, cache_dir: str | Path | None = None):
        super().__init__(model_path, precision, threads=threads)
        ov = require("openvino", "the openvino backend")
        if self.model_path.suffix != ".xml" or not self.model_path.is_file():
            raise BundleError("OpenVINO model not found", got=str(self.model_path), expected="an existing .xml IR file")
        core = ov.Core()
        if device not in core.available_devices:
            # No silent fallback to another device.
            raise InputError("OpenVINO device not available", got=device,
                             expected=f"one of {', '.join(core.available_devices)}", todo="choose another device")
        # Every precision is set by name: on CPUs with AVX512-BF16 or AMX, OpenVINO would otherwise
        # compute fp32, fp16 and int8 engines in bf16.
        config: dict[str, object] = openvino_config(precision, device)
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        if cache_dir is not None:
            # OpenVINO's model cache: the first compile writes a blob there, later loads import it
            config["CACHE_DIR"] = str(cache_dir)
        self._core, self._device, self._config = core, device, config
        try:
            model = core.read_model(str(self.model_path))
            # one input (image: uint8 pixels) or several (text: int64 input_ids and attention_mask)
            self._inputs = tuple(_spec(port) for port in model.inputs)
            self._input = self._inputs[0]
            shape = self._input.shape if len(self._inputs) == 1 else ()
            #: the dynamic-batch model, compiled when a batch other than 1 first arrives
            self._any_batch: tuple | None = None
            self._any_batch_model = None
            if len(shape) >= 2 and shape[0] is None and all(d is not None for d in shape[1:]):
                self._any_batch_model = model
                single = model.clone()
                single.reshape({0: ov.PartialShape([1, *shape[1:]])})
                self.compiled = core.compile_model(single, device, config)
            else:
                self.compiled = core.compile_model(model, device, config)
        except RuntimeError as exc:
            raise BundleError("OpenVINO cannot load the model", got=f"{self.model_path.name}: {str(exc)[:200]}",
                              expected="a valid IR with its .bin beside it", todo="convert the bundle again") from None
        self._request = self.compiled.create_infer_request()
        self._output = self.compiled.output(0)
        #: the batch-1 request's own input memory: a batch is copied in, instead of handing the request a
        #: new tensor per call (``infer({0: batch})``), which costs ~3 % of a call on this CPU plugin
        self._input_tensor = self._request.get_input_tensor(0) if self._any_batch_model is not None else None
        self.inference_precision = openvino_inference_precision(self.compiled)
        check_openvino_ran(precision, device, self.inference_precision)
        self.details = {"openvino": ov.get_version(), "device": device, "inference_precision": self.inference_precision,
                        "batch1_static": self._any_batch_model is not None, **_scheduling(self.compiled)}
        if cache_dir is not None:
            self.details["cache_dir"] = str(cache_dir)

    def input_spec(self) -> TensorSpec:
        return self._input

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    def run_feed_impl(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        if len(feed) == 1:
            return self.run_impl(next(iter(feed.values())))
        # a text engine: batch and sequence length both dynamic, so one dynamic-shape model serves every call
        result = self._request.infer(feed)
        return np.array(result[self._output], dtype=np.float32, copy=True)

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        if self._input_tensor is not None and batch.shape[0] == 1:
            np.copyto(self._input_tensor.data, batch)
            self._request.infer()
            # The request reuses its output buffer on the next call: hand out a copy.
            return np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        request, output = (self._any_batch_request() if self._any_batch_model is not None
                           else (self._request, self._output))
        result = request.infer({0: batch})
        return np.array(result[output], dtype=np.float32, copy=True)

    def _any_batch_request(self):
        if self._any_batch is None:
            compiled = self._core.compile_model(self._any_batch_model, self._device, self._config)
            check_openvino_ran(self.precision, self._device, openvino_inference_precision(compiled))
            self._any_batch = (compiled.create_infer_request(), compiled.output(0))
        return self._any_batch


def _spec(port) -> TensorSpec:
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), shape, np.dtype(port.get_element_type().to_dtype()).name)


def _scheduling(compiled) -> dict[str, object]:
    """How the compiled model schedules work (read back, as benchmark_app prints it): hint, streams, threads."""
    out: dict[str, object] = {}
    for key, prop in (("performance_hint", "PERFORMANCE_HINT"), ("num_streams", "NUM_STREAMS"),
                      ("inference_num_threads", "INFERENCE_NUM_THREADS")):
        try:
            value = compiled.get_property(prop)
        except RuntimeError:  # a device that does not report it
            continue
        out[key] = value if isinstance(value, int) else str(getattr(value, "name", value))
    return out


def openvino_key(precision: str, backbone_sha256: str, source_sha256: str = "", device: str = "CPU") -> EngineKey | None:
    version = package_version("openvino")
    if version is None:
        return None
    # OpenVINO compiles CPU kernels for the instruction sets it finds: the ISA flags key the entry, so
    # a state directory moved to another kind of CPU builds (and golden-checks) its engine again
    name = f"{device} {cpu_features().signature}" if device == "CPU" else device
    return EngineKey(OpenVinoSpec.name, version, name, precision, backbone_sha256,
                     (("openvino_device", device), ("cpu", cpu_features().model)), source_sha256)


class OpenVinoSpec(BackendSpec):
    """OpenVINO: an IR ``convert`` wrote, compiled once per device into ``state/engines/<key>/`` (its model cache)."""

    name = "openvino"
    runner = "edgexfer.runtime.backends.openvino:OpenVinoBackend"
    requires = ("openvino",)
    precisions = PRECISIONS
    bf16_on_cpu = True  # the CPU plugin computes bf16 with avx512_bf16 / amx_bf16
    auto_rank = 1
    model_suffixes = (".xml",)
    tools = ("openvino", "nncf", "onnx")
    converter = "edgexfer.converters.to_openvino:convert_openvino"

    def engine_key(self, device, bundle, precision: str) -> EngineKey | None:
        model = self.recorded_model(bundle, precision)
        if model is None:
            return None
        return openvino_key(precision, bundle.manifest.backbone.sha256, source_sha(bundle, model))

    def installed_version(self) -> str | None:
        key = openvino_key("fp32", "")
        return key.engine_version if key is not None else None

    def prepare(self, device, bundle, precision: str) -> tuple[EngineKey | None, dict[str, Any]]:
        key = self.engine_key(device, bundle, precision)
        if key is None:
            return None, {"built": False}
        model = self.recorded_model(bundle, precision)

        def compile_into(out: Path) -> dict[str, Any]:
            from edgexfer.runtime.backends.registry import open_backend

            with open_backend(self.name, model, precision=precision, cache_dir=out) as runner:
                return {"compile_seconds": round(runner.stats.load_seconds, 3)}

        _, done = device.engines.build(key, compile_into)
        return key, done

    def locate(self, device, bundle, precision: str) -> Located:
        model, options, source = super().locate(device, bundle, precision)
        key = self.engine_key(device, bundle, precision)
        entry = device.engines.lookup(key) if key is not None else None
        if entry is not None:
            return model, {"cache_dir": entry}, f"{source} compiled in engines/{key.key}"
        return model, options, source
