"""Every registered runtime backend keeps the same contract on the engines `convert` wrote."""
from __future__ import annotations

import numpy as np
import pytest

from edgexfer.runtime.backends.base import EngineRunner
from edgexfer.runtime.backends.registry import BACKENDS, backend_class, backend_spec, open_backend
from edgexfer.runtime.errors import InputError, MissingDependencyError
from edgexfer.runtime.optional import is_installed


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_module_imports_without_its_engine(name):
    assert issubclass(backend_class(name), EngineRunner)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_takes_a_thread_count_or_refuses_it_in_one_line(name, tmp_path):
    """``threads`` sizes the CPU thread pool of an engine that has one; one without (TensorRT, on the GPU)
    refuses a count instead of ignoring it. Both checks come before any engine is loaded."""
    precision = backend_spec(name).precisions[0]
    bad = 2 if not backend_class(name).takes_threads else 0
    with pytest.raises(InputError, match="threads"):
        open_backend(name, tmp_path / "model", precision=precision, threads=bad)


@pytest.mark.parametrize("name,precision", [("openvino", "fp32"), ("openvino", "int8"), ("onnxruntime", "int8")])
def test_backend_contract_on_converted_engines(name, precision, converted, conversion_bundle):
    from edgexfer.runtime.bundle import Bundle

    if not all(is_installed(m) for m in backend_spec(name).requires):
        pytest.skip(f"{name} is not installed")
    converted(name, precision)
    bundle = Bundle.open(conversion_bundle)
    images = bundle.golden()["images"][:3]
    with open_backend(name, bundle.engine_file(name, precision), precision=precision) as engine:
        spec = engine.input_spec()
        assert spec.dtype == "uint8" and spec.shape[1:] == (224, 224, 3) and spec.shape[0] is None
        out = engine.run(images)
        assert out.shape == (3, bundle.manifest.backbone.feature_dim) and out.dtype == np.float32
        with pytest.raises(InputError, match="dtype float32"):
            engine.run(images.astype(np.float32))


def test_tensorrt_backend_without_tensorrt_names_the_extra(tmp_path):
    if is_installed("tensorrt"):
        pytest.skip("TensorRT is installed here")
    plan = tmp_path / "backbone.plan"
    plan.write_bytes(b"not a plan")
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgexfer\[tensorrt\]'"):
        open_backend("tensorrt", plan, precision="fp16")
