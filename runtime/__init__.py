"""edgexfer.runtime: what runs on the device.

numpy, Pillow, sqlite3, safetensors and one inference engine, loaded lazily. This package never
imports torch, onnx, ``edgexfer.converters`` or any host module (a test enforces it).
"""
from __future__ import annotations

from edgexfer.runtime.errors import EdgexferError

__all__ = ["EdgexferError"]
