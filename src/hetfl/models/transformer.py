"""A small causal (GPT-style, pre-LayerNorm) transformer over token ids, predicting from the last position.

Attention is written out with separate q/k/v/out linear layers and a fixed head size, so the head
structure is visible in the module graph: head ``i`` owns rows ``[i*head_dim, (i+1)*head_dim)`` of
q, k and v.  Width scales the number of heads (head size fixed), hence the residual width
``heads * head_dim``, and the feed-forward width.
"""

import torch
import torch.nn.functional as F
from torch import nn

from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
from hetfl.models.registry import MODELS, check_positive, check_width, scaled, token_shape


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.head_dim = head_dim
        self.q = nn.Linear(d_model, inner)
        self.k = nn.Linear(d_model, inner)
        self.v = nn.Linear(d_model, inner)
        self.out = nn.Linear(inner, d_model)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        # (batch, seq, heads*head_dim) -> (batch, heads, seq, head_dim); the head count is inferred.
        return t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """x + attn(LN(x)), then x + FFN(LN(x)) with a GELU feed-forward."""

    def __init__(self, d_model: int, heads: int, head_dim: int, ffn: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, head_dim)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(self.act(self.fc1(self.ln2(x)))))


class TokenTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        num_classes: int,
        heads: int,
        head_dim: int,
        layers: int,
        ffn: int,
        dropout: float,
    ):
        super().__init__()
        d_model = heads * head_dim
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, heads, head_dim, ffn, dropout) for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.size(1), device=x.device)
        h = self.drop(self.tok(x) + self.pos(positions))
        for layer in self.layers:
            h = layer(h)
        return self.fc(self.ln_f(h[:, -1]))


@MODELS.register("transformer")
def transformer(
    info: DataInfo,
    *,
    width: float = 1.0,
    d_model: int = 128,
    heads: int = 4,
    layers: int = 2,
    ffn: int = 512,
    dropout: float = 0.0,
) -> nn.Module:
    """Causal pre-LN transformer on token ids (next-token from the last position); width scales heads, ffn."""
    width = check_width(width)
    seq_len, vocab = token_shape("transformer", info)
    for field, value in (("d_model", d_model), ("heads", heads), ("layers", layers), ("ffn", ffn)):
        check_positive("transformer", field, value)
    if d_model % heads:
        raise ConfigError(
            f"model.d_model of 'transformer' must be a multiple of model.heads, got {d_model} and {heads}"
        )
    if isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout of 'transformer' must be in [0, 1), got {dropout!r}")
    return TokenTransformer(
        vocab_size=vocab,
        max_len=seq_len,
        num_classes=info.num_classes,
        heads=scaled(heads, width),
        head_dim=d_model // heads,
        layers=layers,
        ffn=scaled(ffn, width),
        dropout=float(dropout),
    )
