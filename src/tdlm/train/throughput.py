"""Measured training throughput of a config on this machine (``tdlm info --measure``).

:func:`measure_throughput` builds the config's data (the real corpus batches, so ragged
layouts have their real lengths), its family with shape-only resources (TDLM: a frequency tree
of the config's K and H: the same shapes and cost as the corpus tree, without building it) and
its model with the config's seed, then times :func:`tdlm.train.step.train_step` -- the one
step the trainer runs -- over ``steps`` optimizer steps after ``warmup`` untimed ones:

    tokens/s = (data tokens of the timed batches) / (wall-clock of the timed steps)

with the thread count in effect (``torch.get_num_threads()``), which the result states; each
step's clock covers the ``train_step`` call, not drawing its batch (on CUDA the device is
synchronised before and after it). The same steps' model FLOPs are counted as the trainer
counts them (:class:`tdlm.flops.TrainingFlops`: 3 x the forward FLOPs of the sequences the
backbone forwarded), with the tokens forwarded, so a method that forwards fewer tokens than it
reads (DID) shows both. :func:`compare_throughput` times several configs round-robin (one step
of each in turn, every other round reversed) and states each one's step time, tokens and
FLOPs relative to the first config.
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


class _Timed:
    """One config's model, step context and batches, and what its timed steps measured: the
    wall-clock of each ``train_step`` call (the batch is drawn before the clock starts; on
    CUDA the device is synchronised before and after), its data tokens and its training FLOPs
    (:class:`tdlm.flops.TrainingFlops`, hooked from the first timed step on)."""

    def __init__(self, cfg, device: str, real_family: bool):
        _, _, self.model, self.ctx, self.it = build_step_context(cfg, device,
                                                                 real_family=real_family)
        self.times: list = []
        self.tokens = 0
        self.flops = None
        dev = torch.device(device)
        self.sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    def step(self, i: int, timed: bool):
        from ..data.batches import num_tokens
        from ..flops import TrainingFlops
        from . import step as step_mod
        batch = next(self.it)
        if timed and self.flops is None:
            self.flops = TrainingFlops(self.model)
        self.sync()
        t0 = time.perf_counter()
        step_mod.train_step(self.ctx, batch, i)
        self.sync()
        dt = time.perf_counter() - t0
        if not timed:
            return None
        self.times.append(dt)
        self.tokens += int(num_tokens(batch))
        self.flops.step_done()          # hook bookkeeping only: after the clock stopped
        return dt

    def result(self, steps: int, warmup: int, device: str) -> dict:
        dt, fl = sum(self.times), self.flops
        return {"tokens_per_s": self.tokens / dt, "seconds_per_step": dt / steps,
                "tokens_per_step": self.tokens / steps,
                "forwarded_tokens_per_step": fl.tokens / steps,
                "train_flops_per_step": None if fl.total is None else fl.total / steps,
                "step_s": self.times, "steps": steps, "warmup": warmup,
                "threads": torch.get_num_threads(), "device": device}

    def close(self) -> None:
        if self.flops is not None:
            self.flops.close()


def compare_throughput(cfgs: dict, steps: int = 5, warmup: int = 2, device: str = "cpu",
                       real_family: bool = False, after_step=None) -> dict:
    """:func:`measure_throughput` of several configs ``{name: cfg}`` timed **round-robin**:
    every round runs one training step of each config in turn (every other round in reverse
    order, so no config always runs first), after ``warmup`` untimed rounds, so load from
    other jobs on a shared machine hits all of them alike. Per name, the keys of
    :func:`measure_throughput` plus ``step_s`` (each timed step) and the ratios to the first
    config (:func:`_ratios`). ``real_family``: prepare each family as a fresh training run
    does (:func:`build_step_context`); ``after_step(name, i, seconds)`` is called after every
    step ``i`` (counting warm-up rounds), with ``seconds=None`` for warm-up steps."""
    from ..errors import ConfigError
    if steps < 1 or warmup < 0:
        raise ConfigError(f"measure needs steps >= 1 and warmup >= 0, got {steps}, {warmup}")
    if not cfgs:
        raise ConfigError("measure needs at least one config")
    runs = {}
    try:
        for name, cfg in cfgs.items():
            runs[name] = _Timed(cfg, device, real_family)
        for i in range(warmup + steps):
            order = list(runs.items())
            for name, r in (order[::-1] if i % 2 else order):
                dt = r.step(i, timed=i >= warmup)
                if after_step is not None:
                    after_step(name, i, dt)
    finally:
        for r in runs.values():
            r.close()
    return _ratios({name: r.result(steps, warmup, device) for name, r in runs.items()})


def _ratios(out: dict) -> dict:
    """Adds to every row, against the first config ``0``, over the timed rounds ``r``::

        step_ratio = sum_r step_s[name][r] / sum_r step_s[0][r]     (mean step time / mean)
        step_ratio_median = median_r (step_s[name][r] / step_s[0][r])  (range: step_ratio_range)
        flops_ratio = train_flops_per_step[name] / train_flops_per_step[0]
        tokens_ratio = forwarded_tokens_per_step[name] / forwarded_tokens_per_step[0]

    ``step_ratio`` is the ratio of the time both take over the same rounds, as the tokens and
    FLOPs ratios are of means per step; the median of the per-round ratios flatters a config
    whose step times are right-skewed (batches of varying length). 1.0 for the first config;
    None where the first has no FLOPs or tokens counted."""
    first = out[next(iter(out))]
    for row in out.values():
        ratios = sorted(a / b for a, b in zip(row["step_s"], first["step_s"]))
        row["step_ratio"] = sum(row["step_s"]) / sum(first["step_s"])
        row["step_ratio_median"] = statistics.median(ratios)
        row["step_ratio_range"] = [ratios[0], ratios[-1]]
        t0 = first["forwarded_tokens_per_step"]
        row["tokens_ratio"] = row["forwarded_tokens_per_step"] / t0 if t0 else None
        f0, f = first["train_flops_per_step"], row["train_flops_per_step"]
        row["flops_ratio"] = None if not f0 or f is None else f / f0
    return out
