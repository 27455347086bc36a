"""The Open Inference Protocol (KServe v2) over gRPC: Triton's ``inference.GRPCInferenceService`` on ``--grpc-port``.

Served: ``ServerLive``, ``ServerReady``, ``ModelReady``, ``ServerMetadata``, ``ModelMetadata``, ``ModelInfer``,
``ModelConfig``, ``ModelStatistics`` (messages: :mod:`.grpc_schema`); any other method of Triton's service
answers ``UNIMPLEMENTED``. The server is ``grpc.aio`` in the same process and event loop as uvicorn
(:func:`serve_both`), over the one :class:`~edgexfer.runtime.service.core.ServiceCore`: a gRPC request and
an HTTP request may share an engine batch. Inference is :func:`.inference.infer`, as for
``POST /v2/models/{name}/infer``; only the wire format differs:

* inputs come in ``raw_input_contents`` (one blob per input, as tritonclient sends them; ``BYTES`` elements
  each a 4-byte little-endian length and the bytes) or in ``contents`` (``bytes_contents`` for ``BYTES``,
  ``uint_contents`` for ``UINT8``, ``fp32_contents``, ``int64_contents``);
* outputs always go in ``raw_output_contents``, as Triton answers;
* errors are a gRPC status (``INVALID_ARGUMENT`` for a 400, ``NOT_FOUND``, ``RESOURCE_EXHAUSTED`` for a 413,
  ...) with the same one-line message as the HTTP body; a fault of ours is ``INTERNAL`` with no exception text.

Every method only reads or classifies: none changes the device, so no token is asked for. The messages
are bounded by ``--max-body-mb`` (``grpc.max_receive_message_length``).
"""
from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from edgexfer.runtime.errors import EdgexferError, InputError
from edgexfer.runtime.service.core import ModelSwitched, ServiceCore
from edgexfer.runtime.service.grpc_schema import METHODS, PACKAGE, SERVICE, message
from edgexfer.runtime.service.inference import infer, model_config, model_statistics
from edgexfer.runtime.service.protocol import DTYPES, ProtocolError, Tensor, _split_bytes
from edgexfer.runtime.service.routes_v2 import EXTENSIONS, metadata, model_named
from edgexfer.runtime.state import StateError

log = logging.getLogger("edgexfer.serve")

#: the HTTP status of a ProtocolError -> the gRPC status it is answered with
STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
          409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          503: grpc.StatusCode.UNAVAILABLE}
#: the ``contents`` field of each datatype (Triton's InferTensorContents)
CONTENTS = {"BYTES": "bytes_contents", "UINT8": "uint_contents", "FP32": "fp32_contents", "INT64": "int64_contents"}

Method = Callable[[ServiceCore, Any], Awaitable[Any]]


# ------------------------------------------------------------------------------------------ the methods
async def server_live(core: ServiceCore, request: Any) -> Any:
    return message("ServerLiveResponse")(live=True)


async def server_ready(core: ServiceCore, request: Any) -> Any:
    return message("ServerReadyResponse")(ready=core.ready())


async def model_ready(core: ServiceCore, request: Any) -> Any:
    model_named(core, request.name, request.version or None)
    return message("ModelReadyResponse")(ready=core.ready())


async def server_metadata(core: ServiceCore, request: Any) -> Any:
    from edgexfer import __version__

    return message("ServerMetadataResponse")(name="edgexfer", version=__version__, extensions=EXTENSIONS)


async def model_metadata(core: ServiceCore, request: Any) -> Any:
    doc = metadata(core, model_named(core, request.name, request.version or None, await core.served()))
    doc.pop("parameters")  # the gRPC message has none
    return json_format.ParseDict(doc, message("ModelMetadataResponse")())


async def config(core: ServiceCore, request: Any) -> Any:
    doc = model_config(core, model_named(core, request.name, request.version or None, await core.served()))
    return message("ModelConfigResponse")(config=json_format.ParseDict(doc, message("ModelConfig")()))


async def statistics(core: ServiceCore, request: Any) -> Any:
    model = model_named(core, request.name, None, await core.served())
    doc = model_statistics(core, model, request.version or None)
    return json_format.ParseDict(doc, message("ModelStatisticsResponse")())


async def model_infer(core: ServiceCore, request: Any) -> Any:
    with core.incoming():
        started = time.perf_counter()
        asked = {}
        for out in request.outputs:
            if "classification" in out.parameters:
                param = out.parameters["classification"]
                kind = param.WhichOneof("parameter_choice")
                asked[out.name] = getattr(param, kind) if kind else None
        for again in (False, True):
            model = model_named(core, request.model_name, request.model_version or None, await core.served())
            try:
                answer = await infer(core, model, request_tensors(request), [o.name for o in request.outputs],
                                     asked, "serve:grpc", started)
                break
            except ModelSwitched:  # another bundle came in while this request was decoded: once more, for it
                if again:
                    raise
    response = message("ModelInferResponse")(model_name=answer.model_name, model_version=answer.model_version,
                                             id=request.id)
    for key, value in answer.parameters.items():
        param = response.parameters[key]
        if isinstance(value, int):
            param.int64_param = value
        else:
            param.string_param = str(value)
    for t in answer.outputs:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        response.raw_output_contents.append(raw_bytes(t))
    return response


# ------------------------------------------------------------------------------------------ tensors
def request_tensors(request: Any) -> dict[str, Tensor]:
    """The inputs of a ``ModelInferRequest``, as the HTTP parser gives them; 400 on anything malformed."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(400, "raw_input_contents", got=f"{len(raw)} blobs for {len(request.inputs)} inputs",
                            expected="one blob per input, or none (contents)")
    out: dict[str, Tensor] = {}
    for i, spec in enumerate(request.inputs):
        name, datatype, shape = spec.name, spec.datatype, list(spec.shape)
        if name in out:
            raise ProtocolError(400, f"input '{name[:40]}' given twice", got="2", expected="once")
        if datatype not in DTYPES:
            raise ProtocolError(400, f"input '{name[:40]}' datatype", got=repr(datatype[:20]),
                                expected=f"one of {sorted(DTYPES)}")
        if any(d < 0 for d in shape):
            raise ProtocolError(400, f"input '{name[:40]}' shape", got=shape[:8],
                                expected="non-negative dimensions")
        count = math.prod(shape)  # Python integers: no overflow, however large the dimensions
        out[name] = Tensor(name, datatype, shape, _raw(raw[i], datatype, shape, count, name) if raw
                           else _contents(spec, datatype, shape, count, name))
    return out


def _raw(blob: bytes, datatype: str, shape: list[int], count: int, name: str) -> Any:
    if datatype == "BYTES":
        if count > len(blob):  # every element takes 4 bytes at least
            raise ProtocolError(400, f"input '{name}' BYTES data ends early", got=f"{len(blob)} bytes",
                                expected=f"{count} elements (its shape)")
        return _split_bytes(blob, count, name)
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(blob) != count * dtype.itemsize:
        raise ProtocolError(400, f"input '{name}' raw_input_contents", got=f"{len(blob)} bytes",
                            expected=f"{count * dtype.itemsize} bytes for shape {shape[:8]} of {datatype}")
    return np.frombuffer(blob, dtype=dtype).astype(DTYPES[datatype]).reshape(shape)


def _contents(spec: Any, datatype: str, shape: list[int], count: int, name: str) -> Any:
    values: Sequence[Any] = getattr(spec.contents, CONTENTS[datatype])
    if len(values) != count:
        raise ProtocolError(400, f"input '{name}' contents.{CONTENTS[datatype]}", got=f"{len(values)} elements",
                            expected=f"{count} (its shape)")
    if datatype == "BYTES":
        return list(values)
    arr = np.asarray(values)
    if datatype == "UINT8" and count and (arr.min() < 0 or arr.max() > 255):
        raise ProtocolError(400, f"input '{name}' contents out of range", got=f"{arr.min()}..{arr.max()}",
                            expected="integers 0..255")
    return arr.astype(DTYPES[datatype]).reshape(shape)


def raw_bytes(t: Tensor) -> bytes:
    """An output tensor as Triton's ``raw_output_contents`` blob (little-endian; BYTES length-prefixed)."""
    if t.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in t.data)
    return np.ascontiguousarray(t.data, dtype=np.dtype(DTYPES[t.datatype]).newbyteorder("<")).tobytes()


# ------------------------------------------------------------------------------------------ the server
_METHODS: dict[str, Method] = {"ServerLive": server_live, "ServerReady": server_ready, "ModelReady": model_ready,
                               "ServerMetadata": server_metadata, "ModelMetadata": model_metadata,
                               "ModelInfer": model_infer, "ModelConfig": config, "ModelStatistics": statistics}


def _handler(core: ServiceCore, name: str, fn: Method) -> grpc.RpcMethodHandler:
    request_type, response_type = (message(m) for m in METHODS[name])

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code, text = grpc.StatusCode.OK, ""
        try:
            return await fn(core, request)
        except ProtocolError as exc:
            code, text = STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc)
        except StateError as exc:
            code, text = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except EdgexferError as exc:
            code, text = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Exception as exc:  # a fault of ours: logged, answered without its text, the server goes on
            log.exception("internal error on gRPC %s", name)
            code, text = grpc.StatusCode.INTERNAL, f"internal error | got {type(exc).__name__} | expected none | " \
                                                   "see the server's log"
        finally:
            core.metrics.grpc_request(name, code.name, time.perf_counter() - started)
        await context.abort(code, text)

    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=request_type.FromString,
                                               response_serializer=response_type.SerializeToString)


async def start(core: ServiceCore, host: str, port: int, tls: tuple[Path, Path] | None = None
                ) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC service on ``host:port`` (0: a free port) in the running loop; returns it and its port.

    ``tls``: (certificate, key) PEM files, the ones HTTPS serves (``--tls-cert``/``--tls-key``): then the port
    speaks TLS only, as the HTTP port does."""
    limit = core.config.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", 4 * limit), ("grpc.so_reuseport", 0)])
    handlers = {name: _handler(core, name, fn) for name, fn in _METHODS.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(f"{PACKAGE}.{SERVICE}", handlers),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            cert, key = (Path(f).read_bytes() for f in tls)
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    except RuntimeError:  # grpcio raises where it cannot bind (older releases return 0)
        bound = 0
    if not bound:
        raise InputError("cannot listen for gRPC", got=address, expected="a free port on this host",
                         todo="pick another --grpc-port, or stop what listens there")
    await server.start()
    return server, bound


def serve_both(http: Any, sockets: list, core: ServiceCore, host: str, port: int,
               announce: Callable[[str], None], tls: tuple[Path, Path] | None = None) -> None:
    """Run uvicorn's ``http`` server and the gRPC service in one event loop until uvicorn stops (SIGINT/SIGTERM).

    ``announce`` gets the gRPC address once it listens (before uvicorn starts accepting); ``tls``: see :func:`start`.
    """
    async def main() -> None:
        server, bound = await start(core, host, port, tls)
        announce(f"{host if ':' not in host else f'[{host}]'}:{bound}")
        try:
            await http.serve(sockets=sockets)
        finally:
            await server.stop(grace=2)

    asyncio.run(main())
