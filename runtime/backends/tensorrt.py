"""TensorRT backend: a serialized plan (``backbone.plan``) run on a CUDA GPU through TensorRT's Python API.

An image plan has one input (uint8 pixels); a text plan two, ``input_ids`` and ``attention_mask``, int64
as the bundle contract says. TensorRT 8 has no INT64 tensors and builds them as INT32 inputs: the
backend still takes int64 arrays and casts them (token ids and a 0/1 mask fit exactly).

CUDA memory is handled through the CUDA runtime library with ctypes, so neither torch nor pycuda is
needed. A plan is only valid for the TensorRT version and GPU it was built for: ``engine_key.json``
beside it (written by ``edgexfer convert``) is checked before the plan is deserialized.
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np

from edgexfer.runtime.backends.base import EngineRunner, TensorSpec
from edgexfer.runtime.errors import BundleError, MissingDependencyError
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
