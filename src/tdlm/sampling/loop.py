"""The reverse step shared by the absorbing-type samplers (MDLM, TDLM).

From t to s, each position still in the noised state moves with probability
``p_move = (alpha_s - alpha_t) / (1 - alpha_t)`` and its destination class is drawn from
``logp`` by float64 Gumbel-max. Random draws: one float64 uniform per position (the move
decision), then Gumbel noise for the moving rows only, so the cost is proportional to the
positions that move and the stream of draws is the same for any family with the same classes.
"""
from __future__ import annotations

import torch

from .gumbel import gumbel_argmax


def reverse_step(noised: torch.Tensor, logp: torch.Tensor, p_move: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(move [B, L] bool, choice [n_move] class indices)``."""
    u = torch.rand(noised.shape, generator=generator, device=noised.device, dtype=torch.float64)
    move = noised & (u < p_move)
    if not move.any():
        return move, torch.empty(0, dtype=torch.long, device=noised.device)
    return move, gumbel_argmax(logp[move], generator)
