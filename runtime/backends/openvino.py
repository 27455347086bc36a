"""OpenVINO backend: an IR (``backbone.xml`` + ``.bin``) compiled for CPU (or another OpenVINO device).

With ``cache_dir`` (the device's ``state/engines/<key>/``) the compiled model is kept as a blob and
imported on later loads instead of compiled again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgexfer.runtime.backends.base import EngineRunner, TensorSpec
from edgexfer.runtime.errors import BundleError, InputError
from edgexfer.runtime.optional import require
from edgexfer.runtime.precision import check_openvino_ran, openvino_config, openvino_inference_precision


class OpenVinoBackend(EngineRunner):
    name = "openvino"

    def __init__(self, model_path: str | Path, precision: str = "fp32", *, device: str = "CPU",
                 threads: int | None = None, cache_dir: str | Path | None = None):
        super().__init__(model_path, precision)
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
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None:
            # OpenVINO's model cache: the first compile writes a blob there, later loads import it
            config["CACHE_DIR"] = str(cache_dir)
        try:
            self.compiled = core.compile_model(str(self.model_path), device, config)
        except RuntimeError as exc:
            raise BundleError("OpenVINO cannot load the model", got=f"{self.model_path.name}: {str(exc)[:200]}",
                              expected="a valid IR with its .bin beside it", todo="convert the bundle again") from None
        port = self.compiled.input(0)
        shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        self._input = TensorSpec(port.get_any_name(), shape, np.dtype(port.get_element_type().to_dtype()).name)
        self._request = self.compiled.create_infer_request()
        self.inference_precision = openvino_inference_precision(self.compiled)
        check_openvino_ran(precision, device, self.inference_precision)
        self.details = {"openvino": ov.get_version(), "device": device, "inference_precision": self.inference_precision,
                        **_scheduling(self.compiled)}
        if cache_dir is not None:
            self.details["cache_dir"] = str(cache_dir)

    def input_spec(self) -> TensorSpec:
        return self._input

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        result = self._request.infer({0: batch})
        # The request reuses its output buffer on the next call: hand out a copy.
        return np.array(result[self.compiled.output(0)], dtype=np.float32, copy=True)


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
