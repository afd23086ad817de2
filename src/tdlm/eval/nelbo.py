"""Likelihood evaluation: NELBO per token, perplexity bound exp(NELBO), bits per token.

The family's ``loss(..., exact=True)`` gives a Monte-Carlo estimate of the per-sequence NELBO
with exact weights (no clipping), antithetic t and a generator seeded by ``seed``, so the
result is reproducible. Named parts (e.g. per tree level) are reported per token as well.
For the AR family the same harness gives the exact NLL.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import ConfigError
from ..families.base import Family, autocast_ctx, model_device


@torch.no_grad()
def evaluate_nelbo(family: Family, model: torch.nn.Module, dataset, batch_size: int = 16,
                   max_batches: int = 0, seed: int = 0, device: Optional[torch.device] = None,
                   precision: str = "fp32", repeats: int = 1) -> dict:
    """Average the NELBO over ``max_batches`` validation batches (0: the whole split),
    ``repeats`` independent noise draws each."""
    from ..data import BatchIterator
    from ..data.batches import num_rows, slice_rows, to_device
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    if max_batches < 0:
        raise ConfigError(f"max_batches must be >= 0 (0: the whole split), got {max_batches}")
    device = device or model_device(model)
    was_training = model.training
    model.eval()
    n_batches = math.ceil(len(dataset) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    it = BatchIterator(dataset, batch_size, seed, start_batch=0, shuffle=False)
    gen = torch.Generator(device=device).manual_seed(seed + 12345)
    nll, toks, seqs, parts = 0.0, 0.0, 0, {}
    try:
        for bi in range(n_batches):
            keep = min(batch_size, len(dataset) - bi * batch_size)   # no wrap-around into epoch 2
            batch = to_device(slice_rows(next(it), 0, keep), device)
            for _ in range(repeats):
                with autocast_ctx(device, precision):
                    terms = family.loss(model, batch, gen, exact=True)
                nll += terms.nll.double().sum().item()
                toks += terms.n_tokens.double().sum().item()
                for k, v in terms.parts.items():
                    parts[k] = parts.get(k, 0.0) + v.double().sum().item()
            seqs += num_rows(batch)
    finally:
        model.train(was_training)
    per_tok = nll / max(toks, 1)
    out = {"nelbo_per_token": per_tok, "ppl_bound": math.exp(min(per_tok, 700)),
           "bits_per_token": per_tok / math.log(2), "tokens": int(toks / repeats),
           "sequences": seqs, "repeats": repeats, "seed": seed,
           "bound": "exact NLL" if not family.is_diffusion else "NELBO (upper bound on NLL)"}
    if parts:
        out["parts_per_token"] = {k: v / max(toks, 1) for k, v in parts.items()}
    return out
