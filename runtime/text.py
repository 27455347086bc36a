"""The one and only text preprocessing of edgexfer: text -> ``int64[N, L]`` token ids and attention mask.

The host (training, export, golden inputs, evaluation) and the device (predict, learn) both call this
module, so the backbone sees identical token ids on both sides. Tokenization is the Hugging Face
``tokenizers`` library (Rust; no torch, no transformers) reading the ``tokenizer.json`` a text bundle
ships, with two settings fixed here whatever the file says: truncation to ``max_length`` tokens (the
manifest's ``backbone.input.max_length``; truncated texts are counted) and padding to the longest text of
the batch with the file's pad token. ``[CLS] ... [SEP]`` come from the file's post-processor.

A text *sample* is its normalised text (:func:`normalize_text`); its identity in the feature cache is the
sha256 of that text's UTF-8 bytes (:func:`text_sha256`), so the same text read from a file, a CSV row or
``--text`` is one sample.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.errors import BundleError, InputError
from edgexfer.runtime.fsutil import file_sha256
from edgexfer.runtime.optional import require

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "MAX_TEXT_BYTES",
    "TextSpec",
    "TextTokenizer",
    "TokenBatch",
    "decode_text",
    "normalize_text",
    "text_sha256",
]

#: tokens per text the backbone sees, [CLS] and [SEP] included (all-MiniLM-L6-v2 was trained with 256)
DEFAULT_MAX_LENGTH = 256
#: the longest max_length a manifest may ask for (BERT's position table has 512 rows)
MAX_POSITIONS = 512
#: texts longer than this many bytes are refused before tokenizing (256 tokens are ~1-2 KB of English;
#: a 1 MB "text" is a wrong file, not a sample)
MAX_TEXT_BYTES = 1_000_000

# Bump whenever the token ids can change for the same text, tokenizer file and max_length: cached
# features are keyed by TextSpec.key(), so a new version makes old cache entries miss instead of lie.
_VERSION = "tok1"


def normalize_text(text: str) -> str:
    """The sample a text stands for: line ends as ``\\n``, a leading byte-order mark and outer whitespace removed.

    A file's trailing newline and a CSV cell's surrounding spaces are not part of the sample; inner
    whitespace is (the tokenizer decides what it means).
    """
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff").strip()


def text_sha256(text: str) -> str:
    """The feature-cache identity of a text: sha256 of its normalised UTF-8 bytes."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()


def decode_text(data: bytes, source: str = "text") -> str:
    """File bytes -> the normalised sample text, or a one-line :class:`InputError` saying why not.

    Strict UTF-8 (a leading byte-order mark is allowed); empty or whitespace-only text, NUL bytes and
    texts over :data:`MAX_TEXT_BYTES` are refused.
    """
    if len(data) > MAX_TEXT_BYTES:
        raise InputError(f"text {source}", got=f"{len(data):,} bytes", expected=f"at most {MAX_TEXT_BYTES:,} bytes",
                         todo="one sample per file: split the file into samples")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"text {source}", got=f"not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}, "
                                               f"line {line})",
                         expected="UTF-8 text", todo="re-save the file as UTF-8 (iconv -t UTF-8)") from None
    return check_text(text, source)


def check_text(text: str, source: str = "text") -> str:
    """A str given as a sample -> its normalised form, refusing empty text and NUL characters."""
    if not isinstance(text, str):
        raise InputError(f"text {source}", got=type(text).__name__, expected="a str")
    if "\x00" in text:
        raise InputError(f"text {source}", got="a NUL character", expected="text, not binary data",
                         todo="pass a text file (one sample per file)")
    if len(text) > MAX_TEXT_BYTES:
        raise InputError(f"text {source}", got=f"{len(text):,} characters",
                         expected=f"at most {MAX_TEXT_BYTES:,}", todo="one sample per text: split it")
    normal = normalize_text(text)
    if not normal:
        raise InputError(f"text {source}", got="an empty text", expected="at least one non-space character",
                         todo="remove the empty sample")
    return normal


@dataclass(frozen=True)
class TokenBatch:
    """Token ids and attention mask of a batch of texts, padded to its longest text (``L <= max_length``)."""

    input_ids: np.ndarray  #: int64 [N, L]
    attention_mask: np.ndarray  #: int64 [N, L], 1 for tokens, 0 for padding
    truncated: int  #: texts of this batch cut to max_length tokens

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def feed(self) -> dict[str, np.ndarray]:
        """The backbone's inputs by name (``backbone.onnx`` of a text bundle takes both)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def rows(self, index: Sequence[int] | slice) -> TokenBatch:
        """Some rows, padding trimmed to their own longest text (the truncated count is not split: 0)."""
        ids, mask = self.input_ids[index], self.attention_mask[index]
        length = int(mask.sum(axis=1).max()) if len(mask) else 0
        return TokenBatch(np.ascontiguousarray(ids[:, :length]), np.ascontiguousarray(mask[:, :length]), 0)


@dataclass(frozen=True)
class TextSpec:
    """How a text becomes the backbone's input; recorded in a text bundle's manifest (``backbone.input``)."""

    #: sha256 of tokenizer.json: the feature cache never mixes tokenizers
    tokenizer_sha256: str
    #: tokens per text at most, [CLS] and [SEP] included
    max_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        sha = self.tokenizer_sha256
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise InputError("text spec tokenizer_sha256", got=repr(sha)[:80], expected="64 lowercase hex digits")
        check_max_length(self.max_length)

    def key(self) -> str:
        """Stable text naming exactly this preprocessing, e.g. ``tok1:<tokenizer sha256>:max=256``.

        The feature cache keys features by it (with the backbone's sha256).
        """
        return f"{_VERSION}:{self.tokenizer_sha256}:max={self.max_length}"


def check_max_length(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 3 <= value <= MAX_POSITIONS:
        raise InputError("text max_length", got=repr(value), expected=f"an integer 3..{MAX_POSITIONS} (tokens)",
                         todo=f"use {DEFAULT_MAX_LENGTH}")
    return value


class TextTokenizer:
    """``tokenizer.json`` with edgexfer's settings: truncation to ``max_length``, padding to the longest text."""

    def __init__(self, tokenizer: Any, sha256: str, max_length: int = DEFAULT_MAX_LENGTH, path: Path | None = None):
        self.max_length = check_max_length(max_length)
        self.sha256 = sha256
        self.path = path
        self.spec = TextSpec(sha256, self.max_length)
        pad = tokenizer.padding or {}
        pad_id, pad_token = pad.get("pad_id"), pad.get("pad_token")
        if pad_token is None:
            pad_id, pad_token = tokenizer.token_to_id("[PAD]"), "[PAD]"
        if pad_id is None:
            raise BundleError("tokenizer.json has no padding token", got=f"{path}: no padding and no [PAD] token",
                              expected="a tokenizer with a pad token (BERT's [PAD])", todo="ship the model's own tokenizer.json")
        # The file's own settings (all-MiniLM-L6-v2's: truncate at 128, pad every text to 128) are replaced:
        # the manifest's max_length decides, and a batch is padded only to its longest text.
        tokenizer.enable_truncation(self.max_length)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
        self._tokenizer = tokenizer
        self.pad_id = int(pad_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], max_length: int = DEFAULT_MAX_LENGTH,
                  sha256: str | None = None) -> TextTokenizer:
        """Load ``tokenizer.json``; ``sha256`` given (a bundle's manifest) must match the file."""
        tokenizers = require("tokenizers", "text tokenization")
        path = Path(path)
        if not path.is_file():
            raise BundleError("tokenizer file not found", got=str(path), expected="a tokenizer.json file",
                              todo="re-export the bundle (a text bundle ships tokenizer.json)")
        actual = file_sha256(path)
        if sha256 is not None and actual != sha256:
            raise BundleError("tokenizer.json differs from the manifest", got=f"sha256 {actual[:16]}…",
                              expected=f"sha256 {sha256[:16]}…", todo="copy the bundle again or re-export it")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a plain Exception for a malformed file
            raise BundleError("tokenizer.json cannot be loaded", got=f"{path.name}: {str(exc)[:160]}",
                              expected="a Hugging Face tokenizers file", todo="ship the model's own tokenizer.json") from None
        return cls(tokenizer, actual, max_length, path)

    def key(self) -> str:
        """The feature-cache key of this tokenizer and max_length (:meth:`TextSpec.key`)."""
        return self.spec.key()

    def encode(self, texts: Sequence[str]) -> TokenBatch:
        """Token ids and mask of ``texts`` (already normalised samples), padded to the longest one.

        Texts longer than ``max_length`` tokens keep their first ``max_length - 2`` tokens between
        [CLS] and [SEP]; ``TokenBatch.truncated`` counts them.
        """
        if isinstance(texts, str):
            raise InputError("encode takes a list of texts", got="one str", expected="a list of str",
                             todo="wrap the text in a list")
        if not texts:
            raise InputError("encode", got="no texts", expected="at least one text")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise InputError("encode", got=f"{type(texts[bad[0]]).__name__} at index {bad[0]}", expected="str texts")
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return TokenBatch(ids, mask, sum(1 for e in encodings if e.overflowing))

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text is longer than ``max_length`` tokens (it will be cut)."""
        return [bool(e.overflowing) for e in self._tokenizer.encode_batch(list(texts))] if texts else []
