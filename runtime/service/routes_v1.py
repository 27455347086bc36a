"""The device's own API for samples: predict, the review queue, and labelling.

``POST /v1/predict`` (raw bytes or a multipart upload -> ``device predict --json``'s JSON);
``GET /v1/review`` and ``/v1/review/{id}/image``; ``POST /v1/label`` (a queued entry or an upload ->
``device learn``).
"""
from __future__ import annotations

import logging
import unicodedata

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgexfer.runtime.predictor import Prediction
from edgexfer.runtime.service.core import ModelSwitched, ServiceCore
from edgexfer.runtime.service.endpoint import (
    is_multipart,
    json_object,
    read_body,
    read_form,
    read_upload,
    route,
)
from edgexfer.runtime.service.protocol import ProtocolError, brief
from edgexfer.runtime.service.samples import decode_all, record

log = logging.getLogger("edgexfer.serve")
#: review entries are SQLite rowids: 1 .. 2**63 - 1 (a larger integer cannot even be looked up)
MAX_ENTRY_ID = 2**63 - 1
#: a class name sent to /v1/label at most (it becomes a button, a file name in exports, a head's class)
MAX_LABEL_CHARS = 100


def entry_id_of(value: object) -> int:
    """A review entry id a client sent, checked: an integer a SQLite rowid can be."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ENTRY_ID:
        raise ProtocolError(400, "review entry id", got=brief(value),
                            expected=f'{{"id": <integer 0..{MAX_ENTRY_ID} from GET /v1/review>, "label": "<class>"}}')
    return value


def label_of(value: object) -> str:
    """A class name a client sent, checked for what the service can show and store (the device checks the rest)."""
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_LABEL_CHARS
            or any(unicodedata.category(c).startswith("C") for c in value)):
        raise ProtocolError(400, "label", got=brief(value),
                            expected=f"a class name of 1..{MAX_LABEL_CHARS} printable characters")
    return value


async def predict(request: Request) -> Response:
    core: ServiceCore = request.app.state.core
    with core.incoming():
        return await _predict(request, core)


async def _predict(request: Request, core: ServiceCore) -> Response:
    data, name = await read_upload(request)
    for again in (False, True):
        modality = (await core.served()).input_modality  # the model that answers now, switched first if need be
        values = await decode_all(core, modality, [data])
        try:
            result = await core.classify(values, modality)
            break
        except ModelSwitched:  # another bundle came in while this request was decoded: once more, for it
            if again:
                raise
    queued = await record(core, modality, result, [data], values, f"serve:{name}")
    top = result.top(core.config.top_k)[0]
    pred = Prediction(name, top[0][0], top[0][1], top, result.backend, result.precision)
    return JSONResponse({"head": result.head_version, "execution": result.execution,
                         "results": [pred.to_dict()], "review_id": queued[0]},
                        headers={"X-Edgexfer-Head": str(result.head_version)})


async def label(request: Request) -> Response:
    core: ServiceCore = request.app.state.core
    raw = await read_body(request)
    entry_id: int | None = None
    if is_multipart(request):
        form = await read_form(request, raw)
        name = form.get("label")
        files = [v for v in form.values() if hasattr(v, "read")]
        if not files:
            raise ProtocolError(400, "label upload without a file", got=sorted(form.keys()),
                                expected="a file and a 'label' field")
        data, source = await files[0].read(), f"serve:upload:{files[0].filename or 'upload'}"[:160]
    else:
        doc = json_object(raw)
        name, entry_id = doc.get("label"), entry_id_of(doc.get("id"))
        found = await core.review(lambda q: q.sample(entry_id))
        if found is None:
            raise ProtocolError(404, "no such review entry", got=entry_id, expected="an id from GET /v1/review",
                                todo="the entry was labelled already or dropped (the queue is bounded)")
        data, source = found[0], f"serve:review:{entry_id}"
    report = await core.learn([data], label_of(name), source)
    if report.errors:  # the decoder's text (Pillow's) stays in the log
        modality = core.model.input_modality
        log.info("cannot learn an uploaded %s: %s", modality.noun, report.errors[0]["error"])
        raise ProtocolError(400, f"cannot learn this {modality.noun}",
                            got=f"{len(data):,} bytes that do not decode as {modality.noun}",
                            expected=modality.service_input().sample)
    if entry_id is not None:
        await core.review(lambda q: q.remove(entry_id))
    request.app.state.counts.expire()
    return JSONResponse({**report.to_dict(), "review_id": entry_id})


async def review_list(request: Request) -> Response:
    core: ServiceCore = request.app.state.core
    entries = await core.review(lambda q: [e.to_dict() for e in q.entries()])
    return JSONResponse({"entries": entries, "threshold": core.review_threshold(len(core.model.classes))})


async def review_image(request: Request) -> Response:
    core: ServiceCore = request.app.state.core
    text = request.path_params["id"]
    # parsed here, not by the router's int convertor: that one turns 5,000 digits into a 500
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_ENTRY_ID:
        raise ProtocolError(404, "no such review entry", got=brief(text), expected="an id from GET /v1/review")
    entry_id = int(text)
    found = await core.review(lambda q: q.sample(entry_id))
    if found is None:
        raise ProtocolError(404, "no such review entry", got=entry_id, expected="an id from GET /v1/review")
    return Response(found[0], media_type=found[1])  # field data: never cached (access.SECURITY_HEADERS)


def routes() -> list[Route]:
    return [
        route("/v1/predict", predict, ["POST"]),
        route("/v1/review", review_list, ["GET"], reveals=True),
        route("/v1/review/{id}/image", review_image, ["GET"], reveals=True),
        route("/v1/label", label, ["POST"], mutating=True),
    ]
