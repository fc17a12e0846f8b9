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


class LayeredCharLSTM(nn.Module):
    """The same network with one single-layer ``nn.LSTM`` per layer (``layers.0``, ``layers.1``, ...).

    The function is that of :class:`CharLSTM` (a stacked ``nn.LSTM`` without dropout feeds each layer the
    output sequence of the one below), but every layer is its own module, so the depth machinery
    (:mod:`hetfl.hetero.depth`) sees one block per layer and can cut the network after any of them.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, layers: int, num_classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.layers = nn.ModuleList(nn.LSTM(embed_dim if i == 0 else hidden, hidden, batch_first=True)
                                    for i in range(layers))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.embed(x)
        for layer in self.layers:
            out = layer(out)[0]  # (batch, seq_len, hidden)
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
    per_layer: bool = False,
) -> nn.Module:
    """LEAF Shakespeare LSTM: embedding 8, 2 x LSTM 256, linear on the last step; hidden scales with width.

    ``per_layer=True`` builds every layer as its own module (same function, other state-dict keys), the
    form the depth-scaled algorithms (DepthFL, ScaleFL, InclusiveFL) need to cut it after any layer.
    """
    width = check_width(width)
    _, vocab = token_shape("lstm", info)
    check_positive("lstm", "embed_dim", embed_dim)
    check_positive("lstm", "hidden", hidden)
    check_positive("lstm", "layers", layers)
    embed = scaled(embed_dim, width) if scale_embedding else embed_dim
    net = LayeredCharLSTM if per_layer else CharLSTM
    return net(vocab, embed, scaled(hidden, width), layers, info.num_classes)
