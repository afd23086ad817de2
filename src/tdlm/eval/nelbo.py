"""Likelihood evaluation: NELBO per token, perplexity bound exp(NELBO), bits per token.

The family's ``nelbo`` gives a Monte-Carlo estimate of the per-sequence NELBO
with exact weights (no clipping), antithetic t and, for validation batch ``b``, a generator
seeded by (``seed``, b), so the result is reproducible and does not depend on how the batches
are spread over processes. Named parts (e.g. per tree level) are reported per token as well, and
``stderr_per_token`` is the standard error of the estimate across the evaluated batches.
For the AR family the same harness gives the exact NLL.

In a multi-process run (``dist`` with ``world_size > 1``) rank r evaluates the batches
b = r, r + W, ...; the summed NELBO, token, sequence and part counts are added across ranks
(all-reduce), so every rank returns the single-process result (up to float summation order).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError
from ..families.base import Family, autocast_ctx, model_device
from ..store.checkpoint import run_dir_of
from ..utils.io import atomic_write_json


def _batch_seed(seed: int, b: int) -> int:
    """Generator seed of validation batch ``b`` (batch 0: ``seed + 12345`` as always)."""
    return seed + 12345 if b == 0 else (seed + 12345 + b * 0x9E3779B97F4A7C15) % (2**63 - 1)


@torch.no_grad()
def evaluate_nelbo(family: Family, model: torch.nn.Module, dataset, batch_size: int = 16,
                   max_batches: int = 0, seed: int = 0, device: Optional[torch.device] = None,
                   precision: str = "fp32", repeats: int = 1, dist=None) -> dict:
    """Average the NELBO over ``max_batches`` validation batches (0: the whole split),
    ``repeats`` independent noise draws each. ``dist``: a ``tdlm.train.parallel.Runtime``
    to share the batches among ranks (see the module docstring)."""
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
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    mine = list(range(rank, n_batches, world))
    # every rank runs the same number of forwards (FSDP gathers parameters in each one): a
    # rank with fewer batches repeats its first (or batch 0) and discards the result
    rounds = -(-n_batches // world)
    nll, toks, seqs, parts = 0.0, 0.0, 0, {}
    mom = [0.0, 0.0, 0.0, 0.0]       # per batch b: sum nll_b^2, nll_b tok_b, tok_b^2; count
    b_nlls, b_toks = [0.0] * n_batches, [0.0] * n_batches     # per batch (for paired errors)
    try:
        for r in range(rounds):
            real = r < len(mine)
            bi = mine[r] if real else (mine[0] if mine else 0)
            keep = min(batch_size, len(dataset) - bi * batch_size)   # no wrap-around into epoch 2
            batch = to_device(slice_rows(it.batch(bi), 0, keep), device)
            gen = torch.Generator(device=device).manual_seed(_batch_seed(seed, bi))
            b_nll, b_tok = 0.0, 0.0
            for _ in range(repeats):
                with autocast_ctx(device, precision):
                    terms = family.nelbo(model, batch, gen)
                for k in terms.parts:
                    parts.setdefault(k, 0.0)     # the same keys on every rank
                if not real:
                    continue
                t_nll = terms.nll.double().sum().item()
                t_tok = terms.n_tokens.double().sum().item()
                nll, toks = nll + t_nll, toks + t_tok
                b_nll, b_tok = b_nll + t_nll, b_tok + t_tok
                for k, v in terms.parts.items():
                    parts[k] += v.double().sum().item()
            if real:
                b_nlls[bi], b_toks[bi] = b_nll, b_tok
                seqs += num_rows(batch)
                mom = [mom[0] + b_nll ** 2, mom[1] + b_nll * b_tok, mom[2] + b_tok ** 2,
                       mom[3] + 1]
    finally:
        model.train(was_training)
    if world > 1:
        keys = sorted(parts)
        tot = dist.all_reduce_sum([nll, toks, seqs] + mom + [parts[k] for k in keys]
                                  + b_nlls + b_toks)
        nll, toks, seqs = tot[0], tot[1], int(round(tot[2]))
        mom = tot[3:7]
        parts = dict(zip(keys, tot[7:7 + len(keys)]))
        b_nlls = tot[7 + len(keys):7 + len(keys) + n_batches]
        b_toks = tot[7 + len(keys) + n_batches:]
    per_tok = nll / max(toks, 1)
    out = {"nelbo_per_token": per_tok, "ppl_bound": math.exp(min(per_tok, 700)),
           "bits_per_token": per_tok / math.log(2), "tokens": int(toks / repeats),
           "sequences": seqs, "repeats": repeats, "seed": seed,
           "batches": int(round(mom[3])), "stderr_per_token": _ratio_stderr(per_tok, toks, mom),
           "per_batch": {"nll": b_nlls, "tokens": b_toks},
           "bound": "exact NLL" if not family.is_diffusion else "NELBO (upper bound on NLL)"}
    out.update(family.eval_conventions())   # t window, padding: stated beside the number
    if parts:
        out["parts_per_token"] = {k: v / max(toks, 1) for k, v in parts.items()}
    return out


def _ratio_stderr(r: float, toks: float, mom: list) -> Optional[float]:
    """Standard error of the ratio estimate r = sum nll_b / sum tok_b over the n evaluated
    batches (delta method): sqrt(n / (n - 1) * sum_b (nll_b - r tok_b)^2) / sum_b tok_b, from
    the all-reducible sums of nll_b^2, nll_b tok_b, tok_b^2. None with fewer than 2 batches."""
    s_nn, s_nt, s_tt, n = mom
    if n < 2 or toks <= 0:
        return None
    resid = max(s_nn - 2 * r * s_nt + r * r * s_tt, 0.0)
    return math.sqrt(n / (n - 1) * resid) / toks


def evaluate_to_files(ckpt_path: str, batches: int = 0, seed: int = 0, repeats: int = 1,
                      out: str | None = None, use_ema: bool = True) -> tuple[dict, Path]:
    """Evaluate a checkpoint on its validation split (``batches`` batches, 0: all; ``repeats``
    noise draws per batch) and write ``metrics.json`` (default ``<run>/eval``). Returns
    (metrics, folder)."""
    from ..data import build_data
    from ..pipeline import load
    from ..train.parallel import derive_micro      # the training micro-batch of one process
    if batches < 0:
        raise ConfigError(f"--batches must be >= 0 (0: the whole validation split), got {batches}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    pipe = load(ckpt_path, use_ema=use_ema)
    cfg = pipe.cfg
    data = build_data(cfg.data, None, tokenizer=pipe.tokenizer, need_train=False)
    micro, _ = derive_micro(cfg.train.global_batch, cfg.train.micro_batch, 1)
    res = evaluate_nelbo(pipe.family, pipe.model, data.val, batch_size=micro,
                         max_batches=batches, seed=seed, repeats=repeats)
    res.update({"checkpoint": str(pipe.checkpoint.path), "family": cfg.family.name,
                "step": pipe.checkpoint.trainer.get("step"), "weights": pipe.weights,
                "data_layout": cfg.data.layout, "seq_len": cfg.data.seq_len,
                "data_source": cfg.data.source, "tokenizer": cfg.data.tokenizer,
                "schedule": getattr(cfg.family, "schedule", None),
                "num_timesteps": getattr(cfg.family, "num_timesteps", None)})
    out_dir = Path(out) if out else run_dir_of(pipe.checkpoint.path) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", res)
    return res, out_dir


def paired_difference(a: dict, b: dict) -> dict:
    """NELBO/token difference ``a - b`` of two evaluations of the same batches and tokens
    (``per_batch`` of :func:`evaluate_nelbo`: the same split, batch size, repeats) with its
    standard error across batches (delta method on e_b = nll_b^a - nll_b^b):
    ``D = sum_b e_b / sum_b tok_b``, ``se = sqrt(n / (n - 1) * sum_b (e_b - D tok_b)^2) /
    sum_b tok_b``. Much smaller than either evaluation's own error when the batches' difficulty
    is shared. Raises ``ConfigError`` when the evaluations did not see the same tokens."""
    pa, pb = a.get("per_batch"), b.get("per_batch")
    if not pa or not pb:
        raise ConfigError("paired difference needs evaluations with per-batch values")
    if len(pa["tokens"]) != len(pb["tokens"]) or any(
            abs(x - y) > 1e-6 * max(1.0, x) for x, y in zip(pa["tokens"], pb["tokens"])):
        raise ConfigError("the two evaluations did not see the same batches and tokens")
    e = [x - y for x, y in zip(pa["nll"], pb["nll"])]
    tok = sum(pa["tokens"])
    d = sum(e) / tok
    n = len(e)
    se = (math.sqrt(n / (n - 1) * sum((eb - d * tb) ** 2 for eb, tb in zip(e, pa["tokens"])))
          / tok) if n > 1 else None
    return {"diff_per_token": d, "stderr": se, "batches": n}
