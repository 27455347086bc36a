"""The Open Inference Protocol (KServe v2) over HTTP: requests in, responses out, errors as the protocol says.

Pure functions over bytes and numpy; no web framework here. Two encodings are understood, as Triton and
OpenVINO Model Server implement them:

* JSON: ``{"id", "parameters", "inputs": [{"name", "datatype", "shape", "data"}], "outputs": [...]}``.
  ``BYTES`` elements in JSON are base64 strings (an image file is binary), except those of the input
  ``text`` (text bundles), which are the UTF-8 strings themselves, as Triton and tritonclient send them.
* Triton's binary tensor data extension: the header ``Inference-Header-Content-Length: L`` says the
  first ``L`` bytes of the body are the JSON; each input whose ``parameters.binary_data_size`` is set
  takes that many bytes of what follows, in input order. Raw little-endian values; ``BYTES`` elements
  are each a 4-byte little-endian length and the bytes.

Responses use the binary extension for an output when the request asks (``outputs[i].parameters.binary_data``
or the request's ``parameters.binary_data_output``), JSON otherwise.
Errors are :class:`ProtocolError`: an HTTP status and ``{"error": "<one line>"}``.
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgexfer.runtime.errors import EdgexferError

HEADER_LENGTH = "Inference-Header-Content-Length"
#: protocol datatypes this service takes or gives, with their numpy dtypes (BYTES: object)
DTYPES: dict[str, Any] = {"UINT8": np.uint8, "FP32": np.float32, "INT64": np.int64, "BYTES": np.object_}


class ProtocolError(EdgexferError):
    """A request the protocol refuses; ``status`` is its HTTP status (4xx)."""

    def __init__(self, status: int, what: str, got: object = None, expected: object = None, todo: str | None = None):
        self.status = status
        super().__init__(what, got=got, expected=expected, todo=todo)

    def body(self) -> dict[str, str]:
        return {"error": str(self)}


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    #: numpy array for numeric types; list of bytes for BYTES
    data: Any


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, Tensor]
    #: requested outputs: name -> binary? (empty: all outputs, binary if ``binary_output``)
    outputs: dict[str, bool] = field(default_factory=dict)
    binary_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    #: Triton's classification extension: output name -> its ``parameters.classification`` (top K)
    class_count: dict[str, int] = field(default_factory=dict)


def _bad(what: str, got: object = None, expected: object = None, todo: str | None = None) -> ProtocolError:
    return ProtocolError(400, what, got=got, expected=expected, todo=todo)


def _shape(raw: object, name: str) -> list[int]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise _bad(f"input '{name}' shape", got=repr(raw)[:80], expected="a list of non-negative integers")
    return list(raw)


def _split_bytes(blob: bytes, count: int, name: str) -> list[bytes]:
    """BYTES elements of the binary extension: each a uint32 little-endian length, then the bytes."""
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(blob):
            raise _bad(f"input '{name}' BYTES data ends early", got=f"{len(out)} of {count} elements",
                       expected="a 4-byte little-endian length before each element")
        (n,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + n > len(blob):
            raise _bad(f"input '{name}' BYTES element {len(out)} ends early", got=f"{len(blob) - pos} bytes left",
                       expected=f"{n} bytes")
        out.append(blob[pos:pos + n])
        pos += n
    if pos != len(blob):
        raise _bad(f"input '{name}' BYTES data is longer than its elements", got=f"{len(blob) - pos} extra bytes",
                   expected=f"{count} elements exactly")
    return out


def _json_data(raw: object, datatype: str, count: int, name: str, plain: bool = False) -> Any:
    """A JSON tensor's elements; BYTES elements are base64, or the strings themselves where ``plain``."""
    if not isinstance(raw, list):
        raise _bad(f"input '{name}' data", got=type(raw).__name__, expected="a list (or binary_data_size)")
    flat = _flatten(raw)
    if len(flat) != count:
        raise _bad(f"input '{name}' data has {len(flat)} elements", got=f"{len(flat)}", expected=f"{count} (its shape)")
    if datatype == "BYTES":
        out = []
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise _bad(f"input '{name}' element {i}", got=type(item).__name__,
                           expected="a string" if plain else "a base64 string")
            if plain:
                out.append(item.encode("utf-8", "surrogatepass"))  # a lone surrogate fails the UTF-8 check later
                continue
            try:
                out.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise _bad(f"input '{name}' element {i} is not base64", got=repr(item[:20]),
                           expected="an image file encoded in base64",
                           todo="base64-encode BYTES in JSON, or use the binary tensor data extension") from None
        return out
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        raise _bad(f"input '{name}' data", got="a non-numeric element", expected=f"{datatype} numbers")
    arr = np.asarray(flat, dtype=np.float64)
    if datatype == "UINT8" and (not np.all(arr == np.round(arr)) or arr.min(initial=0) < 0 or arr.max(initial=0) > 255):
        raise _bad(f"input '{name}' data out of range", got=f"{arr.min():g}..{arr.max():g}", expected="integers 0..255")
    return arr.astype(DTYPES[datatype])


def _flatten(raw: list) -> list:
    out: list = []
    stack = [iter(raw)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def parse_infer_request(body: bytes, header_length: str | None,
                        plain_strings: Collection[str] = ()) -> InferRequest:
    """Decode an inference request; raises :class:`ProtocolError` (400) on anything malformed.

    ``plain_strings`` names the BYTES inputs whose JSON elements are the strings themselves (a text
    modality's, as Triton's clients send them) rather than base64.
    """
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} header", got=repr(header_length[:20]), expected="an integer") from None
        if not 0 < n <= len(body):
            raise _bad(f"{HEADER_LENGTH} header", got=n, expected=f"1..{len(body)} (the body's length)")
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad("inference request is not JSON", got=str(exc)[:80], expected="a JSON object",
                   todo=f"send JSON, with {HEADER_LENGTH} when binary data follows") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise _bad("inference request", got=repr(doc)[:80], expected='an object with a non-empty "inputs" list')
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("request parameters", got=type(params).__name__, expected="an object")
    inputs: dict[str, Tensor] = {}
    offset = 0
    for spec in doc["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("input", got=repr(spec)[:80], expected='an object with "name", "datatype", "shape"')
        name = spec["name"]
        if name in inputs:
            raise _bad(f"input '{name}' given twice", got="2", expected="once")
        datatype = spec.get("datatype")
        if datatype not in DTYPES:
            raise _bad(f"input '{name}' datatype", got=repr(datatype), expected=f"one of {sorted(DTYPES)}")
        shape = _shape(spec.get("shape"), name)
        count = int(np.prod(shape)) if shape else 1
        p = spec.get("parameters") or {}
        size = p.get("binary_data_size") if isinstance(p, dict) else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(rest):
                raise _bad(f"input '{name}' binary_data_size", got=size,
                           expected=f"at most the {len(rest) - offset} binary bytes left")
            blob = rest[offset:offset + size]
            offset += size
            if datatype == "BYTES":
                data: Any = _split_bytes(blob, count, name)
            else:
                itemsize = np.dtype(DTYPES[datatype]).itemsize
                if size != count * itemsize:
                    raise _bad(f"input '{name}' binary_data_size", got=size,
                               expected=f"{count * itemsize} bytes for shape {shape} of {datatype}")
                data = np.frombuffer(blob, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")).astype(DTYPES[datatype])
        elif "data" in spec:
            data = _json_data(spec["data"], datatype, count, name, name in plain_strings)
        else:
            raise _bad(f"input '{name}' has no data", got="neither data nor parameters.binary_data_size",
                       expected="one of them")
        if datatype != "BYTES":
            data = data.reshape(shape)
        inputs[name] = Tensor(name, datatype, shape, data)
    if offset != len(rest):
        raise _bad("binary data after the JSON header", got=f"{len(rest) - offset} bytes no input claims",
                   expected="the sum of the inputs' binary_data_size")
    outputs: dict[str, bool] = {}
    class_count: dict[str, Any] = {}  # checked with the outputs (edgexfer.runtime.service.inference)
    for spec in doc.get("outputs") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("requested output", got=repr(spec)[:80], expected='an object with "name"')
        p = spec.get("parameters") or {}
        outputs[spec["name"]] = bool(p.get("binary_data", False)) if isinstance(p, dict) else False
        if isinstance(p, dict) and "classification" in p:
            class_count[spec["name"]] = p["classification"]
    rid = doc.get("id")
    return InferRequest(id=str(rid) if rid is not None else None, inputs=inputs, outputs=outputs,
                        binary_output=bool(params.get("binary_data_output", False)), parameters=params,
                        class_count=class_count)


def encode_infer_response(model_name: str, model_version: str, request: InferRequest,
                          outputs: Sequence[Tensor], parameters: Mapping[str, Any] | None = None
                          ) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (``Inference-Header-Content-Length`` when binary data follows)."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    if parameters:
        doc["parameters"] = dict(parameters)
    entries, blobs = [], []
    for t in outputs:
        binary = request.outputs.get(t.name, request.binary_output)
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if binary:
            if t.datatype == "BYTES":
                blob = b"".join(struct.pack("<I", len(b)) + b for b in t.data)
            else:
                blob = np.ascontiguousarray(t.data, dtype=np.dtype(DTYPES[t.datatype]).newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif t.datatype == "BYTES":
            entry["data"] = [b.decode("utf-8", "replace") for b in t.data]
        else:
            entry["data"] = np.asarray(t.data).ravel().tolist()
        entries.append(entry)
    doc["outputs"] = entries
    head = json.dumps(doc).encode()
    if not blobs:
        return head, {}
    return head + b"".join(blobs), {HEADER_LENGTH: str(len(head))}
