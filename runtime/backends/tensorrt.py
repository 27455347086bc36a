"""TensorRT backend: a serialized plan (``backbone.plan``) run on a CUDA GPU through TensorRT's Python API.

An image plan has one input (uint8 pixels); a text plan two, ``input_ids`` and ``attention_mask``, int64
as the bundle contract says. TensorRT 8 has no INT64 tensors and builds them as INT32 inputs: the
backend still takes int64 arrays and casts them (token ids and a 0/1 mask fit exactly).

CUDA memory is handled through the CUDA runtime library with ctypes, so neither torch nor pycuda is
needed. A plan is only valid for the TensorRT version and GPU it was built for: ``engine_key.json``
beside it (written by ``edgexfer convert``) is checked before the plan is deserialized.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.backends.base import EngineRunner, TensorSpec
from edgexfer.runtime.backends.spec import BackendSpec, Located, source_sha
from edgexfer.runtime.engine_store import EngineKey, cuda_device, package_version
from edgexfer.runtime.errors import BundleError, MissingDependencyError
from edgexfer.runtime.modalities import modality_named
from edgexfer.runtime.optional import require

_H2D, _D2H = 1, 2  # cudaMemcpyKind


class _Cuda:
    """The few CUDA runtime calls a backend needs; every failure is a typed error."""

    def __init__(self):
        for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0"):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise MissingDependencyError("the tensorrt backend needs the CUDA runtime", got="no libcudart.so",
                                         expected="CUDA installed (JetPack ships it)", todo="install CUDA or pick another backend")
        self.stream = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(self.stream)), "cudaStreamCreate")

    def check(self, status: int, call: str) -> None:
        if status != 0:
            raise BundleError(f"CUDA call {call} failed", got=f"error {status}", expected="0 (cudaSuccess)",
                              todo="check the GPU with nvidia-smi / tegrastats")

    def compute_capability(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0), "cudaDeviceGetAttribute")
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0), "cudaDeviceGetAttribute")
        return f"{major.value}.{minor.value}"

    def malloc(self, size: int) -> ctypes.c_void_p:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(size)), "cudaMalloc")
        return ptr

    def copy(self, dst, src, size: int, kind: int) -> None:
        self.check(self.lib.cudaMemcpy(dst, src, ctypes.c_size_t(size), kind), "cudaMemcpy")


class TensorRtBackend(EngineRunner):
    name = "tensorrt"

    def __init__(self, model_path: str | Path, precision: str = "fp32", *, threads: int | None = None):
        super().__init__(model_path, precision, threads=threads)  # refuses a thread count: GPU engine
        trt = require("tensorrt", "the tensorrt backend")
        if self.model_path.suffix not in (".plan", ".engine") or not self.model_path.is_file():
            raise BundleError("TensorRT engine not found", got=str(self.model_path), expected="a built .plan file",
                              todo="run `edgexfer convert BUNDLE --to tensorrt` on this device")
        self.cuda = _Cuda()
        key_file = self.model_path.parent / "engine_key.json"
        key = json.loads(key_file.read_text()) if key_file.is_file() else {}
        here = {"tensorrt": trt.__version__, "sm": self.cuda.compute_capability()}
        if any(key.get(k) != v for k, v in here.items()):
            raise BundleError("stale TensorRT engine", got=f"built for TensorRT {key.get('tensorrt')} sm {key.get('sm')}",
                              expected=f"TensorRT {here['tensorrt']} sm {here['sm']}",
                              todo="rebuild: `edgexfer convert BUNDLE --to tensorrt --force` on this device")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.model_path.read_bytes())
        if self.engine is None:
            raise BundleError("TensorRT cannot deserialize the engine", got=self.model_path.name,
                              expected="a plan from this TensorRT version", todo="rebuild the engine on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._out = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        #: what the plan binds per input (int32 where TensorRT 8 made an int64 input int32)
        self._bound = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in inputs}
        self._inputs = tuple(
            TensorSpec(n, tuple(None if d < 0 else int(d) for d in self.engine.get_tensor_shape(n)),
                       "int64" if self._bound[n] == np.int32 else self._bound[n].name)
            for n in inputs)
        self._input = self._inputs[0]
        self._in = self._input.name
        self.details = {"tensorrt": trt.__version__, "sm": here["sm"], "engine_key": key.get("key")}
        if any(dtype == np.int32 for dtype in self._bound.values()):
            self.details["int64_inputs_bound_as"] = "int32"

    def input_spec(self) -> TensorSpec:
        return self._input

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        return self.run_feed_impl({self._in: batch})

    def run_feed_impl(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        arrays = {n: np.ascontiguousarray(a, dtype=self._bound[n]) for n, a in feed.items()}
        for name, array in arrays.items():
            self.context.set_input_shape(name, array.shape)
        out = np.empty(tuple(self.context.get_tensor_shape(self._out)), dtype=np.float32)
        device: dict[str, ctypes.c_void_p] = {}
        try:
            for name, array in arrays.items():
                device[name] = self.cuda.malloc(array.nbytes)
                self.cuda.copy(device[name], array.ctypes.data_as(ctypes.c_void_p), array.nbytes, _H2D)
                self.context.set_tensor_address(name, device[name].value)
            device[self._out] = self.cuda.malloc(out.nbytes)
            self.context.set_tensor_address(self._out, device[self._out].value)
            if not self.context.execute_async_v3(self.cuda.stream.value):
                raise BundleError("TensorRT inference failed", got=self.model_path.name, expected="a successful run")
            self.cuda.check(self.cuda.lib.cudaStreamSynchronize(self.cuda.stream), "cudaStreamSynchronize")
            self.cuda.copy(out.ctypes.data_as(ctypes.c_void_p), device[self._out], out.nbytes, _D2H)
        finally:
            for ptr in device.values():
                self.cuda.lib.cudaFree(ptr)
        return out

    def close(self) -> None:
        self.context = None
        self.engine = None


#: TensorRT optimisation profile of the batch dimension: (min, opt, max)
BATCH_PROFILE = (1, 8, 32)


def tensorrt_profiles(backbone) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Input name -> (min, opt, max) shapes of the one optimisation profile a TensorRT plan of ``backbone``
    (a manifest's ``backbone``) is built with, as its modality says (the batch, and a text's tokens up to its
    ``max_length``)."""
    return modality_named(backbone.modality)(backbone).engine_shapes(BATCH_PROFILE)


def tensorrt_profile_id(backbone) -> str:
    """The profile as a key part: empty where the shapes follow from the backbone (images: existing keys
    stay valid), the shapes of every input otherwise (texts)."""
    return modality_named(backbone.modality)(backbone).profile_id(BATCH_PROFILE)


@functools.lru_cache(maxsize=1)
def _tensorrt_device() -> tuple[str, dict[str, str]] | None:
    """TensorRT version and GPU of this machine, looked up once per process (loads libcuda)."""
    version = package_version("tensorrt")
    if version is None:
        with contextlib.suppress(ImportError):
            import tensorrt  # JetPack's TensorRT is a system package without pip metadata

            version = tensorrt.__version__
    gpu = cuda_device() if version else None
    return (version, gpu) if gpu is not None else None


def tensorrt_key(precision: str, backbone_sha256: str, source_sha256: str = "", profile: str = "") -> EngineKey | None:
    """The TensorRT target of this device, or None without TensorRT or a CUDA GPU."""
    found = _tensorrt_device()
    if found is None:
        return None
    version, gpu = found
    device = f"{gpu['name']} sm{gpu['compute_capability']}"
    # the TensorRT backend checks "tensorrt" and "sm" of engine_key.json before it deserializes a plan
    extra = (("tensorrt", version), ("gpu", gpu["name"]), ("sm", gpu["compute_capability"]))
    return EngineKey(TensorRtSpec.name, version, device, precision, backbone_sha256, extra, source_sha256, profile)


class TensorRtSpec(BackendSpec):
    """TensorRT: a plan is valid for one TensorRT version and GPU, so a device builds its own from the
    bundle's TensorRT kit (``engines/tensorrt/<precision>/``, written by ``convert --to tensorrt``) into
    ``state/engines/<key>/``, keyed by TensorRT version, GPU and SM, precision, backbone and input profile."""

    name = "tensorrt"
    runner = "edgexfer.runtime.backends.tensorrt:TensorRtBackend"
    requires = ("tensorrt",)
    precisions = ("fp32", "fp16", "int8")
    auto_rank = 0  # the GPU engine first where there is one
    model_suffixes = (".plan", ".engine")
    tools = ("tensorrt", "onnxruntime", "onnx")
    converter = "edgexfer.converters.to_tensorrt:convert_tensorrt"
    device_builder = "edgexfer.converters.to_tensorrt:build_device_engine"

    @staticmethod
    def kit(bundle, precision: str) -> Path | None:
        """The ONNX model of the bundle's TensorRT device build kit for ``precision``, if it has one."""
        for name in ("backbone.qdq.onnx", "backbone.onnx"):
            rel = f"engines/tensorrt/{precision}/{name}"
            if rel in bundle.manifest.files:
                return bundle.root / rel
        return None

    def engine_key(self, device, bundle, precision: str) -> EngineKey | None:
        return tensorrt_key(precision, bundle.manifest.backbone.sha256, source_sha(bundle, self.kit(bundle, precision)),
                            tensorrt_profile_id(bundle.manifest.backbone))

    def installed_version(self) -> str | None:
        key = tensorrt_key("fp32", "")
        return key.engine_version if key is not None else None

    def has_engine(self, device, bundle, precision: str) -> bool:
        key = self.engine_key(device, bundle, precision)
        if key is None:  # TensorRT without a CUDA GPU
            return False
        return (device.engines.lookup(key) is not None or self.kit(bundle, precision) is not None
                or self.recorded_model(bundle, precision) is not None)

    def _device_key(self, device, bundle, precision: str) -> EngineKey:
        key = self.engine_key(device, bundle, precision)
        if key is None:
            require("tensorrt", "the tensorrt backend")  # names the extra when TensorRT is missing
            raise MissingDependencyError("the tensorrt backend needs a CUDA GPU", got="no GPU found through libcuda",
                                         expected="an NVIDIA GPU with its driver (JetPack on Jetson)",
                                         todo="pick --backend openvino or onnxruntime on this device")
        return key

    def prepare(self, device, bundle, precision: str) -> tuple[EngineKey | None, dict[str, Any]]:
        key = self._device_key(device, bundle, precision)
        if device.engines.lookup(key) is not None or self.kit(bundle, precision) is None:
            return key, {"built": False}
        builder = device.engine_builders.get(self.name)
        if builder is None:
            raise BundleError("no TensorRT engine builder given", got="Device(engine_builders=None)",
                              expected="the converters' builder", todo="use `edgexfer device install`, which passes it")
        _, done = device.engines.build(key, lambda out: builder(bundle, precision, out))
        return key, done

    def locate(self, device, bundle, precision: str) -> Located:
        key = self._device_key(device, bundle, precision)
        entry = device.engines.lookup(key)
        if entry is not None and (entry / "backbone.plan").is_file():
            return entry / "backbone.plan", {}, f"engines/{key.key}"
        model = self.recorded_model(bundle, precision)
        if model is not None:  # built by `edgexfer convert` on this device
            return model, {}, f"bundle:{model.relative_to(bundle.root)}"
        raise BundleError("no TensorRT engine built on this device", got=f"no {device.engines.path(key.key)}",
                          expected=f"a {precision} plan for {key.device}, TensorRT {key.engine_version}",
                          todo=f"run `edgexfer device install {bundle.root} --state {device.state.root} "
                               f"--backend tensorrt --precision {precision}` (it builds the engine)")
