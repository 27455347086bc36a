"""Samples in an inference request: decoding them for the batcher, and queueing the doubtful ones for review.

Shared by ``POST /v2/models/{name}/infer`` (:mod:`.routes_v2`) and ``POST /v1/predict`` (:mod:`.routes_v1`).
What a sample is, and how messages name it, is the active bundle's modality's to say
(:meth:`~edgexfer.runtime.modalities.base.Modality.service_input`).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.modalities.base import Modality
from edgexfer.runtime.service.core import Classified, ServiceCore
from edgexfer.runtime.service.protocol import ProtocolError

log = logging.getLogger("edgexfer.serve")


async def decode_all(core: ServiceCore, modality: Modality, items: list[bytes]) -> list[Any]:
    """The bytes of each sample -> its value (pixels, a text), decoded in worker threads."""
    if not items:
        raise ProtocolError(400, f"no {modality.noun} in the request", got=f"0 {modality.plural}",
                            expected="at least one")
    if len(items) > core.config.max_images:
        raise ProtocolError(413, f"too many {modality.plural} in one request", got=len(items),
                            expected=f"at most {core.config.max_images}", todo="split the request")
    numbered = modality.service_input().numbered
    values = []
    for i, data in enumerate(items):
        try:
            values.append(await asyncio.to_thread(core.decode, data, str(i), modality))
        except InputError as exc:
            what = f"{modality.noun} {i}: {exc.what}" if numbered else exc.what
            got = exc.got
            if exc.__cause__ is not None:  # a decoder's own exception (Pillow's): its text stays in the log
                log.info("%s %d of a request does not decode: %s", modality.noun, i, exc.got)
                got = f"{len(data):,} bytes that do not decode as {modality.noun}"
            raise ProtocolError(400, what, got=got, expected=exc.expected, todo=exc.todo) from None
    return values


async def record(core: ServiceCore, modality: Modality, result: Classified, items: list[bytes] | None,
                 values: Any, source: str) -> list[int | None]:
    """Count predictions; queue the low-confidence ones that came as bytes (``items``, decoded to ``values``;
    None: a tensor of values, which has no file to keep)."""
    media = modality.service_input().media_type
    queued: list[int | None] = []
    for i, row in enumerate(result.top(core.config.top_k)):
        label, p = row[0]
        low = core.wants_review(p, len(result.classes))
        core.metrics.prediction(label, low)
        entry = None
        if low and items is not None:
            sample = modality.sample_of(items[i], values[i], source)
            # a sample queued before keeps its entry: the answer names it, so the page labels it by that id
            entry = await core.review(lambda q, sample=sample, row=row: q.add(
                sha256=sample.sha256, data=sample.data, media_type=media or media_type(sample.data),
                label=row[0][0], probability=row[0][1],
                top_k=[{"label": lbl, "probability": round(pp, 6)} for lbl, pp in row],
                head=result.head_version, source=source) or q.id_of(sample.sha256))
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
