"""Peak memory of one training step, accounted without the device (``tdlm fit``).

:func:`estimate_memory` runs the library's own step (``family_for`` -> ``build_model`` ->
``single_process`` -> :func:`tdlm.train.step.train_step`: the family's loss, backward, the
token normalisation, clipping, AdamW and the EMA) on fake tensors and counts the bytes of every
tensor alive at each moment (:mod:`tdlm.train.fake_step`). What is reported is the step's peak
of allocated bytes (CUDA: what ``torch.cuda.max_memory_allocated`` reports, blocks rounded to
512 bytes) and, at that moment, how much were

* **parameters** (and buffers), fp32;
* **gradients** (fp32, of the parameters that have one at that moment);
* **optimizer** state: AdamW's two moments and step counters, the EMA's shadow weights;
* **activations**: tensors allocated during the forward pass and still alive (saved for
  backward, autocast's bf16 weight copies, the loss);
* **temporaries**: the rest (gradients flowing through the graph, activations recomputed by
  checkpointing, the loss head's working tensors, kernel workspaces, optimizer scratch).

The step simulated is the steady state: AdamW's state exists (it is created by a first
``opt.step()``), gradients are freed by ``zero_grad`` at the start. Regimes (:class:`Target`):
CUDA with bf16 autocast, CUDA fp32, CPU fp32. On CUDA the autocast cast lists, the attention
kernel (flash / memory-efficient: O and the log-sum-exp are saved, not the L x L matrix),
fused dropout and fused AdamW are CUDA's (:class:`tdlm.train.fake_step.CudaPolicy` says how);
``torch.compile`` is not simulated (eager kernels). Batches are dense [B, L] with every
position counted; a data-dependent selection (TDLM's head on the moved positions, the chunked
MDLM head on the masked ones) is counted at its worst case, every position.

Not counted: the CUDA context and library workspaces (cuBLAS, cuDNN; outside PyTorch's
allocator), and the caching allocator's fragmentation (reserved minus allocated) -- which is
what the ``margin`` of :func:`largest_micro_batch` is for. On the CPU, memory.calibration
(benchmarks/memory_calibration.py) compares the estimate with the measured resident set.
"""
from __future__ import annotations

import contextlib
import copy
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ..errors import ConfigError, TdlmError
from .fake_step import CUDA_BLOCK, CudaPolicy, LiveBytes, forward_phase
from .step import RuntimeOptions, family_for, resolve_runtime, single_process, train_step

GIB = 1024 ** 3
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
DEVICES = ("cuda", "cpu")
DEFAULT_MARGIN = 0.10
CARDS = {"24": 24 * GIB, "40": 40 * GIB, "80": 80 * GIB}


@dataclass(frozen=True)
class Target:
    """Where the step would run: ``device`` cuda | cpu, ``precision`` bf16 (autocast, CUDA
    only) | fp32; ``seq_len`` and ``activation_checkpointing`` override the config's
    (None: the config's)."""
    device: str = "cuda"
    precision: Optional[str] = None
    seq_len: Optional[int] = None
    activation_checkpointing: Optional[bool] = None


@dataclass
class MemoryEstimate:
    peak_bytes: int
    breakdown: dict                    # CATEGORIES -> bytes at the peak
    static_bytes: int                  # alive before the step: parameters, buffers, optimizer
    n_params: int
    micro_batch: int
    seq_len: int
    device: str
    precision: str
    activation_checkpointing: bool
    family: str
    preset: str
    kernels: dict = field(default_factory=dict)       # attention / dropout kernels accounted
    corrections: dict = field(default_factory=dict)   # CUDA autocast corrections applied
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def target_config(cfg, target: Target):
    """A copy of ``cfg`` for ``target``: sequence length (the model's context raised to it),
    precision, activation checkpointing. One-line errors for an unknown device or precision."""
    if target.device not in DEVICES:
        raise ConfigError(f"memory estimate: device {target.device!r} is not one of "
                          f"{', '.join(DEVICES)}")
    out = copy.deepcopy(cfg)
    prec = target.precision or cfg.train.precision
    if prec not in ("bf16", "fp32"):
        raise ConfigError(f"memory estimate: precision {prec!r} is not one of bf16, fp32")
    if target.device == "cpu" and prec == "bf16":
        if target.precision is not None:
            raise ConfigError("memory estimate: bf16 autocast is CUDA only; the trainer runs "
                              "fp32 on the CPU (use precision fp32)")
        prec = "fp32"          # what the trainer does with precision=bf16 on the CPU
    out.train.precision = prec
    if target.seq_len is not None:
        if target.seq_len < 1:
            raise ConfigError(f"memory estimate: sequence length must be >= 1, got {target.seq_len}")
        out.data.seq_len = target.seq_len
        out.backbone.max_seq_len = max(out.backbone.max_seq_len, target.seq_len)
    if target.activation_checkpointing is not None:
        out.train.activation_checkpointing = bool(target.activation_checkpointing)
    return out


def runtime_options(cfg, device: str) -> RuntimeOptions:
    """The trainer's device-dependent choices for ``device`` (compile is never simulated)."""
    if device == "cuda":
        return RuntimeOptions(device_type="cuda", autocast_bf16=cfg.train.precision == "bf16",
                              compile=False, fused_adamw=True, flash_sdpa=True, backend="nccl")
    return resolve_runtime(cfg.train, torch.device("cpu"))


def _categorizer(ctx, param_keys: set, tracker: LiveBytes):
    """tag bytes -> CATEGORIES at this moment: parameters, the live gradients and optimizer
    state are moved out of their allocation tags; forward storages left are activations."""
    def state_tensors():
        for st in ctx.opt.state.values():
            yield from (v for v in st.values() if isinstance(v, torch.Tensor))
        if ctx.ema is not None:
            yield from ctx.ema.shadow.values()

    def categorize(tags: Counter) -> dict:
        out = dict.fromkeys(CATEGORIES, 0)
        groups = (("parameters", param_keys),
                  ("gradients", {tracker.key_of(p.grad) for p in ctx.params if p.grad is not None}),
                  ("optimizer", {tracker.key_of(t) for t in state_tensors()}))
        seen = set()
        for cat, keys in groups:
            for k in keys - seen:
                entry = tracker.live.get(k)
                if entry is not None:
                    out[cat] += entry[0]
                    tags[entry[1]] -= entry[0]
            seen |= keys
        out["activations"] = tags["forward"]
        out["temporaries"] = tags["static"] + tags["after"]
        return out
    return categorize


def _materialize(model: torch.nn.Module) -> None:
    """Meta parameters and buffers -> storage-less fake CPU tensors (inside FakeTensorMode),
    in place; tied parameters stay tied."""
    memo: dict = {}
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu"),
                                                     requires_grad=p.requires_grad)
                m._parameters[name] = memo[id(p)]
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.empty_like(b, device="cpu")


def _build(cfg, family, tracker: LiveBytes, device: str):
    """Model (meta, then fake CPU storage), the trainer's step context, AdamW state created
    by one step on zero gradients."""
    with torch.device("meta"):
        model = family.build_model()
    _materialize(model)
    model.train()
    dtype = torch.bfloat16 if (device == "cuda" and cfg.train.precision == "bf16") else None
    ctx = single_process(family, model, cfg, torch.device("cpu"), micro=None,
                         opts=runtime_options(cfg, device),
                         forward_context=lambda: forward_phase(tracker, dtype))
    for p in ctx.params:
        p.grad = torch.zeros_like(p)
    ctx.opt.step()
    ctx.opt.zero_grad(set_to_none=True)
    param_keys = {tracker.key_of(t) for t in (*model.parameters(), *model.buffers())}
    return model, ctx, param_keys


def estimate_memory(cfg, micro_batch: int, target: Target = Target(),
                    family=None) -> MemoryEstimate:
    """Peak memory of one optimizer step of ``cfg`` at ``micro_batch`` rows (module
    docstring). ``family``: the config's family with its resources (default
    ``family_for(cfg)``: shape-only resources)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    if not isinstance(micro_batch, int) or micro_batch < 1:
        raise ConfigError(f"memory estimate: micro-batch must be an integer >= 1, got {micro_batch!r}")
    t0 = time.perf_counter()
    cfg = target_config(cfg, target)
    cfg.train.micro_batch = 0
    cfg.train.global_batch = micro_batch
    family = family if family is not None else family_for(cfg)
    tracker = LiveBytes(CUDA_BLOCK if target.device == "cuda" else 1)
    policy = CudaPolicy() if target.device == "cuda" else None
    L = cfg.data.seq_len
    try:
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake, tracker:
            model, ctx, param_keys = _build(cfg, family, tracker, target.device)
            ctx.micro = micro_batch
            static = tracker.current
            batch = {"input_ids": torch.zeros((micro_batch, L), dtype=torch.long)}
            tracker.categorize = _categorizer(ctx, param_keys, tracker)
            tracker.phase = "after"
            tracker.reset_peak()
            with policy.everywhere() if policy is not None else contextlib.nullcontext():
                train_step(ctx, batch, step=1)
            tracker.finish()
    except (TdlmError, MemoryError):
        raise
    except Exception as e:     # an op fake tensors cannot run (data-dependent output size)
        raise TdlmError(f"memory estimate failed for the {cfg.family.name} family (the step "
                        "runs on fake tensors, without data: shapes that depend on token values "
                        f"cannot be followed): {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        FakeTensorMode.cache.clear()       # class-wide op cache: bounded per estimate
    return _result(cfg, target, tracker, policy, model, static, micro_batch, t0)


def _result(cfg, target, tracker, policy, model, static, B, t0) -> MemoryEstimate:
    notes = []
    if target.device == "cuda" and cfg.train.compile:
        notes.append("train.compile is not simulated (eager kernels)")
    if cfg.data.layout == "varlen":
        notes.append("varlen batches simulated as dense B x L (their upper bound)")
    if tracker.worst_cases:
        notes.append(f"{tracker.worst_cases} data-dependent selection(s) counted at their worst "
                     "case (every position selected)")
    if cfg.train.ema > 0:
        notes.append("optimizer state includes the EMA's fp32 copy of the weights (train.ema)")
    bd = {k: int(tracker.at_peak.get(k, 0)) for k in CATEGORIES}
    return MemoryEstimate(
        peak_bytes=int(tracker.peak), breakdown=bd, static_bytes=int(static),
        n_params=sum(p.numel() for p in model.parameters()), micro_batch=B,
        seq_len=cfg.data.seq_len, device=target.device, precision=cfg.train.precision,
        activation_checkpointing=bool(cfg.train.activation_checkpointing),
        family=cfg.family.name, preset=getattr(cfg, "preset", "custom"),
        kernels=dict(policy.kernels) if policy else {"attention": "CPU SDPA (as dispatched)"},
        corrections=dict(policy.corrections) if policy else {}, notes=notes,
        seconds=time.perf_counter() - t0)


@dataclass
class FitResult:
    """The largest micro-batch whose estimated peak is within ``budget_bytes``
    (0 when even one row does not fit), and the estimates made to find it."""
    micro_batch: int
    budget_bytes: int
    estimate: Optional[MemoryEstimate]          # at micro_batch (None when 0)
    tried: dict                                 # micro-batch -> peak bytes

    def to_dict(self) -> dict:
        return {"micro_batch": self.micro_batch, "budget_bytes": self.budget_bytes,
                "peak_bytes": self.estimate.peak_bytes if self.estimate else None,
                "tried": self.tried}


def largest_micro_batch(cfg, budget_bytes: int, target: Target = Target(), family=None,
                        limit: int = 1 << 16, candidates: Optional[list] = None,
                        cache: Optional[dict] = None) -> FitResult:
    """The largest micro-batch B <= ``limit`` (or the largest of ``candidates``, e.g. the
    divisors of a global batch) with ``estimate_memory(B).peak_bytes <= budget_bytes``. The
    peak grows affinely with B: two estimates give the line, a few more confirm the answer
    exactly. ``cache`` (B -> estimate) may be shared between calls with the same config."""
    cache = {} if cache is None else cache
    family = family if family is not None else family_for(target_config(cfg, target))

    def peak(b):
        if b not in cache:
            cache[b] = estimate_memory(cfg, b, target, family)
        return cache[b].peak_bytes

    values = sorted(set(candidates)) if candidates else range(1, limit + 1)
    if peak(values[0]) > budget_bytes:
        return FitResult(0, budget_bytes, None, {b: e.peak_bytes for b, e in cache.items()})
    index = {v: i for i, v in enumerate(values)} if candidates else None
    seed = {(index[b] if index else b - 1): e.peak_bytes for b, e in cache.items()
            if (b in index if index else 1 <= b <= limit)}
    best = values[_secant_search(lambda i: peak(values[i]), budget_bytes, values, len(values),
                                 seed)]
    return FitResult(best, budget_bytes, cache[best],
                     {b: e.peak_bytes for b, e in sorted(cache.items())})


def _secant_search(peak_at, budget: int, values, n: int, seed: Optional[dict] = None) -> int:
    """The largest index i < n with peak_at(i) <= budget, for a peak that grows with
    values[i] (nearly affinely); peak_at(0) <= budget. ``seed``: peaks already known by
    index. Secant guesses from the last two points until the answer is bracketed, then regula
    falsi between the bracket's ends, bisecting whenever a step did not halve the bracket."""
    known = dict(seed or {})
    known[0] = known[0] if 0 in known else peak_at(0)
    lo = max(i for i, p in known.items() if p <= budget)
    above = [i for i, p in known.items() if p > budget and i > lo]
    hi, bisect_next = (min(above) if above else n), False    # peak_at(lo) <= budget < peak_at(hi)
    while hi - lo > 1:
        width = hi - lo
        if hi < n:
            if bisect_next:
                g = (lo + hi) // 2
            else:
                slope = (known[hi] - known[lo]) / (values[hi] - values[lo])
                g = _index_near(values, values[lo] + (budget - known[lo]) / slope, lo, hi)
        elif len(known) == 1:
            g = 1
        else:
            a, b = sorted(i for i in known if i <= lo)[-2:]
            slope = (known[b] - known[a]) / (values[b] - values[a])
            v = values[lo] + (budget - known[lo]) / slope if slope > 0 else 2 * values[lo]
            # before a bracket, at most 8x further: an estimate costs more at a huge B (the
            # chunked head's loop), and a flat start (the optimizer-step peak) misleads the slope
            g = _index_near(values, min(v, 8 * values[lo] + 8), lo, n)
        known[g] = peak_at(g)
        if known[g] <= budget:
            lo = g
        else:
            hi = g
        bisect_next = hi < n and 2 * (hi - lo) > width
    return lo


def _index_near(values, v: float, lo: int, hi: int) -> int:
    """The index in (lo, hi) whose value is the largest not above v (lo + 1 at least)."""
    import bisect
    i = bisect.bisect_right(values, int(v), lo + 1, hi) - 1
    return max(lo + 1, min(i, hi - 1))


def parse_capacity(spec: str) -> tuple[str, int]:
    """``"24"``, ``"40GB"``, ``"80GiB"`` (GiB, as GPU memory is sold), ``"1.5"`` -> (label,
    bytes); ``"device"``: the present CUDA device's total memory."""
    s = str(spec).strip()
    if s == "device":
        if not torch.cuda.is_available():
            raise ConfigError("--memory device: no CUDA device is present")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return f"{props.name} ({props.total_memory / GIB:.1f} GiB)", int(props.total_memory)
    num = s.upper().removesuffix("GIB").removesuffix("GB").strip()
    try:
        gib = float(num)
    except ValueError:
        raise ConfigError(f"memory {spec!r} is not a size in GB (e.g. 24, 40GB) or 'device'") from None
    if gib <= 0:
        raise ConfigError(f"memory {spec!r} must be > 0")
    return f"{gib:g} GiB", int(gib * GIB)


def auto_micro_batch(cfg, family, world_size: int = 1, device=None,
                     margin: float = DEFAULT_MARGIN,
                     cache: Optional[dict] = None) -> tuple[int, FitResult]:
    """``train.micro_batch=auto``: the largest divisor of ``global_batch / world_size`` whose
    estimated peak fits the present CUDA device's memory less ``margin`` (a one-line
    ConfigError on the CPU, or when one row does not fit). Returns (micro-batch, fit).
    The estimate is one device's; under DDP (``world_size`` > 1) the budget is lowered by
    DDP's gradient buckets (4 bytes per parameter); under FSDP the single-device estimate is
    an upper bound (parameters, gradients and AdamW state are sharded). ``cache``: as for
    :func:`largest_micro_batch`."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        raise ConfigError("invalid config value for 'train.micro_batch': 'auto' sizes the "
                          "micro-batch from the CUDA device's memory; on the CPU give a number "
                          "(0: the global batch per device)")
    total = torch.cuda.get_device_properties(dev).total_memory
    per_dev = cfg.train.global_batch // max(world_size, 1)
    divisors = [d for d in range(1, per_dev + 1) if per_dev % d == 0]
    budget = int(total * (1 - margin))
    if world_size > 1 and cfg.train.parallel == "ddp":
        with torch.device("meta"):
            budget -= 4 * sum(p.numel() for p in family.build_model().parameters())
    fit = largest_micro_batch(cfg, budget, Target("cuda"), family, candidates=divisors,
                              cache=cache)
    if fit.micro_batch == 0:
        raise ConfigError(f"invalid config value for 'train.micro_batch': 'auto' found no "
                          f"micro-batch that fits {total / GIB:.1f} GiB (with a "
                          f"{margin:.0%} margin); one row needs "
                          f"{min(fit.tried.values()) / GIB:.1f} GiB")
    return fit.micro_batch, fit


def resolve_auto_micro(cfg, family, runtime, log=print) -> int:
    """The micro-batch ``train.micro_batch = "auto"`` stands for in this job
    (:func:`auto_micro_batch` through ``derive_micro``); logs the choice."""
    from .parallel import derive_micro
    from ..config import AUTO
    largest, fit = auto_micro_batch(cfg, family, runtime.world_size, runtime.device)
    micro, accum = derive_micro(cfg.train.global_batch, AUTO, runtime.world_size, largest=largest)
    log(f"train.micro_batch=auto -> {micro} per device, {accum} accumulation step(s) "
        f"(estimated peak {fit.estimate.peak_bytes / GIB:.1f} GiB of a "
        f"{fit.budget_bytes / GIB:.1f} GiB budget: {DEFAULT_MARGIN:.0%} margin)")
    return micro
