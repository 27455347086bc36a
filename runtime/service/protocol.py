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
import math
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgexfer.runtime.errors import EdgexferError

HEADER_LENGTH = "Inference-Header-Content-Length"
#: dimensions of one tensor at most (Triton's clients send 1-4)
MAX_RANK = 8
#: elements of one tensor at most, counting a zero dimension as one (numpy cannot shape more)
MAX_ELEMENTS = 2**31 - 1
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


def brief(value: object) -> str:
    """A short, safe description of a JSON value a client sent, for the ``got`` of an error.

    Never the whole value: a request may hold megabytes, nesting Python's ``repr`` cannot recurse into,
    or integers of thousands of digits.
    """
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, dict):
        keys = ", ".join(repr(str(k)[:20]) for k in list(value)[:6])
        return f"an object with keys [{keys}{', ...' if len(value) > 6 else ''}]"
    if isinstance(value, list):
        return f"a list of {len(value)} element(s)"
    return type(value).__name__


def parse_json(raw: bytes, what: str, todo: str | None = None) -> Any:
    """``json.loads`` with every failure a 400 that describes the body, not Python's exception."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        got = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except UnicodeDecodeError:
        got = "bytes that are not UTF-8"
    except RecursionError:
        got = "arrays or objects nested deeper than the parser takes"
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        got = "a number with too many digits"
    raise _bad(f"{what} is not JSON", got=got, expected="a JSON object", todo=todo)


def _shape(raw: object, name: str, body_size: int) -> tuple[list[int], int]:
    """The shape and its element count, bounded by what a body of ``body_size`` bytes can carry."""
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise _bad(f"input '{name}' shape", got=brief(raw), expected="a list of non-negative integers")
    if len(raw) > MAX_RANK:
        raise _bad(f"input '{name}' shape", got=f"{len(raw)} dimensions", expected=f"at most {MAX_RANK}")
    count = math.prod(raw)
    # every element takes at least one byte of the body, whatever the encoding; a zero dimension makes
    # the count 0, but numpy still refuses the other dimensions' product past its index range
    if count > body_size or math.prod(d or 1 for d in raw) > MAX_ELEMENTS:
        elements = f"{count:,}" if count.bit_length() <= 64 else "more than 2**64"
        raise _bad(f"input '{name}' shape", got=f"{len(raw)} dimensions, {elements} elements",
                   expected=f"at most {min(body_size, MAX_ELEMENTS):,} elements (what the request's body can carry)")
    return list(raw), count


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
    if datatype == "INT64":
        if not all(isinstance(v, int) and -2**63 <= v < 2**63 for v in flat):
            raise _bad(f"input '{name}' data out of range", got="a fraction or an integer beyond 64 bits",
                       expected="integers -2**63..2**63-1")
        return np.asarray(flat, dtype=np.int64)
    try:
        arr = np.asarray(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond a double's range
        raise _bad(f"input '{name}' data out of range", got="an integer beyond 1.8e308",
                   expected=f"{datatype} numbers") from None
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
    doc = parse_json(head, "inference request", todo=f"send JSON, with {HEADER_LENGTH} when binary data follows")
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise _bad("inference request", got=brief(doc), expected='an object with a non-empty "inputs" list')
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("request parameters", got=type(params).__name__, expected="an object")
    rid = doc.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise _bad("request id", got=brief(rid), expected="a string")
    inputs: dict[str, Tensor] = {}
    offset = 0
    for spec in doc["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("input", got=brief(spec), expected='an object with "name", "datatype", "shape"')
        name = spec["name"][:80]
        if name in inputs:
            raise _bad(f"input '{name}' given twice", got="2", expected="once")
        datatype = spec.get("datatype")
        if not isinstance(datatype, str) or datatype not in DTYPES:
            raise _bad(f"input '{name}' datatype", got=brief(datatype), expected=f"one of {sorted(DTYPES)}")
        shape, count = _shape(spec.get("shape"), name, len(body))
        p = spec.get("parameters") or {}
        size = p.get("binary_data_size") if isinstance(p, dict) else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(rest):
                raise _bad(f"input '{name}' binary_data_size", got=brief(size),
                           expected=f"at most the {len(rest) - offset} binary bytes left")
            blob = rest[offset:offset + size]
            offset += size
            if datatype == "BYTES":
                data: Any = _split_bytes(blob, count, name)
            else:
                itemsize = np.dtype(DTYPES[datatype]).itemsize
                if size != count * itemsize:
                    raise _bad(f"input '{name}' binary_data_size", got=brief(size),
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
    wanted = doc.get("outputs")
    if wanted is not None and not isinstance(wanted, list):
        raise _bad("requested outputs", got=brief(wanted), expected='a list of objects with "name"')
    for spec in wanted or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("requested output", got=brief(spec), expected='an object with "name"')
        p = spec.get("parameters") or {}
        outputs[spec["name"][:80]] = bool(p.get("binary_data", False)) if isinstance(p, dict) else False
        if isinstance(p, dict) and "classification" in p:
            class_count[spec["name"][:80]] = p["classification"]
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
