"""Hand-made image files for the device tests (shared by test_preprocess.py and test_bad_inputs.py)."""
from __future__ import annotations

import struct
import zlib


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height but which carries almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))
