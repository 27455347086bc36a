"""The Open Inference Protocol (KServe v2, as Triton serves it): server and model metadata, health, inference.

``GET /v2``, ``/v2/health/live|ready``; ``GET /v2/models/{name}[/versions/{v}]`` and its ``/ready``;
``POST /v2/models/{name}[/versions/{v}]/infer`` (JSON or binary tensor data, :mod:`.protocol`);
``GET /v2/models/{name}[/versions/{v}]/config`` and ``/stats`` (Triton's model configuration and statistics).
Inference itself is :func:`.inference.infer`, which the gRPC service (:mod:`.grpc_service`) calls too.

The model is the one the device serves now (:meth:`ServiceCore.served`): after another process installs a
bundle or switches the head, metadata, versions and inference answer for the new one. Readiness is 200
``{"ready": true}`` while the served model is the one the device made active, else 503 ``{"ready": false}``
(tritonclient's ``is_server_ready``/``is_model_ready`` read any status but 200 as false, and so does a
Kubernetes readiness probe).
"""
from __future__ import annotations

import dataclasses
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgexfer.runtime.service.core import ActiveModel, ModelSwitched, ServiceCore
from edgexfer.runtime.service.endpoint import read_body, route
from edgexfer.runtime.service.inference import infer as infer_tensors
from edgexfer.runtime.service.inference import model_config, model_statistics
from edgexfer.runtime.service.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    encode_infer_response,
    parse_infer_request,
)

INFER = "/v2/models/{name}/infer"
#: the protocol extensions served (HTTP and gRPC)
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics",
              "model_repository_health"]


def model_named(core: ServiceCore, name: str, version: str | None = None,
                model: ActiveModel | None = None) -> ActiveModel:
    """The served model (``model``, default the last one; :meth:`ServiceCore.served` gives it switched if the
    device's state changed) if the path names it (and its active head, when a version is given); else 404."""
    model = model or core.model
    if name != model.name:
        raise ProtocolError(404, "unknown model", got=repr(name[:80]), expected=repr(model.name),
                            todo="GET /v2/models/" + model.name + " for its metadata")
    if version is not None and version != str(model.head_version):
        raise ProtocolError(404, f"model {name} version", got=repr(version[:20]),
                            expected=f"'{model.head_version}' (the active head)",
                            todo="leave the version out to use the active head")
    return model


async def _path_model(request: Request) -> ActiveModel:
    """The model the path names, as the device serves it now (switched first if the device's state changed)."""
    core: ServiceCore = request.app.state.core
    return model_named(core, request.path_params["name"], request.path_params.get("version"), await core.served())


def not_ready(core: ServiceCore) -> str:
    """Why the server is not ready (the error of a 503 readiness answer)."""
    return ("model not ready | got the device's active state changed and is being loaded, or cannot be | "
            f"expected the served model ({core.model.name} head {core.model.head_version}) to be the active one | "
            "wait and ask again; the server's log says why a state cannot be loaded")


async def server_metadata(request: Request) -> Response:
    from edgexfer import __version__

    return JSONResponse({"name": "edgexfer", "version": __version__, "extensions": EXTENSIONS})


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    core: ServiceCore = request.app.state.core
    if core.ready():
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "error": not_ready(core)}, status_code=503)


async def model_metadata(request: Request) -> Response:
    return JSONResponse(metadata(request.app.state.core, await _path_model(request)))


def metadata(core: ServiceCore, model: ActiveModel) -> dict:
    """The model metadata document (also the gRPC ``ModelMetadata`` answer)."""
    inputs = [dict(i) for i in model.input_modality.service_input().inputs]
    return {
        "name": model.name, "versions": [str(model.head_version)],
        "platform": f"edgexfer_{model.backend}",
        "inputs": inputs,
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(model.classes)]},
                    {"name": "features", "datatype": "FP32",
                     "shape": [-1, model.bundle.manifest.backbone.feature_dim]}],
        "parameters": {"classes": model.classes, "head_version": model.head_version, "modality": model.modality,
                       "precision": core.config.precision,
                       # what a client must do to its samples before sending them as a tensor (``pixels``:
                       # the letterbox policy, size and fill, docs/service.md), as the manifest records it
                       "input": dataclasses.asdict(model.bundle.manifest.backbone.input)}}


async def model_ready(request: Request) -> Response:
    """Only looks: never waits for a switch, so a probe answers at once."""
    core: ServiceCore = request.app.state.core
    model = model_named(core, request.path_params["name"], request.path_params.get("version"))
    if core.ready():
        return JSONResponse({"name": model.name, "ready": True})
    return JSONResponse({"name": model.name, "ready": False, "error": not_ready(core)}, status_code=503)


async def infer(request: Request) -> Response:
    core: ServiceCore = request.app.state.core
    with core.incoming():
        return await _infer(request, core)


async def _infer(request: Request, core: ServiceCore) -> Response:
    started = time.perf_counter()
    body = None
    for again in (False, True):
        model = await _path_model(request)
        if body is None:
            body = await read_body(request)
        described = model.input_modality.service_input()
        req = parse_infer_request(body, request.headers.get(HEADER_LENGTH), described.json_strings)
        try:
            answer = await infer_tensors(core, model, req.inputs, list(req.outputs), req.class_count, "serve:v2",
                                         started)
            break
        except ModelSwitched:  # another bundle came in while this request was decoded: once more, for it
            if again:
                raise
    content, headers = encode_infer_response(answer.model_name, answer.model_version, req, answer.outputs,
                                             answer.parameters)
    headers["X-Edgexfer-Head"] = str(answer.head_version)
    return Response(content, media_type="application/json" if HEADER_LENGTH not in headers
                    else "application/octet-stream", headers=headers)


async def config(request: Request) -> Response:
    """Triton's model configuration (tritonclient's ``get_model_config``)."""
    return JSONResponse(model_config(request.app.state.core, await _path_model(request)))


async def stats(request: Request) -> Response:
    """Triton's model statistics (tritonclient's ``get_inference_statistics``)."""
    model = await _path_model(request)
    return JSONResponse(model_statistics(request.app.state.core, model, request.path_params.get("version")))


def routes() -> list[Route]:
    return [
        route("/v2", server_metadata, ["GET"]),
        route("/v2/health/live", live, ["GET"]),
        route("/v2/health/ready", ready, ["GET"]),
        route("/v2/models/{name}", model_metadata, ["GET"]),
        route("/v2/models/{name}/ready", model_ready, ["GET"]),
        route("/v2/models/{name}/versions/{version}", model_metadata, ["GET"], template="/v2/models/{name}"),
        route("/v2/models/{name}/versions/{version}/ready", model_ready, ["GET"], template="/v2/models/{name}/ready"),
        route(INFER, infer, ["POST"]),
        route("/v2/models/{name}/versions/{version}/infer", infer, ["POST"], template=INFER),
        route("/v2/models/{name}/config", config, ["GET"]),
        route("/v2/models/{name}/versions/{version}/config", config, ["GET"], template="/v2/models/{name}/config"),
        route("/v2/models/{name}/stats", stats, ["GET"]),
        route("/v2/models/{name}/versions/{version}/stats", stats, ["GET"], template="/v2/models/{name}/stats"),
    ]
