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
:func:`compare_throughput` times several configs round-robin (one step of each in turn) and
states each one's step time, tokens and FLOPs relative to the first config.
"""
from __future__ import annotations

import statistics
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
    return compare_throughput({"run": cfg}, steps, warmup, device)["run"]


def compare_throughput(cfgs: dict, steps: int = 5, warmup: int = 2, device: str = "cpu",
                       real_family: bool = False, after_step=None) -> dict:
    """:func:`measure_throughput` of several configs ``{name: cfg}`` timed **round-robin**:
    every round runs one training step of each config in turn (after ``warmup`` untimed
    rounds), so load from other jobs on a shared machine hits all of them alike. Per name, the
    keys of :func:`measure_throughput` plus ``step_s`` (each timed step) and, against the first
    config ``0``, per round ``r``::

        step_ratio = median_r (step_s[name][r] / step_s[0][r])       (range: step_ratio_range)
        flops_ratio = train_flops_per_step[name] / train_flops_per_step[0]
        tokens_ratio = forwarded_tokens_per_step[name] / forwarded_tokens_per_step[0]

    (1.0 for the first config; the FLOPs ratio None without a DiT). ``real_family``: prepare
    each family as a fresh training run does (:func:`build_step_context`); ``after_step(name,
    round, seconds)`` is called after every step, warm-up ones with ``seconds=None``."""
    from ..data.batches import num_tokens
    from ..errors import ConfigError
    from ..flops import TrainingFlops
    from .step import train_step
    if steps < 1 or warmup < 0:
        raise ConfigError(f"measure needs steps >= 1 and warmup >= 0, got {steps}, {warmup}")
    if not cfgs:
        raise ConfigError("measure needs at least one config")
    runs = {}
    for name, cfg in cfgs.items():
        _, _, model, ctx, it = build_step_context(cfg, device, real_family=real_family)
        runs[name] = {"ctx": ctx, "it": it, "model": model, "times": [], "tokens": 0}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:                 # count FLOPs of the timed steps only
            for r in runs.values():
                r["flops"] = TrainingFlops(r["model"])
        for name, r in runs.items():
            batch = next(r["it"])
            sync()
            t0 = time.perf_counter()
            train_step(r["ctx"], batch, i)
            sync()
            dt = time.perf_counter() - t0
            if i >= warmup:
                r["times"].append(dt)
                r["tokens"] += int(num_tokens(batch))
                r["flops"].step_done()  # hook bookkeeping only: after the clock stopped
            if after_step is not None:
                after_step(name, i, dt if i >= warmup else None)
    out = {}
    for name, r in runs.items():
        r["flops"].close()
        dt = sum(r["times"])
        fl = r["flops"]
        out[name] = {"tokens_per_s": r["tokens"] / dt, "seconds_per_step": dt / steps,
                     "tokens_per_step": r["tokens"] / steps,
                     "forwarded_tokens_per_step": fl.tokens / steps,
                     "train_flops_per_step": None if fl.total is None else fl.total / steps,
                     "step_s": r["times"], "steps": steps, "warmup": warmup,
                     "threads": torch.get_num_threads(), "device": device}
    first = out[next(iter(out))]
    for row in out.values():
        ratios = sorted(a / b for a, b in zip(row["step_s"], first["step_s"]))
        row["step_ratio"] = statistics.median(ratios)
        row["step_ratio_range"] = [ratios[0], ratios[-1]]
        t0 = first["forwarded_tokens_per_step"]
        row["tokens_ratio"] = row["forwarded_tokens_per_step"] / t0 if t0 else None
        f0, f = first["train_flops_per_step"], row["train_flops_per_step"]
        row["flops_ratio"] = None if not f0 or f is None else f / f0
    return out
