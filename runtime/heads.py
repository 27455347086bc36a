"""The classifier head: a few float32 arrays that turn backbone features into class scores.

A head is plain numpy data so that the device can evaluate it without any inference engine, and a
field update can ship it on its own (tens of kilobytes). Three kinds exist:

``linear``     ``W [C, D]``, ``b [C]``; logits = f·Wᵀ + b
``mlp``        ``W1 [H, D]``, ``b1 [H]``, ``W2 [C, H]``, ``b2 [C]``; logits = relu(f·W1ᵀ + b1)·W2ᵀ + b2
``prototype``  ``P [C, D]`` (unit rows), ``scale`` (shape ``[]`` or ``[1]``); logits = scale·cos(f, P)

On disk a head is one safetensors file whose string metadata carries the format tag, the kind, the
class names and the temperature. Loading is strict and never unpickles: the 8-byte header length and
the JSON header are checked by hand before the safetensors library touches the bytes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy

from edgexfer.runtime.errors import HeadError, InputError
from edgexfer.runtime.fsutil import write_atomic
from edgexfer.runtime.names import HEAD_KINDS

#: value of the ``format`` metadata key; bump the suffix when the file layout changes
HEAD_FORMAT = "edgexfer.head/1"


_METADATA_KEYS = frozenset({"format", "kind", "classes", "temperature"})

# A head header lists a handful of tensors and the class names. Even ten thousand long class names
# stay far below this; anything larger is not a head (a pickle or zip read as a length is huge).
MAX_HEADER_BYTES = 16 * 1024 * 1024

# Prototype rows are stored unit-length; allow for float32 rounding of the normalisation.
_UNIT_NORM_TOLERANCE = 1e-3

# Features of (near) zero length have no direction; dividing by this floor keeps cos() finite.
_NORM_FLOOR = 1e-12

_REEXPORT = "re-export the head with edgexfer (train/retrain writes a valid head.safetensors)"


@dataclass(frozen=True, eq=False)
class Head:
    """A classifier head evaluated in numpy.

    Construction validates (see :meth:`validate`), so a ``Head`` in hand is always usable. The tensors
    are copied into read-only arrays so that a validated head cannot change underneath its user.
    ``eq=False`` because comparing dicts of arrays with ``==`` is ambiguous; compare tensors explicitly.
    """

    kind: str  #: "linear", "mlp" or "prototype"
    classes: tuple[str, ...]  #: class names; row ``i`` of the logits belongs to ``classes[i]``
    tensors: dict[str, np.ndarray]  #: float32 arrays named as in :data:`HEAD_KINDS`
    temperature: float | None = None  #: softmax temperature for calibrated probabilities; None = 1

    def __post_init__(self) -> None:
        if isinstance(self.classes, (list, tuple)):
            object.__setattr__(self, "classes", tuple(self.classes))
        if isinstance(self.tensors, Mapping):
            frozen: dict[str, np.ndarray] = {}
            for name, value in self.tensors.items():
                if isinstance(value, np.ndarray):
                    value = np.array(value, copy=True, order="C")
                    value.setflags(write=False)
                frozen[name] = value
            object.__setattr__(self, "tensors", frozen)
        if isinstance(self.temperature, (int, np.floating, np.integer)) and not isinstance(self.temperature, bool):
            object.__setattr__(self, "temperature", float(self.temperature))
        self.validate()

    # ----------------------------------------------------------------- shape
    @property
    def feature_dim(self) -> int:
        """Length D of the feature vector this head expects (the backbone's ``feature_dim``)."""
        first = {"linear": "W", "mlp": "W1", "prototype": "P"}[self.kind]
        return int(self.tensors[first].shape[1])

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.classes)

    # ------------------------------------------------------------ evaluation
    def logits(self, features: np.ndarray) -> np.ndarray:
        """Class scores ``float32[N, C]`` for features ``[N, D]``."""
        f = self._checked_features(features)
        t = self.tensors
        if self.kind == "linear":
            out = f @ t["W"].T + t["b"]
        elif self.kind == "mlp":
            hidden = np.maximum(f @ t["W1"].T + t["b1"], 0.0)
            out = hidden @ t["W2"].T + t["b2"]
        else:  # prototype
            norms = np.linalg.norm(f, axis=1, keepdims=True)
            unit = f / np.maximum(norms, np.float32(_NORM_FLOOR))
            out = t["scale"].reshape(()) * (unit @ t["P"].T)
        return np.asarray(out, dtype=np.float32)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Softmax of ``logits / temperature`` as ``float32[N, C]``; each row sums to 1."""
        z = self.logits(features).astype(np.float64)
        if self.temperature is not None:
            z = z / self.temperature
        # Subtracting the row maximum keeps exp() from overflowing for large logits.
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def _checked_features(self, features: np.ndarray) -> np.ndarray:
        if not isinstance(features, np.ndarray):
            raise InputError(
                "head features must be a numpy array",
                got=type(features).__name__,
                expected=f"numpy float array [N, {self.feature_dim}]",
                todo="pass the backbone output as a numpy array",
            )
        if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
            raise InputError(
                "head features have the wrong rank or dtype",
                got=f"{features.dtype}{list(features.shape)}",
                expected=f"float[N, {self.feature_dim}]",
                todo="pass a 2-D float batch of features (add a batch axis for one sample)",
            )
        if features.shape[1] != self.feature_dim:
            raise InputError(
                "head features have the wrong length",
                got=f"D={features.shape[1]}",
                expected=f"D={self.feature_dim}",
                todo="use the head trained for this backbone",
            )
        return features.astype(np.float32, copy=False)

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`HeadError` naming the first bad field or tensor; return None when valid."""
        if self.kind not in HEAD_KINDS:
            raise HeadError(
                "head field 'kind' is unknown",
                got=repr(self.kind),
                expected=f"one of {sorted(HEAD_KINDS)}",
                todo=_REEXPORT,
            )
        self._validate_classes()
        self._validate_temperature()
        if not isinstance(self.tensors, dict):
            raise HeadError("head field 'tensors' is not a dict", got=type(self.tensors).__name__,
                            expected="dict[str, numpy.ndarray]", todo=_REEXPORT)
        required = HEAD_KINDS[self.kind]
        missing = [n for n in required if n not in self.tensors]
        if missing:
            raise HeadError(
                f"{self.kind} head is missing tensor '{missing[0]}'",
                got=f"tensors {sorted(self.tensors)}",
                expected=f"tensors {sorted(required)}",
                todo=_REEXPORT,
            )
        extra = sorted(set(self.tensors) - set(required))
        if extra:
            raise HeadError(
                f"{self.kind} head has unexpected tensor '{extra[0]}'",
                got=f"tensors {sorted(self.tensors)}",
                expected=f"tensors {sorted(required)}",
                todo=_REEXPORT,
            )
        for name in required:
            value = self.tensors[name]
            if not isinstance(value, np.ndarray) or value.dtype != np.float32:
                got = f"{value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
                raise HeadError(f"head tensor '{name}' is not float32", got=got, expected="float32",
                                todo=_REEXPORT)
        self._validate_shapes()
        for name in required:
            if not np.all(np.isfinite(self.tensors[name])):
                raise HeadError(f"head tensor '{name}' holds NaN or infinity", got="non-finite values",
                                expected="finite float32 values", todo="retrain the head; the saved one is corrupt")
        if self.kind == "prototype":
            self._validate_prototype_values()

    def _validate_classes(self) -> None:
        if not isinstance(self.classes, tuple) or not self.classes:
            raise HeadError("head field 'classes' is empty or not a sequence", got=repr(self.classes)[:80],
                            expected="a non-empty tuple of class names", todo=_REEXPORT)
        for i, name in enumerate(self.classes):
            if not isinstance(name, str) or not name.strip():
                raise HeadError(f"head field 'classes[{i}]' is not a usable class name", got=repr(name)[:80],
                                expected="a non-empty string", todo="name every class")
        seen: set[str] = set()
        for name in self.classes:
            if name in seen:
                raise HeadError("head field 'classes' repeats a name", got=repr(name)[:80],
                                expected="unique class names", todo="give every class its own name")
            seen.add(name)

    def _validate_temperature(self) -> None:
        t = self.temperature
        if t is None:
            return
        if isinstance(t, bool) or not isinstance(t, float) or not math.isfinite(t) or t <= 0.0:
            raise HeadError("head field 'temperature' is not a positive number", got=repr(t)[:80],
                            expected="None or a finite float > 0", todo="refit the temperature")

    def _validate_shapes(self) -> None:
        t = self.tensors
        c = len(self.classes)

        def need(name: str, shape: tuple[int, ...], meaning: str) -> None:
            if t[name].shape != shape:
                raise HeadError(f"head tensor '{name}' has the wrong shape", got=list(t[name].shape),
                                expected=f"{list(shape)} ({meaning})", todo=_REEXPORT)

        def need_matrix(name: str) -> None:
            if t[name].ndim != 2 or 0 in t[name].shape:
                raise HeadError(f"head tensor '{name}' is not a non-empty matrix", got=list(t[name].shape),
                                expected="[rows, cols] with rows, cols >= 1", todo=_REEXPORT)

        if self.kind == "linear":
            need_matrix("W")
            d = t["W"].shape[1]
            need("W", (c, d), "one row per class")
            need("b", (c,), "one bias per class")
        elif self.kind == "mlp":
            need_matrix("W1")
            h, d = t["W1"].shape
            need("b1", (h,), "one bias per hidden unit of W1")
            need_matrix("W2")
            need("W2", (c, h), "one row per class, one column per hidden unit")
            need("b2", (c,), "one bias per class")
        else:
            need_matrix("P")
            d = t["P"].shape[1]
            need("P", (c, d), "one prototype row per class")
            if t["scale"].shape not in ((), (1,)):
                raise HeadError("head tensor 'scale' has the wrong shape", got=list(t["scale"].shape),
                                expected="[] or [1]", todo=_REEXPORT)

    def _validate_prototype_values(self) -> None:
        scale = float(self.tensors["scale"].reshape(()))
        if scale <= 0.0:
            raise HeadError("head tensor 'scale' is not positive", got=scale, expected="> 0", todo=_REEXPORT)
        norms = np.linalg.norm(self.tensors["P"].astype(np.float64), axis=1)
        worst = int(np.argmax(np.abs(norms - 1.0)))
        if abs(norms[worst] - 1.0) > _UNIT_NORM_TOLERANCE:
            raise HeadError(f"head tensor 'P' row {worst} is not unit length", got=f"norm {norms[worst]:.6g}",
                            expected="L2-normalised rows (norm 1)", todo="normalise the class means before saving")

    # ------------------------------------------------------------------ disk
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the head as safetensors, atomically: a crash leaves the old file or the new one."""
        target = Path(path)
        metadata = {
            "format": HEAD_FORMAT,
            "kind": self.kind,
            "classes": json.dumps(list(self.classes)),
            "temperature": json.dumps(self.temperature),
        }
        payload = _canonical_header(safetensors.numpy.save(
            {name: np.ascontiguousarray(value) for name, value in self.tensors.items()}, metadata=metadata
        ))
        if not target.parent.is_dir():
            raise HeadError("cannot write head file", got=f"{target}: no such directory",
                            expected="an existing, writable directory", todo="create the directory first")
        try:
            write_atomic(target, payload)
        except OSError as exc:
            raise HeadError("cannot write head file", got=f"{target}: {exc.strerror or exc}",
                            expected="a writable directory", todo="check the path and free space") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str], feature_dim: int | None = None) -> Head:
        """Read a head file strictly; every rejection is a one-line :class:`HeadError`.

        ``feature_dim``, when given, is the backbone's feature length the head must fit.
        """
        source = Path(path)
        data = _read_safetensors_bytes(source)
        header = _parse_header(source, data)
        kind, classes, temperature = _parse_metadata(source, header.get("__metadata__"))
        try:
            tensors = safetensors.numpy.load(data)
        except Exception as exc:  # safetensors raises its own error type for any malformed buffer
            raise HeadError(f"head file {source} cannot be decoded", got=str(exc).splitlines()[0][:120],
                            expected="a safetensors file", todo=_REEXPORT) from exc
        try:
            head = cls(kind=kind, classes=classes, tensors=tensors, temperature=temperature)
        except HeadError as exc:
            raise HeadError(f"head file {source}: {exc.what}", got=exc.got, expected=exc.expected,
                            todo=exc.todo) from exc
        if feature_dim is not None and head.feature_dim != feature_dim:
            raise HeadError(
                f"head file {source} does not fit the backbone",
                got=f"feature_dim {head.feature_dim}",
                expected=f"feature_dim {feature_dim}",
                todo="use the head trained for this backbone, or retrain the head on its features",
            )
        return head


def _reject(source: Path, what: str, got: object, expected: object) -> HeadError:
    return HeadError(f"head file {source} {what}", got=got, expected=expected,
                     todo=f"pass a head.safetensors written by edgexfer; {_REEXPORT}")


def _read_safetensors_bytes(source: Path) -> bytes:
    """Read the file after checking that its length prefix and size describe a safetensors file.

    The size check happens before the bulk read so that a large unrelated file is refused without
    being loaded into memory.
    """
    try:
        with open(source, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _reject(source, "is too short to be safetensors", f"{size} bytes", ">= 10 bytes")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len < 2 or header_len > MAX_HEADER_BYTES:
                raise _reject(source, "is not safetensors (bad header length)", f"header length {header_len}",
                              f"2..{MAX_HEADER_BYTES} bytes")
            if 8 + header_len > size:
                raise _reject(source, "is truncated or not safetensors", f"header length {header_len}, file {size} bytes",
                              "a header that fits in the file")
            rest = fh.read()
    except FileNotFoundError as exc:
        raise HeadError("head file does not exist", got=str(source), expected="an existing head.safetensors",
                        todo="check the path") from exc
    except IsADirectoryError as exc:
        raise HeadError("head path is a directory", got=str(source), expected="a head.safetensors file",
                        todo="pass the file inside the directory") from exc
    except OSError as exc:
        raise HeadError("head file cannot be read", got=f"{source}: {exc.strerror or exc}",
                        expected="a readable file", todo="check permissions") from exc
    return prefix + rest


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_header(source: Path, data: bytes) -> dict[str, object]:
    """Check the JSON header entry by entry; the data region must be exactly the listed tensors."""
    (header_len,) = struct.unpack("<Q", data[:8])
    raw = data[8 : 8 + header_len]
    if raw[:1] != b"{":
        raise _reject(source, "is not safetensors (header is not a JSON object)", repr(raw[:16]), "'{' first")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _reject(source, "has a corrupt JSON header", str(exc)[:120], "valid UTF-8 JSON") from exc
    if not isinstance(header, dict):
        raise _reject(source, "has a header that is not a JSON object", type(header).__name__, "object")

    data_len = len(data) - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _reject(source, f"has a malformed entry for tensor '{name}'", repr(entry)[:120],
                          "{dtype, shape, data_offsets}")
        if entry["dtype"] != "F32":
            raise _reject(source, f"stores tensor '{name}' with the wrong dtype", repr(entry["dtype"])[:20], "F32")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise _reject(source, f"has a malformed shape for tensor '{name}'", repr(shape)[:80],
                          "a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise _reject(source, f"has malformed data offsets for tensor '{name}'", repr(offsets)[:80],
                          "[begin, end] with 0 <= begin <= end")
        if offsets[1] - offsets[0] != 4 * math.prod(shape):
            raise _reject(source, f"has a byte range that does not match the shape of tensor '{name}'",
                          f"{offsets[1] - offsets[0]} bytes for shape {shape}", f"{4 * math.prod(shape)} bytes")
        spans.append((offsets[0], offsets[1], name))
    # The tensors must tile the data region exactly: no gaps, overlaps or trailing bytes, which is
    # where a smuggled payload would hide.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _reject(source, f"has a gap or overlap before tensor '{name}'", f"offset {begin}",
                          f"offset {position}")
        position = end
    if position != data_len:
        raise _reject(source, "has a data region that does not match its header", f"{data_len} bytes",
                      f"{position} bytes")
    return header


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_metadata(source: Path, metadata: object) -> tuple[str, tuple[str, ...], float | None]:
    if not isinstance(metadata, dict):
        raise _reject(source, "has no edgexfer head metadata", "no __metadata__",
                      f"metadata keys {sorted(_METADATA_KEYS)}")
    if set(metadata) != _METADATA_KEYS:
        raise _reject(source, "has the wrong metadata keys", sorted(metadata)[:8], sorted(_METADATA_KEYS))
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _reject(source, f"has non-string metadata '{key}'", type(value).__name__, "a string")
    if metadata["format"] != HEAD_FORMAT:
        raise HeadError(f"head file {source} has an unsupported format", got=repr(metadata["format"])[:60],
                        expected=repr(HEAD_FORMAT), todo="use the edgexfer version that wrote it, or re-export")
    kind = metadata["kind"]
    if kind not in HEAD_KINDS:
        raise _reject(source, "has an unknown head kind", repr(kind)[:40], f"one of {sorted(HEAD_KINDS)}")
    try:
        classes = json.loads(metadata["classes"])
        temperature = json.loads(metadata["temperature"])
    except ValueError as exc:
        raise _reject(source, "has metadata that is not JSON", str(exc)[:120], "JSON values") from exc
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise _reject(source, "has a malformed 'classes' list", repr(classes)[:80], "a JSON list of strings")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
        raise _reject(source, "has a malformed 'temperature'", repr(temperature)[:40], "null or a number")
    return kind, tuple(classes), None if temperature is None else float(temperature)


def _canonical_header(payload: bytes) -> bytes:
    """The same safetensors file with its JSON header in sorted order, so one head always has one sha256.

    safetensors writes the metadata map in a random order (a Rust HashMap), so saving one head twice gave
    different bytes; devices recognise a head by its sha256 (re-installs, refused updates). The tensor
    offsets are relative to the data section, so only the header is rewritten (padded to 8 bytes as the
    format asks).
    """
    (size,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + payload[8 + size:]
