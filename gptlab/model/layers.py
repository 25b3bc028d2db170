"""The pieces around attention: norms, the position-wise feed-forward network, positions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def make_norm(kind: str, d: int, eps: float, bias: bool = True) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(d, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(d, eps=eps)
    raise ValueError(f"unknown norm '{kind}' (expected layernorm or rmsnorm)")


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """FFN(x) = down(act(up(x))); SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if activation not in _ACTIVATIONS and activation != "swiglu":
            raise ValueError(f"unknown activation '{activation}' "
                             f"(expected one of {sorted(_ACTIVATIONS) + ['swiglu']})")
        self.activation = activation
        self.gate = nn.Linear(d_model, d_ff, bias=bias) if activation == "swiglu" else None
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = _ACTIVATIONS[self.activation](self.up(x))
        return self.dropout(self.down(h))


def sinusoidal_table(n_positions: int, d: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...). Shape (n_positions, d)."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n_positions, d)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : d // 2]
    return table


def positions_from_mask(attention_mask: Tensor, T: int) -> Tensor:
    """Position ids (B, T) of the last T tokens: real tokens count from 0 under left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
