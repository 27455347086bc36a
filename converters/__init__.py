"""edgexfer.converters: ONNX to OpenVINO / ONNX Runtime / TensorRT engines. Never imports torch.

``convert`` builds an engine inside a bundle, validates it against the fp32 reference and records it;
``engine_table`` / ``format_engine_table`` compare every engine of a bundle. Engines (openvino, nncf,
onnxruntime, onnx, tensorrt) are imported inside the functions that need them.
"""
from __future__ import annotations

from edgexfer.converters.conversion import BACKENDS, ConvertResult, convert
from edgexfer.converters.engine_table import engine_table, format_engine_table
from edgexfer.runtime.precision import PRECISIONS

__all__ = ["BACKENDS", "PRECISIONS", "ConvertResult", "convert", "engine_table", "format_engine_table"]
