"""What a bench target opens (:mod:`edgexfer.bench.runners`): every runner an ``EngineRunner``, the PyTorch
eager twin included, and a thread count given only to engines that have a CPU thread pool."""
from __future__ import annotations

import numpy as np
import pytest

from edgexfer.bench.plan import TORCH_BACKEND, EngineTarget
from edgexfer.bench.runners import open_target, threads_used
from edgexfer.runtime.backends.base import EngineRunner
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import InputError


@pytest.fixture
def torch_threads():
    """torch's thread count is process-wide: put it back after a test that sets it."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_pytorch_eager_twin_is_an_engine_runner_with_its_checks_and_statistics(bench_bundle, torch_threads):
    bundle = Bundle.open(bench_bundle)
    golden = bundle.golden()
    with open_target(EngineTarget(TORCH_BACKEND, "fp32", None), bundle, threads=1) as runner:
        assert isinstance(runner, EngineRunner) and runner.name == TORCH_BACKEND
        assert runner.stats.load_seconds > 0 and runner.stats.calls == 0  # the parity check is part of loading
        assert runner.threads == 1 and threads_used(runner) == 1 and runner.details["threads"] == 1
        spec = runner.input_spec()
        assert spec.dtype == "uint8" and spec.shape == (None, *bundle.manifest.backbone.input.size, 3)
        out = runner.run(golden["images"][:2])
        assert out.shape == (2, bundle.manifest.backbone.feature_dim) and out.dtype == np.float32
        assert runner.stats.calls == 1 and runner.stats.images == 2 and runner.stats.seconds > 0
        with pytest.raises(InputError, match="dtype float32"):
            runner.run(golden["images"][:1].astype(np.float32))
        assert runner.execution["precision"] == "fp32" and runner.execution["inference_precision"] == "f32"
        assert runner.details["parity_max_abs_diff"] >= 0
        assert runner.details["same_weights_as_bundle"] == (runner.details["parity_max_abs_diff"] <= 1e-3)
    with pytest.raises(InputError, match="int8 on pytorch-eager"):
        open_target(EngineTarget(TORCH_BACKEND, "int8", None), bundle, threads=None)


def test_a_thread_count_reaches_an_engine_with_a_cpu_thread_pool(bench_bundle):
    pytest.importorskip("onnxruntime")
    bundle = Bundle.open(bench_bundle)
    target = EngineTarget("onnxruntime", "fp32", bundle.engine_file("onnxruntime", "fp32"))
    with open_target(target, bundle, threads=1) as runner:
        assert runner.threads == 1 and threads_used(runner) == 1
        assert runner.session.get_session_options().intra_op_num_threads == 1
        assert runner.stats.load_seconds > 0
    with open_target(target, bundle, threads=None) as runner:
        assert runner.threads is None and threads_used(runner) == "engine default"


def test_an_engine_without_a_cpu_thread_pool_records_threads_as_not_applicable():
    class GpuEngine(EngineRunner):
        name = "gpu"

    assert threads_used(GpuEngine("model.plan")) == "not applicable"
    with pytest.raises(InputError, match="threads for the gpu backend"):
        GpuEngine("model.plan", threads=2)
