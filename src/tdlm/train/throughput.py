"""Measured training throughput of a config on this machine (``tdlm info --measure``).

:func:`measure_throughput` builds the config's data (the real corpus batches, so ragged
layouts have their real lengths), its family with shape-only resources (TDLM: a frequency tree
of the config's K and H: the same shapes and cost as the corpus tree, without building it) and
its model with the config's seed, then times :func:`tdlm.train.step.train_step` -- the one
step the trainer runs -- over ``steps`` optimizer steps after ``warmup`` untimed ones:

    tokens/s = (data tokens of the timed batches) / (wall-clock of the timed steps)

with the thread count in effect (``torch.get_num_threads()``), which the result states. The
same steps' model FLOPs are counted as the trainer counts them (:class:`tdlm.flops.
TrainingFlops`: 3 x the forward FLOPs of the sequences the backbone forwarded), with the tokens
forwarded, so a method that forwards fewer tokens than it reads (DID) shows both.
"""
from __future__ import annotations

import time

import torch


def build_step_context(cfg, device: str = "cpu", data=None, real_family: bool = False):
    """``(data, family, model, ctx, batches)`` for ``cfg`` on ``device``: the config's data
    (built unless given), the family (shape-only resources unless ``real_family``, which
    prepares what a fresh training run prepares, e.g. TDLM's corpus tree), the model built
    under ``train.seed``, a :class:`StepContext` and the training batch iterator (length-
    bucketed for ragged data, as the trainer's)."""
    from ..data import BatchIterator, build_data
    from .step import family_for, single_process
    data = data if data is not None else build_data(cfg.data)
    fam = family_for(cfg, data) if real_family else family_for(cfg)
    torch.manual_seed(cfg.train.seed)
    dev = torch.device(device)
    model = fam.build_model().to(dev)
    ctx = single_process(fam, model, cfg, dev)
    bucket = cfg.data.bucket_factor if getattr(data.train, "ragged", False) else 0
    it = BatchIterator(data.train, cfg.train.global_batch, cfg.train.seed, bucket_factor=bucket)
    return data, fam, model, ctx, it


def measure_throughput(cfg, steps: int = 5, warmup: int = 2, device: str = "cpu") -> dict:
    """Training tokens/s of ``cfg`` (module docstring): ``{"tokens_per_s",
    "seconds_per_step", "tokens_per_step", "forwarded_tokens_per_step", "train_flops_per_step",
    "steps", "warmup", "threads", "device"}`` (the FLOPs None for a model without a DiT)."""
    from ..data.batches import num_tokens
    from ..errors import ConfigError
    from ..flops import TrainingFlops
    from .step import train_step
    if steps < 1 or warmup < 0:
        raise ConfigError(f"measure needs steps >= 1 and warmup >= 0, got {steps}, {warmup}")
    _, _, model, ctx, it = build_step_context(cfg, device)
    for i in range(warmup):
        train_step(ctx, next(it), i)
    flops = TrainingFlops(model)
    tokens = 0
    t0 = time.perf_counter()
    for i in range(steps):
        batch = next(it)
        tokens += int(num_tokens(batch))
        train_step(ctx, batch, warmup + i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    flops.step_done()                   # hook bookkeeping only: after the clock stopped
    flops.close()
    return {"tokens_per_s": tokens / dt, "seconds_per_step": dt / steps,
            "tokens_per_step": tokens / steps,
            "forwarded_tokens_per_step": flops.tokens / steps,
            "train_flops_per_step": None if flops.total is None else flops.total / steps,
            "steps": steps, "warmup": warmup,
            "threads": torch.get_num_threads(), "device": device}
