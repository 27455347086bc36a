"""The bundle manifest (schema ``edgexfer.bundle/1``): one frozen dataclass, strict parsing.

``Manifest.from_json`` refuses unknown keys, missing keys and wrong types, naming the field
(``manifest.backbone.input.size``) in a one-line :class:`BundleError`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edgexfer.runtime.errors import BundleError
from edgexfer.runtime.fsutil import write_atomic
from edgexfer.runtime.modalities import DEFAULT_MODALITY, modality_named, modality_names
from edgexfer.runtime.names import HEAD_KINDS, RESIZE_POLICIES
from edgexfer.runtime.precision import PRECISIONS

SCHEMA = "edgexfer.bundle/1"


class Fields:
    """Reads a JSON object field by field, so every error names the full path of the bad field."""

    def __init__(self, obj: Any, where: str):
        if not isinstance(obj, dict):
            raise BundleError(f"manifest field {where}", got=type(obj).__name__, expected="an object",
                              todo="re-export the bundle")
        self.obj = dict(obj)
        self.where = where

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, check=None, expect: str = ""):
        path = f"{self.where}.{key}"
        if key not in self.obj:
            if default is not ...:
                return default
            raise BundleError(f"manifest field {path}", got="nothing", expected=expect or "the field present",
                              todo="re-export the bundle with this edgexfer version")
        value = self.obj.pop(key)
        # bool is an int in Python; a manifest never means True when it says 1.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            ok = False
        else:
            ok = isinstance(value, kind)
        if not ok or (check is not None and not check(value)):
            raise BundleError(f"manifest field {path}", got=repr(value)[:80],
                              expected=expect or getattr(kind, "__name__", str(kind)), todo="fix or re-export the bundle")
        return value

    def done(self) -> None:
        if self.obj:
            extra = ", ".join(sorted(self.obj))
            raise BundleError(f"manifest object {self.where}", got=f"unknown field(s) {extra}",
                              expected="only the fields of schema " + SCHEMA, todo="re-export the bundle")


def _numbers(n: int):
    return lambda v: len(v) == n and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def check_relative_path(path: str, where: str = "manifest path") -> str:
    """A bundle path is plain and relative: no absolute paths, no '..', no backslashes, no empty parts."""
    p = PurePosixPath(path)
    if (not path or path.startswith("/") or "\\" in path or p.is_absolute() or any(part in ("..", "") for part in path.split("/"))
            or ":" in path.split("/")[0]):
        raise BundleError(where, got=repr(path), expected="a plain relative path inside the bundle",
                          todo="re-export the bundle")
    return path


@dataclass(frozen=True)
class InputSpec:
    layout: str = "NHWC"
    dtype: str = "uint8"
    size: tuple[int, int] = (224, 224)  #: (height, width)
    resize: str = "letterbox"
    fill: tuple[int, int, int] = (255, 255, 255)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def parse(cls, obj: Any, where: str) -> InputSpec:
        f = Fields(obj, where)
        spec = cls(
            layout=f.take("layout", str, check=lambda v: v == "NHWC", expect="'NHWC'"),
            dtype=f.take("dtype", str, check=lambda v: v == "uint8", expect="'uint8'"),
            size=tuple(f.take("size", list, check=lambda v: len(v) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and 8 <= x <= 4096 for x in v), expect="[height, width] integers")),
            resize=f.take("resize", str, check=lambda v: v in RESIZE_POLICIES, expect=" or ".join(RESIZE_POLICIES)),
            fill=tuple(f.take("fill", list, check=lambda v: len(v) == 3 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in v), expect="[r, g, b] in 0..255")),
            mean=tuple(f.take("mean", list, check=_numbers(3), expect="3 numbers")),
            std=tuple(f.take("std", list, check=lambda v: _numbers(3)(v) and all(x > 0 for x in v), expect="3 positive numbers")),
        )
        f.done()
        return spec


@dataclass(frozen=True)
class TextInputSpec:
    """A text backbone's input: token ids and attention mask (int64 [N, L]) from the bundle's tokenizer."""

    tokenizer: str = "tokenizer.json"  #: bundle path of the tokenizer file (listed in ``files``)
    tokenizer_sha256: str = ""  #: its sha256: part of the feature cache's preprocessing key
    max_length: int = 256  #: tokens per text at most, [CLS] and [SEP] included; longer texts are truncated

    @classmethod
    def parse(cls, obj: Any, where: str) -> TextInputSpec:
        f = Fields(obj, where)
        spec = cls(
            tokenizer=check_relative_path(f.take("tokenizer", str, check=bool, expect="a bundle path"), f"{where}.tokenizer"),
            tokenizer_sha256=f.take("tokenizer_sha256", str, check=_is_sha, expect="64 hex digits"),
            max_length=f.take("max_length", int, check=lambda v: 3 <= v <= 512, expect="an integer 3..512 (tokens)"),
        )
        f.done()
        return spec


@dataclass(frozen=True)
class BackboneInfo:
    arch: str
    sha256: str
    feature_dim: int
    input: InputSpec | TextInputSpec
    #: a registered modality (edgexfer.runtime.modalities); a manifest without the field is an image bundle's
    modality: str = DEFAULT_MODALITY
    #: sha256 of the weights of a brought backbone (``py:``), "" for a packaged one (its arch names them);
    #: written only when set, so a packaged backbone's manifest stays what older devices read
    weights_sha256: str = ""

    @classmethod
    def parse(cls, obj: Any, where: str) -> BackboneInfo:
        f = Fields(obj, where)
        arch = f.take("arch", str, check=bool, expect="a backbone name")
        modality = f.take("modality", str, DEFAULT_MODALITY, check=lambda v: v in modality_names(),
                          expect=" or ".join(modality_names()))
        spec = modality_named(modality).input_spec
        info = cls(
            arch=arch,
            sha256=f.take("sha256", str, check=_is_sha, expect="64 hex digits"),
            feature_dim=f.take("feature_dim", int, check=lambda v: v > 0, expect="a positive integer"),
            input=spec.parse(f.take("input", dict), f"{where}.input"),
            modality=modality,
            weights_sha256=f.take("weights_sha256", str, "", check=_is_sha, expect="64 hex digits"),
        )
        f.done()
        return info


@dataclass(frozen=True)
class HeadInfo:
    kind: str
    classes: tuple[str, ...]
    version: int
    backbone_sha256: str
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: Any, where: str) -> HeadInfo:
        f = Fields(obj, where)
        info = cls(
            kind=f.take("kind", str, check=lambda v: v in HEAD_KINDS, expect=" or ".join(HEAD_KINDS)),
            classes=tuple(f.take("classes", list, check=lambda v: len(v) >= 2 and len(set(v)) == len(v) and all(
                isinstance(c, str) and c for c in v), expect="at least 2 unique class names")),
            version=f.take("version", int, check=lambda v: v >= 1, expect="an integer >= 1"),
            backbone_sha256=f.take("backbone_sha256", str, check=_is_sha, expect="64 hex digits"),
            metrics=f.take("metrics", dict, {}, check=lambda v: all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()), expect="name -> number"),
        )
        f.done()
        return info


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int

    @classmethod
    def parse(cls, obj: Any, where: str) -> FileEntry:
        f = Fields(obj, where)
        entry = cls(sha256=f.take("sha256", str, check=_is_sha, expect="64 hex digits"),
                    bytes=f.take("bytes", int, check=lambda v: v >= 0, expect="a size in bytes"))
        f.done()
        return entry


@dataclass(frozen=True)
class EngineEntry:
    backend: str
    precision: str
    files: tuple[str, ...]
    validation: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  #: converter details (tool versions, layers kept in float)

    @classmethod
    def parse(cls, obj: Any, where: str) -> EngineEntry:
        f = Fields(obj, where)
        entry = cls(
            backend=f.take("backend", str, check=bool, expect="a backend name"),
            precision=f.take("precision", str, check=lambda v: v in PRECISIONS, expect=" or ".join(PRECISIONS)),
            files=tuple(check_relative_path(p, f"{where}.files") for p in f.take(
                "files", list, check=lambda v: all(isinstance(p, str) for p in v), expect="a list of paths")),
            validation=f.take("validation", dict, {}),
            info=f.take("info", dict, {}),
        )
        f.done()
        return entry


def _is_sha(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class Manifest:
    """The bundle's contract; see docs/architecture.md ("The bundle")."""

    name: str
    created_utc: str
    backbone: BackboneInfo
    head: HeadInfo
    files: dict[str, FileEntry]
    engines: tuple[EngineEntry, ...] = ()
    tools: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError("manifest.json is not valid JSON", got=str(exc), expected="a JSON object",
                              todo="re-export the bundle") from None
        f = Fields(obj, "manifest")
        f.take("schema", str, check=lambda v: v == SCHEMA, expect=repr(SCHEMA))
        files_obj = f.take("files", dict)
        files = {check_relative_path(k, "manifest.files"): FileEntry.parse(v, f"manifest.files[{k}]")
                 for k, v in files_obj.items()}
        manifest = cls(
            name=f.take("name", str, check=bool, expect="a non-empty name"),
            created_utc=f.take("created_utc", str),
            backbone=BackboneInfo.parse(f.take("backbone", dict), "manifest.backbone"),
            head=HeadInfo.parse(f.take("head", dict), "manifest.head"),
            files=files,
            engines=tuple(EngineEntry.parse(e, f"manifest.engines[{i}]") for i, e in enumerate(f.take("engines", list, []))),
            tools=f.take("tools", dict, {}),
        )
        f.done()
        if manifest.head.backbone_sha256 != manifest.backbone.sha256:
            raise BundleError("manifest.head.backbone_sha256", got=manifest.head.backbone_sha256[:16] + "…",
                              expected=f"the backbone's sha256 {manifest.backbone.sha256[:16]}…",
                              todo="a head is bound to one backbone: re-export the bundle")
        modality_named(manifest.backbone.modality).check_manifest(manifest)
        for entry in manifest.engines:
            for p in entry.files:
                if p not in manifest.files:
                    raise BundleError("manifest.engines files", got=p, expected="a path listed in manifest.files")
        return manifest

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["backbone"]["modality"] == DEFAULT_MODALITY:
            # an image manifest stays what it was before text bundles existed: devices running an older
            # edgexfer (whose strict parser refuses unknown fields) keep reading new image bundles
            del d["backbone"]["modality"]
        if not d["backbone"]["weights_sha256"]:
            del d["backbone"]["weights_sha256"]
        out = {"schema": d.pop("schema")}
        out.update(d)
        return json.loads(json.dumps(out))  # tuples -> lists

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def write(self, path: str | Path) -> None:
        """Write atomically: a reader sees the old manifest or the new one, never half of one."""
        write_atomic(Path(path), self.to_json().encode())
