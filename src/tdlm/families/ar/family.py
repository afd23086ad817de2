"""Autoregressive baseline on the same backbone (causal attention, no time input).

Exact NLL: -log p(x) = sum_{i>=1} -log p_theta(x_i | x_<i); as in MDLM's AR baseline the first
token of a block is conditioned on nothing and not scored, so ``n_tokens = L - 1`` per block.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import RunConfig
from ...nn.dit import DiT, FinalLayer
from ...sampling.gumbel import adjust_logits, gumbel_argmax
from .config import ARSampleOptions
from ..base import (Family, LossTerms, Regime, model_device, packed_layout, per_sequence,
                    register)


class CausalLM(nn.Module):
    def __init__(self, cfg: RunConfig):
        super().__init__()
        m = cfg.backbone
        self.vocab_size = m.vocab_size
        self.backbone = DiT(m, m.vocab_size, causal=True)
        self.head = FinalLayer(m.d_model, m.cond_dim, m.vocab_size)

    def forward(self, x: torch.Tensor, sigma: Optional[torch.Tensor] = None,
                layout=None) -> torch.Tensor:
        h, c = self.backbone(x, None, layout=layout)
        return self.head(h, c, layout)


@register("ar")
class Autoregressive(Family):
    SampleOptions = ARSampleOptions
    is_diffusion = False
    causal = True

    def build_model(self) -> nn.Module:
        return CausalLM(self.cfg)

    def objective(self, model, batch, generator, regime: Regime) -> LossTerms:
        """Next-token cross-entropy on real tokens (the same in training and evaluation)."""
        if "cu_seqlens" in batch:
            return self._packed_objective(model, batch)
        x = batch["input_ids"]
        valid = batch.get("valid", torch.ones_like(x, dtype=torch.bool))
        logits = model(x[:, :-1]).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                             reduction="none").view(x.shape[0], -1)
        tgt_valid = valid[:, 1:]
        nll = torch.where(tgt_valid, ce, torch.zeros_like(ce)).sum(-1)
        return LossTerms(nll=nll, n_tokens=tgt_valid.sum(-1).float())

    def _packed_objective(self, model, batch) -> LossTerms:
        """Ragged batch (``varlen``): causal attention within each packed sequence; token p
        predicts p+1 unless p ends its sequence."""
        x = batch["input_ids"]
        lay = packed_layout(batch, causal=True)
        valid = batch.get("valid", torch.ones_like(x, dtype=torch.bool))
        logits = model(x, layout=lay).float()
        ce = F.cross_entropy(logits[:-1], x[1:], reduction="none")
        has_next = torch.ones_like(x, dtype=torch.bool)
        has_next[lay.cu_seqlens[1:] - 1] = False
        scored = torch.zeros_like(x, dtype=torch.bool)
        scored[:-1] = has_next[:-1] & valid[1:]
        ce = torch.cat([ce, ce.new_zeros(1)])
        nll = per_sequence(torch.where(scored, ce, torch.zeros_like(ce)), lay)
        return LossTerms(nll=nll, n_tokens=per_sequence(scored.float(), lay))

    @torch.no_grad()
    def run_sampler(self, model, num, seq_len, steps, generator, temperature=1.0, top_p=1.0,
               prefix: Optional[torch.Tensor] = None, bos_id: Optional[int] = None):
        """Ancestral left-to-right sampling (``steps`` is ignored: one token per forward)."""
        device = model_device(model)
        if prefix is None:
            start = bos_id if bos_id is not None else self.cfg.backbone.vocab_size - 1
            x = torch.full((num, 1), start, dtype=torch.long, device=device)
        else:
            x = prefix.to(device)
        while x.shape[1] < seq_len:
            logits = model(x)[:, -1].double()
            nxt = gumbel_argmax(adjust_logits(logits, temperature, top_p), generator)
            x = torch.cat([x, nxt[:, None]], dim=1)
        return x
