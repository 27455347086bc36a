"""A toy backend, registered from the tests alone: ``tanh(x @ W + b)`` in numpy from a ``.npz`` file.

It proves the backend seam: a device installs, golden-checks, predicts, learns and retrains through it
while nothing under edgexfer/, converters/ or runtime/ names it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgexfer.runtime.backends.base import EngineRunner, TensorSpec
from edgexfer.runtime.backends.spec import BackendSpec


class NumpyTanhRunner(EngineRunner):
    name = "numpytanh"
    takes_threads = False

    def __init__(self, model_path: str | Path, precision: str = "fp32", *, threads: int | None = None):
        super().__init__(model_path, precision, threads=threads)
        with np.load(self.model_path, allow_pickle=False) as data:
            self.W, self.b = data["W"].astype(np.float32), data["b"].astype(np.float32)
        self.details = {"numpytanh": "1"}

    def input_spec(self) -> TensorSpec:
        return TensorSpec("vector", (None, int(self.W.shape[0])), "float32")

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        return np.tanh(batch @ self.W + self.b)


class NumpyTanhSpec(BackendSpec):
    name = "numpytanh"
    runner = "toy_backend:NumpyTanhRunner"
    requires = ("numpy",)
    precisions = ("fp32",)
    model_suffixes = (".npz",)
