"""ONNX Runtime backend: CPU here; CUDA / TensorRT execution providers when the device has them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgexfer.runtime.backends.base import EngineRunner, TensorSpec
from edgexfer.runtime.backends.spec import BackendSpec
from edgexfer.runtime.errors import BundleError, InputError
from edgexfer.runtime.optional import require

#: onnxruntime's names of input types -> numpy dtype names
ONNX_TYPES = {"tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(float)": "float32", "tensor(float16)": "float16"}


class OnnxRuntimeBackend(EngineRunner):
    name = "onnxruntime"
    takes_threads = True  # intra-op threads of the CPU provider

    def __init__(self, model_path: str | Path, precision: str = "fp32", *, providers: list[str] | None = None,
                 threads: int | None = None):
        super().__init__(model_path, precision, threads=threads)
        ort = require("onnxruntime", "the onnxruntime backend")
        if not self.model_path.is_file():
            raise BundleError("ONNX model not found", got=str(self.model_path), expected="an existing .onnx file")
        available = ort.get_available_providers()
        # Default: the GPU when this onnxruntime build has one (Jetson's onnxruntime-gpu), else the CPU.
        # The CPU provider stays listed after CUDA because ONNX Runtime places the few ops CUDA lacks
        # there; which providers the session really uses is recorded in `details`.
        wanted = providers or (["CUDAExecutionProvider", "CPUExecutionProvider"]
                               if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"])
        missing = [p for p in wanted if p not in available]
        if missing:
            # No silent fallback: asking for CUDA on a machine without it is an error.
            raise InputError("ONNX Runtime execution provider not available", got=", ".join(missing),
                             expected=f"one of {', '.join(available)}", todo="choose another --providers value")
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types for bad models
            raise BundleError("ONNX Runtime cannot load the model", got=f"{self.model_path.name}: {str(exc)[:200]}",
                              expected="a valid ONNX model", todo="re-export the bundle") from None
        # one input (image: uint8 pixels) or several (text: int64 input_ids and attention_mask)
        self._inputs = tuple(TensorSpec(i.name, tuple(d if isinstance(d, int) else None for d in i.shape),
                                        ONNX_TYPES.get(i.type, i.type)) for i in self.session.get_inputs())
        self._input = self._inputs[0]
        self._output = self.session.get_outputs()[0].name
        self.details = {"providers": self.session.get_providers(), "onnxruntime": ort.__version__}

    def input_spec(self) -> TensorSpec:
        return self._input

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self._output], {self._input.name: batch})[0]

    def run_feed_impl(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self._output], feed)[0]


class OnnxRuntimeSpec(BackendSpec):
    """ONNX Runtime: the bundle's own ``backbone.onnx`` is its fp32 engine; int8/fp16 come from ``convert``."""

    name = "onnxruntime"
    runner = "edgexfer.runtime.backends.onnxruntime:OnnxRuntimeBackend"
    requires = ("onnxruntime",)
    precisions = ("fp32", "fp16", "int8")
    auto_rank = 2  # the fallback every install has
    tools = ("onnxruntime", "onnx")
    converter = "edgexfer.converters.to_onnxruntime:convert_onnxruntime"

    def bundle_model(self, bundle, precision: str) -> Path | None:
        model = self.recorded_model(bundle, precision)
        if model is None and precision == "fp32" and bundle.backbone_path.name in bundle.manifest.files:
            # no offline-optimised engine recorded: the bundle's own backbone is the fp32 ORT model
            return bundle.backbone_path
        return model
