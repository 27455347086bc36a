"""Real texts and tokens for the text-model tests: fortunes7 and the MiniLM tokenizer.

Tokenization here calls the ``tokenizers`` library on the packaged tokenizer.json the way
``edgexfer.runtime.text`` does it (that module comes from the text-data branch; once both are merged the
tests can call it instead).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
#: the text demo set shipped in the repository (4 topics x 15 fortunes)
TEXT_DEMO = REPO / "data" / "fortunes-demo"


def fortunes7() -> Path:
    """The fortunes7 text set (7 class folders of .txt files) from ../shared, or $EDGEXFER_FORTUNES7."""
    env = os.environ.get("EDGEXFER_FORTUNES7")
    path = Path(env) if env else REPO.parent / "shared" / "datasets" / "fortunes7"
    if not path.is_dir():
        pytest.skip(f"the shared fortunes7 data set is not at {path} (set EDGEXFER_FORTUNES7)")
    return path


def fortunes_texts(per_class: int | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, labels, class names) of fortunes7, files in sorted order, ``per_class`` of each at most."""
    root = fortunes7()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((root / name).glob("*.txt"))[:per_class]
        texts += [f.read_text(encoding="utf-8").strip() for f in files]
        labels += [label] * len(files)
    return texts, np.array(labels, dtype=np.int64), classes


@dataclass(frozen=True)
class Tokens:
    input_ids: np.ndarray  #: int64 [N, L]
    attention_mask: np.ndarray  #: int64 [N, L]


def tokenize(texts: list[str], max_length: int = 256) -> Tokens:
    """[CLS] ... [SEP], truncated to ``max_length``, padded to the longest text of the batch."""
    from tokenizers import Tokenizer

    from edgexfer.backbones import get_config

    tok = Tokenizer.from_file(str(get_config("minilm_l6").tokenizer_path()))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return Tokens(np.array([e.ids for e in enc], dtype=np.int64), np.array([e.attention_mask for e in enc], dtype=np.int64))
