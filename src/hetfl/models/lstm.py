"""Character LSTM of the LEAF Shakespeare benchmark: next character from a window of characters."""

import torch
from torch import nn

from hetfl.data.base import DataInfo
from hetfl.models.registry import MODELS, check_positive, check_width, scaled, token_shape


class CharLSTM(nn.Module):
    """Embedding -> stacked LSTM (batch_first) -> linear on the last time step."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, layers: int, num_classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lstm(self.embed(x))[0]  # (batch, seq_len, hidden)
        return self.fc(out[:, -1])


@MODELS.register("lstm")
def lstm(
    info: DataInfo,
    *,
    width: float = 1.0,
    embed_dim: int = 8,
    hidden: int = 256,
    layers: int = 2,
    scale_embedding: bool = False,
) -> nn.Module:
    """LEAF Shakespeare LSTM: embedding 8, 2 x LSTM 256, linear on the last step; hidden scales with width."""
    width = check_width(width)
    _, vocab = token_shape("lstm", info)
    check_positive("lstm", "embed_dim", embed_dim)
    check_positive("lstm", "hidden", hidden)
    check_positive("lstm", "layers", layers)
    embed = scaled(embed_dim, width) if scale_embedding else embed_dim
    return CharLSTM(vocab, embed, scaled(hidden, width), layers, info.num_classes)
