"""The runners a bench target opens: the bundle's engines through the registry, and the PyTorch eager twin.

Every runner is an :class:`~edgexfer.runtime.backends.base.EngineRunner`, so the bench treats them
alike: the same input checks, ``stats`` (the time spent inside the engine), ``details``, ``execution``,
and ``threads`` where :attr:`~edgexfer.runtime.backends.base.EngineRunner.takes_threads` says so.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgexfer.bench.plan import TORCH_BACKEND, EngineTarget
from edgexfer.runtime.backends.base import EngineRunner, TensorSpec
from edgexfer.runtime.backends.registry import backend_class, open_backend
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.optional import require
from edgexfer.runtime.precision import execution_record

#: a backbone that gives the golden features within this is taken to have the bundle's weights
SAME_WEIGHTS_MAX_ABS_DIFF = 1e-3


class TorchEagerRunner(EngineRunner):
    """The bundle's backbone architecture run by PyTorch eager: uint8 NHWC in, features out (host only).

    Weights: the packaged ImageNet weights of ``manifest.backbone.arch``. For a bundle trained in frozen
    mode that is exactly the bundle's backbone; ``details['parity_max_abs_diff']`` against the golden
    features tells whether it is (a partly fine-tuned backbone differs in weights, not in work done).
    ``model_path`` is the bundle: its manifest names the architecture, its golden file the parity check.
    """

    name = TORCH_BACKEND
    takes_threads = True  # torch's intra-op (OpenMP) threads; this sets them for the whole process

    def __init__(self, bundle: Bundle, precision: str = "fp32", *, threads: int | None = None):
        if precision != "fp32":  # no autocast: anything else would be recorded as what did not run
            raise InputError(f"{precision} on {TORCH_BACKEND}", got=precision, expected="fp32 (the eager reference)")
        super().__init__(bundle.root, precision, threads=threads)
        torch = require("torch", "the PyTorch eager reference")
        from edgexfer.backbones import build_backbone
        from edgexfer.pixel_model import PixelBackbone

        self._torch = torch
        if self.threads:
            torch.set_num_threads(self.threads)
        self.threads = torch.get_num_threads()  # torch's default is a known number: record it
        bb = bundle.manifest.backbone
        self._input = TensorSpec("image", (None, *bb.input.size, 3), "uint8")
        self.model = PixelBackbone(build_backbone(bb.arch), tuple(bb.input.mean), tuple(bb.input.std)).eval()
        golden = bundle.golden()
        diff = float(np.abs(self.run_impl(golden["images"][:2]) - golden["features"][:2]).max())
        self.details = {"torch": torch.__version__, "threads": self.threads, "weights": f"packaged {bb.arch}",
                        "parity_max_abs_diff": diff,
                        "same_weights_as_bundle": bool(diff <= SAME_WEIGHTS_MAX_ABS_DIFF)}

    @property
    def execution(self) -> dict[str, Any]:
        """PyTorch eager on the CPU computes in float32 (no autocast)."""
        return execution_record(self.precision, "f32")

    def input_spec(self) -> TensorSpec:
        return self._input

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model(self._torch.from_numpy(batch)).numpy()

    def close(self) -> None:
        self.model = None


def open_target(target: EngineTarget, bundle: Bundle, threads: int | None) -> EngineRunner:
    """Open the target's runner, with ``threads`` where it has a CPU thread pool; the time it took to
    load (compile, build) is in ``stats.load_seconds``."""
    if target.backend == TORCH_BACKEND:
        start = time.perf_counter()
        runner = TorchEagerRunner(bundle, target.precision, threads=threads)
        runner.stats.load_seconds = time.perf_counter() - start
        return runner
    # a thread count only for engines with a CPU thread pool: TensorRT, on the GPU, has none
    options: dict[str, Any] = {"threads": threads} if threads and backend_class(target.backend).takes_threads else {}
    return open_backend(target.backend, target.model, precision=target.precision, **options)


def threads_used(runner: EngineRunner) -> int | str:
    """``engines[].threads`` in bench.json: the count, ``engine default`` or ``not applicable``."""
    if runner.threads:
        return runner.threads
    return "engine default" if runner.takes_threads else "not applicable"
