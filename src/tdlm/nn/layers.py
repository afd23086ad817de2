"""Small building blocks shared by the backbone (``tdlm.nn.dit``) and the heads
(``tdlm.nn.heads``): MDLM's bias-free float32 LayerNorm and the adaLN modulation."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias (MDLM), computed in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weight inside layer_norm: one fused pass instead of normalise-then-scale
        return F.layer_norm(x.float(), (self.dim,), self.weight.float()).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift``; ``shift, scale`` are per-sequence values already
    broadcast to the tokens by the batch's ``Layout`` ([B, 1, d] dense, [T, d] packed).
    One fused multiply-add over the tokens (``addcmul``) instead of a multiply and an add."""
    return torch.addcmul(shift, x, 1 + scale)
