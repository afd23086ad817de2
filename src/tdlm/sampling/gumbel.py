"""Shared categorical sampling: float64 Gumbel-max, temperature and nucleus (top-p).

Gumbel noise is drawn in float64 by default: float32 noise truncates the tail of
``-log(-log U)`` and lowers sample entropy, which fakes a low generative perplexity
(the documented MDLM pitfall).
"""
from __future__ import annotations

import torch


def adjust_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Return log-probabilities of ``softmax(logits / temperature)`` restricted to the smallest
    set of classes whose mass reaches ``top_p`` (renormalised). ``-inf`` entries stay excluded."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    logp = torch.log_softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_lp, idx = torch.sort(logp, dim=-1, descending=True)
        cum = sorted_lp.exp().cumsum(-1)
        # keep a class if the mass strictly before it is < top_p (the top class is always kept)
        drop_sorted = (cum - sorted_lp.exp()) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def gumbel_argmax(logp: torch.Tensor, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sample ``argmax(logp + G)``, G ~ Gumbel(0, 1) drawn in ``dtype`` (float64 default),
    i.e. one draw from Categorical(softmax(logp)) per row."""
    u = torch.rand(logp.shape, generator=generator, device=logp.device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    e = (-torch.log(u.clamp_min(tiny))).clamp_min(tiny)     # Exp(1) variates
    g = -torch.log(e)
    return (logp.to(dtype) + g).argmax(dim=-1)
