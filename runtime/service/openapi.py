"""``GET /openapi.json``: an OpenAPI 3.1 document of every route of ``device serve``, written by hand.

Hand-written because the routes are plain Starlette functions with no schema to generate from; kept
honest by tests: ``tests/service/test_serve_fuzz.py`` checks that every route of the application is
documented here and every documented operation is a route, and fuzzes the running server with
requests generated from this document (no answer may be a 5xx). A route added elsewhere must be added
here too, or that test fails.

The request schemas say what a *well-formed* request is (the types and ranges the server checks at its
edge, :mod:`.protocol`, :mod:`.routes_v1`, :mod:`.routes_admin`); anything else is answered 4xx with
:data:`ERROR`'s body. What a sample is depends on the active bundle's modality (``image``/``pixels``
for an image bundle, ``text`` for a text bundle: ``GET /v2/models/{name}`` says which).
"""
from __future__ import annotations

import copy
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgexfer.runtime.names import HEAD_POLICIES
from edgexfer.runtime.service.endpoint import route
from edgexfer.runtime.service.protocol import DTYPES, HEADER_LENGTH, MAX_RANK

PATH = "/openapi.json"
#: a SQLite rowid at most (routes_v1.MAX_ENTRY_ID)
_MAX_ID = 2**63 - 1

ERROR: dict[str, Any] = {"type": "object", "required": ["error"], "additionalProperties": False,
                         "properties": {"error": {"type": "string",
                                                  "description": "one line: what | got | expected | what to do"}}}

_SCHEMAS: dict[str, Any] = {
    "Error": ERROR,
    "Tensor": {
        "type": "object", "required": ["name", "datatype", "shape"],
        "description": "An input tensor (KServe v2). BYTES elements in JSON are base64 strings, except those of "
                       "the input 'text', which are the strings themselves.",
        "properties": {
            "name": {"type": "string", "description": "image (BYTES, encoded files), pixels (UINT8 [N,H,W,3], "
                                                      "letterboxed: docs/service.md) or text (BYTES)"},
            "datatype": {"enum": sorted(DTYPES)},
            "shape": {"type": "array", "maxItems": MAX_RANK, "items": {"type": "integer", "minimum": 0}},
            "data": {"type": "array", "description": "row-major elements, nested or flat"},
            "parameters": {"type": "object", "properties": {
                "binary_data_size": {"type": "integer", "minimum": 0,
                                     "description": "bytes of the binary part after the JSON header"}}}}},
    "RequestedOutput": {
        "type": "object", "required": ["name"],
        "properties": {"name": {"enum": ["label", "probabilities", "features"]},
                       "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}},
    "InferRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Tensor"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestedOutput"}}}},
    "InferResponse": {
        "type": "object", "required": ["model_name", "model_version", "outputs"],
        "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                       "id": {"type": "string"}, "parameters": {"type": "object"},
                       "outputs": {"type": "array", "items": {"type": "object"}}}},
    "LabelRequest": {
        "type": "object", "required": ["id", "label"],
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": _MAX_ID,
                              "description": "an entry of GET /v1/review"},
                       "label": {"type": "string", "minLength": 1, "maxLength": 100}}},
    "LabelUpload": {
        "type": "object", "required": ["label", "file"],
        "properties": {"label": {"type": "string", "minLength": 1, "maxLength": 100},
                       "file": {"type": "string", "format": "binary"}}},
    "Upload": {"type": "object", "required": ["file"],
               "properties": {"file": {"type": "string", "format": "binary"}}},
    "RetrainOptions": {
        "type": "object", "additionalProperties": False,
        "properties": {"policy": {"enum": list(HEAD_POLICIES)},
                       "tolerance": {"type": "number", "minimum": 0, "maximum": 1},
                       "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}}},
    "Object": {"type": "object"},
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: str = "Object", description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "refused", "content": {"application/json": {"schema": _ref("Error")}}}
            for s in statuses}


def _param(name: str, where: str, schema: dict[str, Any], description: str, required: bool = True) -> dict:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


_NAME = _param("name", "path", {"type": "string"}, "the served model (GET /v2/models lists none: see /v1/status)")
_VERSION = _param("version", "path", {"type": "string"}, "the active head's version (GET /v2/models/{name})")
_ID = _param("id", "path", {"type": "integer", "minimum": 0, "maximum": _MAX_ID}, "a review entry id")
#: Content-Encoding of a request body: routes that read a body decode gzip and deflate (endpoint.read_body)
_ENCODING = _param("Content-Encoding", "header", {"enum": ["gzip", "deflate", "identity"]},
                   "gzip or deflate: decoded; the decoded size counts against --max-body-mb (413)", required=False)
_MUTATING = {"security": [{"token": []}, {}],
             "description": "Changes the device: the token (--token-file) is needed beyond loopback or once given"}


def _get(summary: str, ok: dict[str, Any], *errors: int, params: list | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **_errors(*errors)}}
    if params:
        op["parameters"] = params
    return op


def _infer(params: list[dict]) -> dict[str, Any]:
    return {
        "summary": "Inference: JSON, or Triton's binary tensor data extension (a JSON header of "
                   f"{HEADER_LENGTH} bytes, then the inputs' binary_data_size bytes in order)",
        "parameters": [*params, _ENCODING,
                       _param(HEADER_LENGTH, "header", {"type": "integer", "minimum": 1},
                              "the JSON header's length when binary data follows", required=False)],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("InferRequest")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                         "description": f"the binary extension ({HEADER_LENGTH} set)"}}},
        "responses": {"200": {"description": "outputs label, probabilities (and features if asked)", "content": {
            "application/json": {"schema": _ref("InferResponse")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            **_errors(400, 404, 413, 415)}}


def _paths() -> dict[str, Any]:
    model = [_NAME]
    version = [_NAME, _VERSION]
    return {
        "/": {"get": {"summary": "The web page", "responses": {"200": {
            "description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        PATH: {"get": _get("This document", _json())},
        "/static/microphone.js": {"get": {"summary": "The page's recorder (Record button: capture, WAV encoding)",
                                          "responses": {"200": {"description": "JavaScript", "content": {
                                              "text/javascript": {"schema": {"type": "string"}}}}}}},
        "/static/recorder.js": {"get": {"summary": "The recorder's AudioWorklet module", "responses": {"200": {
            "description": "JavaScript", "content": {"text/javascript": {"schema": {"type": "string"}}}}}}},
        "/static/page.css": {"get": {"summary": "The page's style sheet", "responses": {"200": {
            "description": "CSS", "content": {"text/css": {"schema": {"type": "string"}}}}}}},
        "/static/page.js": {"get": {"summary": "The page's script", "responses": {"200": {
            "description": "JavaScript", "content": {"text/javascript": {"schema": {"type": "string"}}}}}}},
        "/v2": {"get": _get("Server metadata (KServe v2)", _json())},
        "/v2/health/live": {"get": _get("Liveness", _json())},
        "/v2/health/ready": {"get": _get("Readiness", _json())},
        "/v2/models/{name}": {"get": _get("Model metadata: inputs, outputs, classes", _json(), 404, params=model)},
        "/v2/models/{name}/ready": {"get": _get("Model readiness", _json(), 404, params=model)},
        "/v2/models/{name}/versions/{version}": {"get": _get("Model metadata of a head version", _json(), 404,
                                                             params=version)},
        "/v2/models/{name}/versions/{version}/ready": {"get": _get("Readiness of a head version", _json(), 404,
                                                                   params=version)},
        "/v2/models/{name}/config": {"get": _get("Model configuration, in Triton's shape", _json(), 404,
                                                 params=model)},
        "/v2/models/{name}/versions/{version}/config": {"get": _get("Model configuration of a head version",
                                                                    _json(), 404, params=version)},
        "/v2/models/{name}/stats": {"get": _get("Inference statistics, in Triton's shape", _json(), 404,
                                                params=model)},
        "/v2/models/{name}/versions/{version}/stats": {"get": _get("Inference statistics of a head version",
                                                                   _json(), 404, params=version)},
        "/v2/models/{name}/infer": {"post": _infer(model)},
        "/v2/models/{name}/versions/{version}/infer": {"post": _infer(version)},
        "/v1/predict": {"post": {
            "summary": "One sample as raw bytes (an image file, or UTF-8 text for a text bundle) or a multipart "
                       "upload: device predict --json's answer",
            "parameters": [_ENCODING],
            "requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "text/plain": {"schema": {"type": "string"}},
                "multipart/form-data": {"schema": _ref("Upload")}}},
            "responses": {"200": _json(), **_errors(400, 413, 415)}}},
        "/v1/review": {"get": _get("The review queue", _json())},
        "/v1/review/{id}/image": {"get": _get("A queued sample's bytes", {"description": "the sample", "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}, 404, params=[_ID])},
        "/v1/label": {"post": {
            "summary": "Label a queued entry ({id, label}) or an uploaded sample (multipart label + file): "
                       "device learn", **_MUTATING,
            "parameters": [_ENCODING],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("LabelRequest")},
                "multipart/form-data": {"schema": _ref("LabelUpload")}}},
            "responses": {"200": _json(), **_errors(400, 401, 403, 404, 409, 413, 415)}}},
        "/v1/status": {"get": _get("The device, as device status says it", _json())},
        "/v1/heads": {"get": _get("The heads, as device heads says them", _json())},
        "/v1/retrain": {
            "get": _get("The background retrain's state and report", _json()),
            "post": {"summary": "Start the gated retrain in the background", **_MUTATING,
                     "parameters": [_ENCODING],
                     "requestBody": {"required": False,
                                     "content": {"application/json": {"schema": _ref("RetrainOptions")}}},
                     "responses": {"202": _json(description="started"), **_errors(400, 401, 403, 409, 413, 415)}}},
        "/v1/rollback": {"post": {"summary": "Back to the previous head", **_MUTATING,
                                  "responses": {"200": _json(), **_errors(401, 403, 409)}}},
        "/metrics": {"get": _get("Prometheus metrics", {"description": "text format 0.0.4", "content": {
            "text/plain": {"schema": {"type": "string"}}}})},
    }


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy: callers may change it)."""
    from edgexfer import __version__

    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {"title": "edgexfer device serve", "version": __version__,
                 "description": "The device's HTTP door: KServe v2 inference and the device's own /v1 API. "
                                "Errors are JSON {\"error\": \"what | got | expected | what to do\"}, 4xx for "
                                "a request the server refuses, 5xx only for a fault of its own (docs/service.md)."},
        "paths": _paths(),
        "components": {"schemas": _SCHEMAS,
                       "securitySchemes": {"token": {"type": "http", "scheme": "bearer",
                                                     "description": "the token in --token-file"}}},
    })


def operations(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, METHOD) of every operation ``doc`` documents, sorted."""
    return sorted((path, method.upper()) for path, item in doc["paths"].items() for method in item
                  if method in ("get", "put", "post", "delete", "patch", "head", "options"))


async def openapi_json(request: Request) -> Response:
    return JSONResponse(document())


def routes() -> list[Route]:
    return [route(PATH, openapi_json, ["GET"])]
