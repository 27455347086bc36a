"""The modality contract: one class per kind of input, asked by everything that touches samples.

A :class:`Modality` is made once per bundle from its manifest (``backbone``) and the bundle's folder. Its
*sample value* is what the backbone's feed is built from: for an image, its resized ``uint8[H, W, 3]``
pixels; for a text, its normalised text. A :class:`Sample` adds the sample's identity (the sha256 the
feature cache keys it by) and the bytes the cache keeps of it, so a new backbone can compute its
features again.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgexfer.runtime.errors import InputError


@dataclass(frozen=True)
class Sample:
    """One input read and checked by its modality."""

    sha256: str  #: identity in the feature cache
    data: bytes | None  #: what the cache keeps (None: an array given in memory, never stored)
    value: Any  #: what the feed is made of (pixels, a text)
    source: str  #: its name in reports (a path, ``bytes[i]``, ``text[i]``)


@dataclass(frozen=True)
class ServiceInput:
    """How ``device serve`` (:mod:`edgexfer.runtime.service`) takes a modality's samples, and says so in messages."""

    #: the Open Inference Protocol inputs (model metadata): the first, named after the noun, takes encoded
    #: samples as BYTES; any other takes a batch of sample values as one tensor, checked by ``check_batch``
    inputs: tuple[dict[str, Any], ...]
    expected: str  #: the input(s) an inference request must have
    datatype: str  #: the first input's datatype ("BYTES (UTF-8 text)")
    sample: str  #: one sample sent in a request body ("an image", "UTF-8 text")
    numbered: bool = True  #: a decoding error names the sample's index ("image 3: ...")
    media_type: str | None = None  #: what the review queue serves a sample as; None: sniffed from its bytes
    #: BYTES inputs whose JSON elements are the strings themselves, not base64 (texts, as Triton's clients send them)
    json_strings: tuple[str, ...] = ()
    #: the page's form (``/v1/status`` ``bundle.form``): its title, the upload's ``accept``, whether samples
    #: are typed in (literals), and how a sample is drawn ("image": a thumbnail; "text": its text; "audio": a
    #: player)
    title: str = "Classify a sample"
    accept: str = ""
    literal: bool = False
    shown_as: str = "text"
    #: seconds the page records from a microphone as one sample (a WAV), where the browser offers one; None:
    #: samples of this kind are not recorded
    record_s: float | None = None

    def page_form(self) -> dict[str, Any]:
        return {"title": self.title, "accept": self.accept, "literal": self.literal, "shown_as": self.shown_as,
                "record_s": self.record_s}


class LazyValues(Sequence):
    """Sample values computed on first use (a stored image is decoded only if its features are missing)."""

    def __init__(self, count: int, value_of: Callable[[int], Any]):
        self._count, self._value_of = count, value_of

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._value_of(i) for i in range(*index.indices(self._count))]
        return self._value_of(index)


class Modality:
    """Base of every modality. Subclasses set the class attributes and implement the reading and feeding."""

    #: the manifest's ``backbone.modality``
    name: ClassVar[str] = ""
    #: the word for one sample and for several in messages ("image", "images")
    noun: ClassVar[str] = "sample"
    plural: ClassVar[str] = "samples"
    #: the manifest's ``backbone.input`` parser: a frozen dataclass with ``parse(obj, where)``
    input_spec: ClassVar[type]
    #: whether ``learn --augment`` can make views of its samples
    augmentable: ClassVar[bool] = False
    #: whether literal samples are given on the command line (``--text``) besides files
    takes_literals: ClassVar[bool] = False
    #: whether ``device watch`` can read its samples from a camera stream
    streams: ClassVar[bool] = False
    #: whether ``device listen`` can cut its samples from a long recording or a microphone: its ``preprocess``
    #: then has ``sample_rate`` and ``clip_samples``, and a sample value is a float32 waveform
    listens: ClassVar[bool] = False
    #: the samples per engine call when a caller does not choose
    batch_size: ClassVar[int] = 16
    #: file name endings (lower case) of its samples: what ``device learn DIR`` takes from a directory
    file_suffixes: ClassVar[tuple[str, ...]] = ()
    #: what a labelled data set of this modality looks like, for messages (``--calib``, ``--val``)
    dataset_help: ClassVar[str] = "a labelled data set"
    #: the converters' calibration reader, ``"module:function"`` (bundle, data, calib_size, *, val_size, seed)
    #: -> CalibrationSplit; "" where int8 calibration is not supported. Named, never imported by the runtime.
    calibration_loader: ClassVar[str] = ""
    #: the converters' int8 quantization scope, ``"module:function"`` (float model path) -> (keyword arguments
    #: of the quantizer: which operators and nodes to quantize, the weighted layers left in float); "" for the
    #: quantizer's defaults
    quantization_scope: ClassVar[str] = ""

    def __init__(self, backbone: Any, root: Path | None = None):
        #: the manifest's ``backbone`` (arch, sha256, feature_dim, input)
        self.backbone = backbone
        #: the bundle folder (files the preprocessing needs, e.g. a tokenizer), None for a bare manifest
        self.root = root

    # --- the manifest ---------------------------------------------------------------------------
    @classmethod
    def check_manifest(cls, manifest: Any) -> None:
        """Cross-field checks of a parsed manifest (files the input spec names); none by default."""

    # --- preprocessing ----------------------------------------------------------------------------
    @property
    def preprocess(self) -> Any:  # pragma: no cover - abstract
        """The preprocessing of this bundle; its ``key()`` keys cached features."""
        raise NotImplementedError

    # --- reading one sample -----------------------------------------------------------------------
    def read(self, item: Any, source: str) -> Sample:  # pragma: no cover - abstract
        """A file path or its bytes (or what else the modality takes) -> a checked :class:`Sample`.

        Raises :class:`InputError` (one line) for a bad or unreadable sample (callers also report an
        ``OSError`` that gets through as that sample's error, never as a crash).
        """
        raise NotImplementedError

    def identify(self, item: Any, source: str) -> Sample:
        """Like :meth:`read`, but the value may be left to :meth:`value_of` (``Sample.value`` None): field
        learning reads and hashes a batch first and decodes only the samples the capacity admits whose features
        are missing. By default the sample is read fully. An input that is not of this modality still fails here."""
        return self.read(item, source)

    def value_of(self, sample: Sample) -> Any:
        """The value of a sample from :meth:`identify`: its own, or made now from its data (InputError if it fails)."""
        if sample.value is not None:
            return sample.value
        value = self.stored_value(sample.data)
        if value is None:
            raise InputError(f"{self.noun} {sample.source}", got="unreadable", expected=f"a {self.noun} file")
        return value

    def takes_file(self, name: str) -> bool:
        """Whether a file found in a directory is one of its samples (by :attr:`file_suffixes`)."""
        return name.lower().endswith(self.file_suffixes) if self.file_suffixes else False

    def literal(self, value: Any, source: str) -> Sample:
        """A sample given as a literal (``--text``); refused unless :attr:`takes_literals`."""
        raise InputError(f"literal samples given to an {self.name} bundle", got=f"{type(value).__name__} {source}",
                         expected=f"{self.noun} files", todo=f"pass {self.noun} files, or install a bundle that reads them")

    def decode(self, data: bytes, source: str, max_pixels: int | None = None) -> Any:  # pragma: no cover
        """Bytes sent to the service -> a sample value; ``max_pixels`` bounds decoded images."""
        raise NotImplementedError

    def stored_value(self, data: bytes) -> Any | None:  # pragma: no cover - abstract
        """The value of a sample the cache kept (:attr:`Sample.data`); None when it is not this modality's."""
        raise NotImplementedError

    def accepts_stored(self, data: bytes) -> bool:
        """Whether a kept sample is one of this modality's (cheap: it is not decoded fully)."""
        return True

    def describe(self, value: Any) -> str:
        """A short description of a sample value for logs and the review queue."""
        return self.noun

    # --- the service (device serve) ---------------------------------------------------------------
    def service_input(self) -> ServiceInput:
        """The service's inputs: by default one BYTES input named after the noun, a file per element."""
        return ServiceInput(({"name": self.noun, "datatype": "BYTES", "shape": [-1]},),
                            expected=f"the input '{self.noun}' (BYTES)", datatype="BYTES", sample=f"a {self.noun} file",
                            title=f"Classify a {self.noun}")

    def sample_of(self, data: bytes, value: Any, source: str) -> Sample:
        """The :class:`Sample` of a value :meth:`decode` made of ``data`` (the review queue keeps it): by
        default identified and kept as the bytes sent."""
        return Sample(hashlib.sha256(data).hexdigest(), data, value, source)

    # --- the engine's feed ------------------------------------------------------------------------
    def feed(self, values: Sequence[Any]) -> Any:  # pragma: no cover - abstract
        """The engine input of a batch of values (an array, or a feed of named arrays)."""
        raise NotImplementedError

    def features(self, engine: Any, values: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
        """Features of ``values``, float32 ``[N, D]`` in their order (no cache)."""
        size = batch_size or self.batch_size
        if not len(values):
            return np.zeros((0, self.backbone.feature_dim), np.float32)
        return np.concatenate([engine.run(self.feed(values[s:s + size])) for s in range(0, len(values), size)])

    def cached_args(self, values: Sequence[Any]) -> dict[str, Any]:
        """The keyword arguments of :func:`~edgexfer.runtime.features.cached_features` for ``values``."""
        return {"pixels_of": None, "batch_of": lambda chunk: self.feed([values[i] for i in chunk]),
                "batch_size": self.batch_size}

    def golden_feed(self, golden: dict[str, np.ndarray]) -> Any:  # pragma: no cover - abstract
        """The engine input of the bundle's golden set (``golden.npz``)."""
        raise NotImplementedError

    def engine_shapes(self, batch: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Input name -> (min, opt, max) shapes of an engine's optimisation profile (TensorRT), given the batch's."""
        raise NotImplementedError  # pragma: no cover - a modality without fixed-profile engines

    def profile_id(self, batch: tuple[int, int, int]) -> str:
        """The engine profile as part of an engine key; "" where the shapes follow from the backbone alone."""
        return ""


def source_name(item: Any, index: int) -> str:
    """What a sample is called in reports: its path, or ``array[i]`` / ``bytes[i]``."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"array[{index}]"
    return f"bytes[{index}]"


def read_bytes(item: Any, what: str) -> bytes:
    """The bytes of a file path or of bytes given in memory; InputError for anything else."""
    if isinstance(item, (str, os.PathLike)):
        return Path(item).read_bytes()
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    raise InputError(what, got=type(item).__name__, expected="a path or bytes")
