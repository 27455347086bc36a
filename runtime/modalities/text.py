"""Texts: UTF-8 files, table rows or literal strings, tokenized by the bundle's ``tokenizer.json``.

A sample is its normalised text; its identity is the sha256 of that text's UTF-8 bytes, which the cache
keeps. The feed is the ``input_ids`` and ``attention_mask`` of a batch (:mod:`edgexfer.runtime.text`, the
one text preprocessing of edgexfer); texts of similar length share a batch, so little of it is padding.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.errors import BundleError, EdgexferError, InputError, ValidationError
from edgexfer.runtime.manifest import TextInputSpec
from edgexfer.runtime.modalities.base import Modality, Sample, ServiceInput
from edgexfer.runtime.text import TextSpec, TextTokenizer, TokenBatch, check_text, decode_text, text_sha256
from edgexfer.runtime.textdata import TEXT_EXTENSIONS

#: TensorRT optimisation profile of the sequence length in tokens: (min, opt, max); max is the manifest's
#: max_length (longer texts are truncated before they reach the engine), opt a typical length
SEQUENCE_PROFILE = (1, 128, 256)


class TextModality(Modality):
    name = "text"
    noun = "text"
    plural = "texts"
    input_spec = TextInputSpec
    takes_literals = True
    #: texts per engine call: a batch is padded to its longest text, so texts are batched by length
    batch_size = 32
    #: ``device learn DIR`` takes each .txt file as one sample (tables are data sets: ``edgexfer train``)
    file_suffixes = tuple(sorted(TEXT_EXTENSIONS))
    dataset_help = "labelled texts (a folder of .txt per class, or a CSV/JSONL of text,label)"
    calibration_loader = "edgexfer.converters.calibration:load_text_calibration"
    quantization_scope = "edgexfer.converters.qdq:transformer_scope"

    def __init__(self, backbone: Any, root: Path | None = None):
        super().__init__(backbone, root)
        inp = backbone.input
        self._spec = TextSpec(inp.tokenizer_sha256, inp.max_length)
        self._tokenizer: TextTokenizer | None = None

    @classmethod
    def check_manifest(cls, manifest: Any) -> None:
        spec = manifest.backbone.input
        entry = manifest.files.get(spec.tokenizer)
        if entry is None or entry.sha256 != spec.tokenizer_sha256:
            raise BundleError("manifest.backbone.input.tokenizer",
                              got=f"{spec.tokenizer} " + ("not in manifest.files" if entry is None else "with another sha256"),
                              expected="the tokenizer file listed in manifest.files with tokenizer_sha256",
                              todo="re-export the bundle")

    @property
    def preprocess(self) -> TextSpec:
        return self._spec

    @property
    def tokenizer(self) -> TextTokenizer:
        """The bundle's tokenizer, loaded (and checked against the manifest) once."""
        if self._tokenizer is None:
            if self.root is None:
                raise BundleError("text preprocessing needs the bundle's tokenizer", got="a manifest without its folder",
                                  expected="a bundle directory", todo="open the bundle with Bundle.open")
            inp = self.backbone.input
            self._tokenizer = TextTokenizer.from_file(self.root / inp.tokenizer, inp.max_length,
                                                      sha256=inp.tokenizer_sha256)
        return self._tokenizer

    def read(self, item: Any, source: str) -> Sample:
        if isinstance(item, (str, os.PathLike)):
            try:
                data = Path(item).read_bytes()
            except OSError as exc:
                raise InputError(f"cannot read file {source}", got=exc.strerror or str(exc),
                                 expected="a readable text file", todo="check the path and its permissions") from None
            return self._sample(decode_text(data, source), source)
        if isinstance(item, (bytes, bytearray)):
            return self._sample(decode_text(bytes(item), source), source)
        raise InputError(f"input {source}", got=type(item).__name__,
                         expected="a text file path or its bytes (literal texts: --text)")

    def literal(self, value: Any, source: str) -> Sample:
        return self._sample(check_text(value, source), source)

    @staticmethod
    def _sample(text: str, source: str) -> Sample:
        return Sample(text_sha256(text), text.encode("utf-8"), text, source)

    def decode(self, data: bytes, source: str, max_pixels: int | None = None) -> str:
        return decode_text(data, source)

    def service_input(self) -> ServiceInput:
        # one input; its JSON elements are the UTF-8 strings themselves
        return ServiceInput(({"name": "text", "datatype": "BYTES", "shape": [-1]},),
                            expected="the input 'text' (BYTES, UTF-8) of this text model",
                            datatype="BYTES (UTF-8 text)", sample="UTF-8 text", numbered=False,
                            media_type="text/plain; charset=utf-8", title="Classify a text",
                            accept=".txt,text/plain", literal=True, shown_as="text", json_strings=("text",))

    def sample_of(self, data: bytes, value: str, source: str) -> Sample:
        return self._sample(value, source)  # the normalised text, as read() keeps it

    def stored_value(self, data: bytes) -> str | None:
        # another modality's sample (an image kept before a text bundle was installed) is not a text
        try:
            return check_text(data.decode("utf-8"))
        except (UnicodeDecodeError, EdgexferError):
            return None

    def accepts_stored(self, data: bytes) -> bool:
        return self.stored_value(data) is not None

    def describe(self, value: str) -> str:
        return value[:80]

    def feed(self, values: Sequence[str]) -> TokenBatch:
        return self.tokenizer.encode(list(values))

    def features(self, engine: Any, values: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        from edgexfer.runtime.features import text_features

        if not len(values):
            return np.zeros((0, self.backbone.feature_dim), np.float32)
        return text_features(engine, self.tokenizer, list(values), batch_size or self.batch_size)[0]

    def cached_args(self, values: Sequence[str]) -> dict[str, Any]:
        return {**super().cached_args(values), "order": lambda i: len(values[i])}

    def golden_feed(self, golden: dict[str, np.ndarray]) -> TokenBatch:
        """The recorded token ids, after checking that the tokenizer here makes the same ones from the texts."""
        recorded = TokenBatch(golden["input_ids"].astype("int64"), golden["attention_mask"].astype("int64"), 0)
        again = self.tokenizer.encode([str(t) for t in golden["texts"]])
        if again.input_ids.shape != recorded.input_ids.shape or (again.input_ids != recorded.input_ids).any() \
                or (again.attention_mask != recorded.attention_mask).any():
            rows = [int(i) for i in range(min(len(again), len(recorded)))
                    if again.input_ids.shape != recorded.input_ids.shape
                    or (again.input_ids[i] != recorded.input_ids[i]).any()]
            raise ValidationError(f"golden texts of {self.root} tokenize differently here",
                                  [f"- golden text {i}: token ids differ from the export's" for i in rows[:5]]
                                  or ["- token id shapes differ"],
                                  todo="install the tokenizers version the bundle was exported with (constraints.txt)")
        return recorded

    def engine_shapes(self, batch: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        longest = int(self.backbone.input.max_length)
        s_lo, s_opt, _ = SEQUENCE_PROFILE
        lo, opt, hi = batch
        shapes = ((lo, s_lo), (opt, min(s_opt, longest)), (hi, longest))
        return {name: shapes for name in ("input_ids", "attention_mask")}

    def profile_id(self, batch: tuple[int, int, int]) -> str:
        import json

        return json.dumps({name: [list(s) for s in shapes] for name, shapes in self.engine_shapes(batch).items()},
                          sort_keys=True, separators=(",", ":"))
