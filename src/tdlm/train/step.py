"""One optimizer step, the same for the trainer and for every benchmark (torchtitan's split).

:func:`train_step` takes the step's global batch and does, in order:

1. learning rate ``lr_at(step)`` (linear warm-up, then constant or cosine), ``zero_grad``;
2. micro-batching: this process's micro-batches of the global batch (``train.micro_batch``
   rows, ``data.micro_tokens`` tokens at most; under torchrun a contiguous block per rank,
   ``Runtime.micro_batches``), each seeded by (seed, step, micro-batch index)
   (:func:`micro_seed`: noise and dropout do not depend on which process runs it);
3. per micro-batch: forward of the family loss under the device's autocast/SDPA choice, and
   backward of the **summed** NELBO (gradient sync only on the last micro-batch);
4. token normalisation: the step's loss is ``sum of NELBOs / sum of the family's n_tokens``
   over the whole global batch (all-reduced), and the gradients are divided by the same count;
   the loss's named parts (e.g. TDLM's per-level terms) are reported per token the same way;
5. the non-finite guard (loss, gradient norm: a one-line :class:`TdlmError`, nothing applied),
   clipping to ``train.grad_clip``, AdamW, EMA.

:func:`single_process` builds what a benchmark needs to call it on one device (the model
prepared by ``parallel.parallelize`` exactly as the trainer prepares it); :func:`family_for`
builds the config's family with its resources (prepared or shape-only).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import TdlmError
from ..families.base import autocast_ctx
from .parallel import LossModule, Runtime, derive_micro, grad_sync, parallelize


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct 63-bit seed per (run seed, step, stream)."""
    return (seed * 1_000_003 + step * 7919 + stream * 104_729 + 0x9E3779B9) % (2**63 - 1)


def micro_seed(seed: int, step: int, stream: int, j: int) -> int:
    """Seed of micro-batch ``j`` (its index in the step's global batch) for one RNG stream:
    ``step_seed(seed, step, stream)`` for j = 0 (so runs without accumulation draw exactly as
    before), distinct values for j > 0. Noise therefore depends on (seed, step, j) only, not on
    which process handles the micro-batch."""
    base = step_seed(seed, step, stream)
    if j == 0:
        return base
    return (base + j * 0x632BE59BD9B4E019) % (2**63 - 1)


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``; then constant, or cosine decay to
    ``min_lr_ratio * lr`` at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    prog = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


class EMA:
    """Exponential moving average of parameters: ``e <- d e + (1 - d) p`` after each step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.float(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


@dataclass(frozen=True)
class RuntimeOptions:
    """The device-dependent training options :func:`resolve_runtime` picks."""
    device_type: str
    autocast_bf16: bool      # bf16 autocast around the forward (CUDA and precision=bf16)
    compile: bool            # torch.compile each transformer block (CUDA and train.compile)
    fused_adamw: bool        # AdamW(fused=True): one kernel over all parameters (CUDA, CPU)
    flash_sdpa: bool         # SDPA backends in the order flash, mem-efficient, cuDNN, math (CUDA)
    backend: str             # torch.distributed backend: nccl (CUDA) or gloo
    retain_heap: bool = False  # CPU: keep freed memory in the heap (train.cpu_allocator=retain)


_NOTICED: set = set()


def cpu_compiler() -> Optional[str]:
    """The C++ compiler inductor's CPU backend would use (``$CXX``, else c++/g++/clang++ on
    PATH), or None."""
    import os
    import shutil
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile_on(tc, kind: str) -> bool:
    """``train.compile`` on this device kind: CUDA always; the CPU when a C++ compiler is
    there (inductor's CPU backend needs one), else a one-line notice (once) and eager."""
    if not tc.compile:
        return False
    if kind == "cuda":
        return True
    if kind == "cpu" and cpu_compiler() is not None:
        return True
    if kind not in _NOTICED:
        _NOTICED.add(kind)
        import sys
        why = "no C++ compiler found for inductor's CPU backend (set CXX or install g++)" \
            if kind == "cpu" else f"not supported on {kind}"
        print(f"notice: train.compile: {why}; the blocks run eagerly", file=sys.stderr)
    return False


def resolve_runtime(tc, device: torch.device) -> RuntimeOptions:
    """GPU code paths are used on CUDA only; on the CPU they are off (bf16 matmuls are slow
    there, flash attention is a CUDA kernel), except fused AdamW, which PyTorch has for both
    (one vectorised pass over all parameters instead of the per-tensor loop; same update up
    to float rounding), and ``train.compile``, which compiles the blocks on the CPU too when
    a C++ compiler is present (:func:`_compile_on`; tests/train/test_lean_step.py).
    ``autocast_bf16`` agrees with ``tdlm.families.base.autocast_ctx`` (tests/train/test_gpu_paths.py)."""
    kind = torch.device(device).type
    cuda = kind == "cuda"
    return RuntimeOptions(device_type=kind,
                          autocast_bf16=cuda and tc.precision == "bf16",
                          compile=_compile_on(tc, kind), fused_adamw=kind in ("cuda", "cpu"),
                          flash_sdpa=cuda, backend="nccl" if cuda else "gloo",
                          retain_heap=kind == "cpu" and getattr(tc, "cpu_allocator", "retain") == "retain")


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4        # glibc <malloc.h>


def retain_heap(opts: RuntimeOptions) -> bool:
    """``train.cpu_allocator=retain`` on the CPU: tell glibc's malloc to serve every block from
    the heap (``M_MMAP_MAX=0``) and never give freed memory back (``M_TRIM_THRESHOLD`` = 2^31 - 1, a C int).
    By default glibc maps each block above a (dynamic, at most 32 MiB) threshold with ``mmap``
    and unmaps it when freed, so every training step page-faults its activations, gradients and
    the dense embedding gradient in afresh (zero-filling a 50k x 768 gradient took 100 ms vs
    17 ms on reused pages, on this project's CPU); the retained heap turns that into reuse, as
    tcmalloc/jemalloc (PyTorch's CPU tuning guide) would. One extra heap growth can precede the
    steady state: PyTorch allocates with ``posix_memalign``, for which glibc requests slightly
    more than the block, so an exact-size hole left behind a small allocation is skipped once
    (tests/train/test_lean_step.py counts the faults per round). Process-wide and sticky; a no-op
    (returns False) off the CPU, with ``system``, or without glibc."""
    if not opts.retain_heap or _retained[0]:
        return _retained[0]
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _retained[0] = bool(ok)
    return _retained[0]


_retained = [False]


def sdpa_context(opts: RuntimeOptions):
    """Attention-kernel preference for the forward: flash first on CUDA (used when the inputs
    qualify, e.g. bf16 under autocast; otherwise the next backend), nothing elsewhere."""
    if not opts.flash_sdpa:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:        # older torch: no priorities, all four allowed
        return sdpa_kernel(order)


def make_optimizer(params, tc, opts: RuntimeOptions) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, eps=tc.adam_eps,
                             weight_decay=tc.weight_decay, fused=True if opts.fused_adamw else None)


def nonfinite_error(what: str, step: int, last: Optional[Path]) -> TdlmError:
    kept = f"last good checkpoint kept: {last}" if last is not None else \
        "no checkpoint had been written yet"
    return TdlmError(f"non-finite {what} at step {step}; training stopped without saving this "
                     f"state ({kept}); lower train.lr or check the data")


@dataclass
class StepContext:
    """Everything a step needs besides the batch. ``wrapped(batch, generator) -> LossTerms``
    is the family loss around the model (``parallel.LossModule`` after ``parallelize``);
    ``model`` the model inside it (its parameters, the EMA); ``runtime`` the process's
    place in the job (its device, its share of the batch, the all-reduce)."""
    wrapped: torch.nn.Module
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    tc: object                          # TrainConfig
    micro: int                          # per-device micro-batch rows
    micro_tokens: int                   # data.micro_tokens (0: rows only)
    runtime: Runtime
    opts: RuntimeOptions
    ema: Optional[EMA] = None
    # the forward's precision context, () -> context manager; None: autocast_ctx(device,
    # train.precision). The memory simulator (train/memory.py) passes CUDA's policy here.
    forward_context: Optional[Callable] = None

    def __post_init__(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return self.runtime.device


@dataclass
class StepResult:
    loss: float          # NELBO per counted token over the global batch (all ranks)
    tokens: float        # counted tokens of the global batch
    grad_norm: float     # before clipping (nan when clipping is off)
    lr: float
    parts: dict = field(default_factory=dict)   # the loss's named parts, per counted token


def _forward_backward(ctx: StepContext, batch, step: int) -> tuple[float, float, int, dict]:
    """Summed NELBO, counted tokens, non-finite count and summed named parts over this
    process's micro-batches, gradients of the summed NELBO accumulated."""
    from ..data.batches import to_device
    tc = ctx.tc
    entries = ctx.runtime.micro_batches(batch, ctx.micro, ctx.micro_tokens)
    nll_sum, n_tok, bad, parts = 0.0, 0.0, 0, {}
    for i, (j, mb, weight) in enumerate(entries):
        # noise and dropout: a pure function of (seed, step, micro-batch index)
        torch.manual_seed(micro_seed(tc.seed, step, 1, j))
        gen = torch.Generator(device=ctx.device).manual_seed(micro_seed(tc.seed, step, 2, j))
        mb = to_device(mb, ctx.device)
        with grad_sync(ctx.wrapped, i == len(entries) - 1):
            amp = (ctx.forward_context() if ctx.forward_context is not None
                   else autocast_ctx(ctx.device, tc.precision))
            with amp, sdpa_context(ctx.opts):
                terms = ctx.wrapped(mb, gen)
            nll = terms.nll.float().sum()
            # backward even when non-finite: the other ranks are in the same collective;
            # the step is refused on every rank
            (nll if weight == 1.0 else nll * weight).backward()
        if weight:
            v = nll.item()
            bad += int(not math.isfinite(v))
            nll_sum += v
            n_tok += terms.n_tokens.sum().item()
            for k, v in terms.parts.items():
                parts[k] = parts.get(k, 0.0) + v.detach().double().sum()
    return nll_sum, n_tok, bad, {k: float(v) for k, v in parts.items()}


def train_step(ctx: StepContext, batch, step: int,
               last_checkpoint: Optional[Path] = None) -> StepResult:
    """One optimizer step on the global ``batch`` at 0-based ``step`` (module docstring).
    Raises a one-line :class:`TdlmError` on a non-finite loss or gradient norm (naming
    ``last_checkpoint``), before anything is applied."""
    tc, rt = ctx.tc, ctx.runtime
    lr = lr_at(step, tc)
    for g in ctx.opt.param_groups:
        g["lr"] = lr
    ctx.opt.zero_grad(set_to_none=True)
    nll_sum, n_tok, bad, parts = _forward_backward(ctx, batch, step)
    keys = sorted(parts)            # the family's part names: the same on every rank
    nll_sum, n_tok, bad, *part_sums = rt.all_reduce_sum([nll_sum, n_tok, bad]
                                                        + [parts[k] for k in keys])
    if bad or not math.isfinite(nll_sum):
        raise nonfinite_error("loss", step + 1, last_checkpoint)
    n_tok = max(n_tok, 1.0)
    # DDP/FSDP average the ranks' gradient sums; undo the 1/W with the token count
    denom = n_tok / rt.world_size if rt.distributed else n_tok
    for p in ctx.params:
        if p.grad is not None:
            p.grad.div_(denom)
    gnorm = float("nan")
    if tc.grad_clip > 0:
        gn = torch.nn.utils.clip_grad_norm_(ctx.params, tc.grad_clip)
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        gnorm = gn.item()
        if not math.isfinite(gnorm):
            raise nonfinite_error("gradient norm", step + 1, last_checkpoint)
    ctx.opt.step()
    if ctx.ema is not None:
        ctx.ema.update(ctx.model)
    return StepResult(loss=nll_sum / n_tok, tokens=n_tok, grad_norm=gnorm, lr=lr,
                      parts={k: v / n_tok for k, v in zip(keys, part_sums)})


def single_process(family, model: torch.nn.Module, cfg, device: torch.device,
                   micro: Optional[int] = None, opts: Optional[RuntimeOptions] = None,
                   forward_context: Optional[Callable] = None) -> StepContext:
    """A :class:`StepContext` for one process on ``device`` (benchmarks, notebooks): the
    config's optimizer, micro-batch (``micro``, default the config's per-device micro-batch
    for one process), precision and EMA. The model (already on ``device``) is prepared in
    place as the trainer prepares it: ``parallelize`` with the config's activation
    checkpointing and (CUDA) compile. ``opts`` (default ``resolve_runtime(train, device)``)
    and ``forward_context`` (:class:`StepContext`) let the memory simulator ask for another
    device's choices."""
    tc = cfg.train
    opts = opts or resolve_runtime(tc, device)
    retain_heap(opts)
    runtime = Runtime.single(device)
    wrapped = parallelize(LossModule(family, model),
                          activation_checkpointing=tc.activation_checkpointing,
                          compile=opts.compile, parallel=tc.parallel, runtime=runtime)
    return StepContext(wrapped=wrapped, model=model,
                       opt=make_optimizer(model.parameters(), tc, opts), tc=tc,
                       micro=micro or derive_micro(tc.global_batch, tc.micro_batch, 1)[0],
                       micro_tokens=cfg.data.micro_tokens, runtime=runtime, opts=opts,
                       ema=EMA(model, tc.ema) if tc.ema > 0 else None,
                       forward_context=forward_context)


def family_for(cfg, data=None, run_dir=None):
    """The config's family with its resources, asked of the family class for every family
    (benchmarks, notebooks): with ``data``, what the trainer prepares for a fresh run
    (``Family.prepare(cfg, data, run_dir)``, e.g. TDLM's corpus tree); without, shape-only
    resources (``Family.shape_resources(cfg)``: the right shapes, no corpus; TDLM: a
    frequency-sorted tree of the config's K, H), enough to time or measure steps on random
    tokens."""
    from ..families.base import get_family_class
    cls = get_family_class(cfg.family.name)
    res = cls.prepare(cfg, data, run_dir) if data is not None else cls.shape_resources(cfg)
    return cls(cfg, **res)
