"""Output heads on the DiT's hidden states (``tdlm.nn.dit``).

:class:`FinalLayer` is MDLM's ``DDitFinalLayer``: an adaLN-modulated final norm followed by
a zero-initialised ``Linear(d, out_dim)``. The papers count the output linear as "the head"
(MDLM: 22.8% of mdlm-small), so :meth:`FinalLayer.param_groups` puts the linear in ``head``
and the final norm and its adaLN modulation in ``other`` (``tdlm.nn.accounting``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .accounting import SeqStats
from .layers import LayerNorm, modulate
from .layout import Layout


def final_layer_flops(d: int, cond_dim: int, out: int, s: SeqStats) -> dict:
    """Forward FLOPs of a :class:`FinalLayer` computing ``out`` outputs: the output linear per
    token and the final adaLN per sequence (``tdlm.flops``)."""
    return {"head": 2 * (d * out + out) * s.tokens
            + 2 * (2 * d * cond_dim + 2 * d) * s.conditioning}


class FinalLayer(nn.Module):
    """adaLN final norm + zero-initialised ``Linear(d, out_dim)`` (MDLM's ``DDitFinalLayer``).

    ``features(x, c, layout)`` are the modulated, normalised hidden states (the input of the
    output linear); ``layout`` is the batch's :class:`~tdlm.nn.layout.Layout` (``None``: dense
    [B, L, d]; a packed layout, e.g. ``Packing``, for [T, d])."""

    def __init__(self, d: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(d)
        self.linear = nn.Linear(d, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * d)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def features(self, x: torch.Tensor, c: torch.Tensor,
                 layout: Optional[Layout] = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c)
        mod = layout.broadcast(mod) if layout is not None else mod[:, None, :]
        shift, scale = mod.chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                layout: Optional[Layout] = None) -> torch.Tensor:
        return self.linear(self.features(x, c, layout))

    # ---- accounting (tdlm.nn.accounting) -------------------------------------------------
    def param_groups(self) -> dict:
        return {"head": list(self.linear.parameters()),
                "other": [*self.norm_final.parameters(), *self.adaLN_modulation.parameters()]}

    def flops(self, s: SeqStats, head_out: Optional[int] = None) -> dict:
        return final_layer_flops(self.linear.in_features, self.adaLN_modulation.in_features,
                                 head_out or self.linear.out_features, s)
