"""Samples in an inference request: decoding them for the batcher, and queueing the doubtful ones for review.

Shared by ``POST /v2/models/{name}/infer`` (:mod:`.routes_v2`) and ``POST /v1/predict`` (:mod:`.routes_v1`).
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.service.core import Classified, ServiceCore
from edgexfer.runtime.service.protocol import ProtocolError
from edgexfer.runtime.text import text_sha256


def kind(core: ServiceCore) -> str:
    """What one sample is for the active bundle: "image" or "text"."""
    return core.model.modality


async def decode_all(core: ServiceCore, items: list[bytes]) -> Any:
    """Encoded images -> pixels [N, H, W, 3]; or, for a text bundle, UTF-8 bytes -> a list of texts."""
    what = kind(core)
    if not items:
        raise ProtocolError(400, f"no {what} in the request", got=f"0 {what}s", expected="at least one")
    if len(items) > core.config.max_images:
        raise ProtocolError(413, f"too many {what}s in one request", got=len(items),
                            expected=f"at most {core.config.max_images}", todo="split the request")
    samples = []
    for i, data in enumerate(items):
        try:
            if what == "text":
                samples.append(await asyncio.to_thread(core.decode_text, data, str(i)))
            else:
                samples.append(await asyncio.to_thread(core.decode, data))
        except InputError as exc:
            what_ = exc.what if what == "text" else f"image {i}: {exc.what}"
            raise ProtocolError(400, what_, got=exc.got, expected=exc.expected, todo=exc.todo) from None
    return samples if what == "text" else np.stack(samples)


async def record(core: ServiceCore, result: Classified, images: list[bytes] | None, source: str,
                 texts: list[str] | None = None) -> list[int | None]:
    """Count predictions; queue the low-confidence ones that came as encoded images or as texts."""
    queued: list[int | None] = []
    for i, row in enumerate(result.top(core.config.top_k)):
        label, p = row[0]
        low = core.wants_review(p)
        core.metrics.prediction(label, low)
        entry = None
        if low and (texts is not None or images is not None):
            if texts is not None:  # the queue keeps a text as its UTF-8 bytes
                data, sha, media = texts[i].encode("utf-8"), text_sha256(texts[i]), "text/plain; charset=utf-8"
            else:
                data = images[i]
                sha, media = FeatureCache.content_sha256(data), media_type(data)
            entry = await core.review(lambda q, data=data, sha=sha, media=media, row=row: q.add(
                sha256=sha, image=data, media_type=media, label=row[0][0], probability=row[0][1],
                top_k=[{"label": lbl, "probability": round(pp, 6)} for lbl, pp in row],
                head=result.head_version, source=source))
        queued.append(entry)
    return queued


def media_type(data: bytes) -> str:
    for magic, media in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                         (b"BM", "image/bmp")):
        if data.startswith(magic):
            return media
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"
