"""Training loop: AdamW, warm-up + constant/cosine LR, clipping, accumulation, EMA,
periodic validation, JSONL metrics, loss-curve PNG, atomic checkpoints and exact resume.

Exact resume: every source of randomness is a pure function of (seed, step): the batch is
``BatchIterator(..., start_batch=step)``, the noise generator and the dropout RNG are reseeded
from (seed, step, micro-batch index) before every micro-batch (:func:`micro_seed`). With the
optimizer/EMA state restored, a run stopped at step k (or killed with SIGKILL) and resumed
reproduces the uninterrupted run's losses bit for bit (tests/test_train.py, tests/test_fault.py).
Because the noise does not depend on which process draws it, a multi-process (torchrun) run
equals the single-process run with the same ``micro_batch`` (tests/test_distributed.py).

GPU paths (:func:`resolve_runtime`): bf16 autocast, per-block ``torch.compile``, fused AdamW
and flash-first SDPA on CUDA only; all off on the CPU (tests/test_gpu_paths.py).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import RunConfig
from ..errors import TdlmError
from ..families import get_family_class
from ..families.base import autocast_ctx
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TdlmError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct 63-bit seed per (run seed, step, stream)."""
    return (seed * 1_000_003 + step * 7919 + stream * 104_729 + 0x9E3779B9) % (2**63 - 1)


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


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list
    final_checkpoint: Optional[Path]
    val: Optional[dict]


def _check_out_dir(run_dir: Path, resume: bool) -> bool:
    """Refuse to overwrite a run; make sure the folder is writable. Returns True when this
    call created the folder (so a failure before training can remove it again)."""
    if resume:
        if not (run_dir / "checkpoints" / "latest").is_file():
            raise TdlmError(f"--resume: no checkpoint in {run_dir}")
        return False
    if run_dir.exists() and not run_dir.is_dir():
        raise TdlmError(f"output folder {run_dir} is a file")
    if any((run_dir / n).exists() for n in ("checkpoints", "metrics.jsonl", "config.json")):
        raise TdlmError(f"output folder {run_dir} already holds a run; pass --resume to continue "
                        "it or choose another --out")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise TdlmError(f"output folder {run_dir} is not writable: {e.strerror or e}") from None
    return created


def _write_metrics(path: Path, history: list) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          stop_after: Optional[int] = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``cfg`` into ``out_dir``. ``stop_after`` stops (after checkpointing) at that
    step, simulating an interruption; ``resume`` continues from the latest checkpoint (the
    run's saved config is used and ``cfg`` is ignored).

    The training loss of a step is ``sum of the micro-batches' NELBOs / sum of their
    n_tokens`` (the family's own token count, as in evaluation): gradients of the summed NELBO
    are accumulated over the micro-batches and divided by the step's token count.

    Launched by ``torchrun`` (``WORLD_SIZE > 1`` in the environment) this joins the process
    group and trains data-parallel (``train.parallel``: ddp or fsdp); see
    ``tdlm.train.distributed`` for what is guaranteed (equal to the single-process run with
    the same ``micro_batch``; rank 0 writes everything).

    Non-finite values stop the run with a one-line TdlmError (``tdlm train`` exits 2): a
    non-finite loss or gradient norm before the optimizer step, non-finite parameters before
    a checkpoint. No checkpoint of a non-finite state is written; the last good one stays
    ``latest``."""
    from . import distributed as D

    if stop_after is not None and stop_after < 1:
        raise TdlmError(f"stop_after must be >= 1, got {stop_after}")
    dev_name = cfg.train.device
    if resume:
        try:      # the run's own device setting, before the checkpoint is verified
            dev_name = json.loads((Path(out_dir) / "config.json").read_text())["train"]["device"]
        except (OSError, ValueError, KeyError, TypeError):
            dev_name = "auto"
    info, dist_device = D.init_from_env(dev_name)
    try:
        return _train(cfg, Path(out_dir), resume, progress, stop_after, log, info, dist_device)
    finally:
        D.teardown(info)


def micro_seed(seed: int, step: int, stream: int, j: int) -> int:
    """Seed of micro-batch ``j`` (its index in the step's global batch) for one RNG stream:
    ``step_seed(seed, step, stream)`` for j = 0 (so runs without accumulation draw exactly as
    before), distinct values for j > 0. Noise therefore depends on (seed, step, j) only, not on
    which process handles the micro-batch."""
    base = step_seed(seed, step, stream)
    if j == 0:
        return base
    return (base + j * 0x632BE59BD9B4E019) % (2**63 - 1)


@dataclass(frozen=True)
class RuntimeOptions:
    """The device-dependent training options :func:`resolve_runtime` picks."""
    device_type: str
    autocast_bf16: bool      # bf16 autocast around the forward (CUDA and precision=bf16)
    compile: bool            # torch.compile each transformer block (CUDA and train.compile)
    fused_adamw: bool        # AdamW(fused=True) (CUDA)
    flash_sdpa: bool         # SDPA backends in the order flash, mem-efficient, cuDNN, math (CUDA)
    backend: str             # torch.distributed backend: nccl (CUDA) or gloo


def resolve_runtime(tc, device: torch.device) -> RuntimeOptions:
    """GPU code paths are used on CUDA only; on the CPU all are off (bf16 matmuls and
    torch.compile are slow or fragile there, fused AdamW and flash attention are CUDA kernels).
    ``autocast_bf16`` agrees with ``tdlm.families.base.autocast_ctx`` (tests/test_gpu_paths.py)."""
    cuda = torch.device(device).type == "cuda"
    return RuntimeOptions(device_type=torch.device(device).type,
                          autocast_bf16=cuda and tc.precision == "bf16",
                          compile=cuda and bool(tc.compile), fused_adamw=cuda, flash_sdpa=cuda,
                          backend="nccl" if cuda else "gloo")


def sdpa_context(opts: RuntimeOptions):
    """Attention-kernel preference for the forward: flash first on CUDA (used when the inputs
    qualify, e.g. bf16 under autocast; otherwise the next backend), nothing elsewhere."""
    import contextlib
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


def _nonfinite(what: str, step: int, last: Optional[Path]) -> TdlmError:
    kept = f"last good checkpoint kept: {last}" if last is not None else \
        "no checkpoint had been written yet"
    return TdlmError(f"non-finite {what} at step {step}; training stopped without saving this "
                     f"state ({kept}); lower train.lr or check the data")


def _train(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool,
           stop_after: Optional[int], log: Callable[[str], None], info, dist_device) -> TrainResult:
    from . import distributed as D
    from ..data import BatchIterator, build_data
    from ..data.batches import num_tokens, split_micro, to_device
    from ..data.layouts import write_length_report
    from ..data.tokenizer import Tokenizer
    from ..eval.nelbo import evaluate_nelbo

    main = info.is_main
    W = info.world_size
    ckpt = None
    setup_error: Optional[BaseException] = None
    if main:
        created = False
        try:
            created = _check_out_dir(run_dir, resume)
            if resume:
                ckpt = load_checkpoint(run_dir)
                cfg = ckpt.config      # the run's own resolved config
            else:
                # work on a copy: the vocabulary size is resolved below and must not leak into
                # the caller's object
                preset = cfg.preset
                cfg = RunConfig.from_dict(cfg.to_dict())
                cfg.preset = preset
            tc = cfg.train
            D.derive_micro(tc.global_batch, tc.micro_batch, W)      # checked before any output
            if ckpt is not None and ckpt.extra("tokenizer") is not None:
                # the checkpoint's own tokenizer: resuming never retrains or swaps it
                data = build_data(cfg.data, None,
                                  tokenizer=Tokenizer.load(str(ckpt.extra("tokenizer"))))
            else:
                # a fresh run never reuses a tokenizer left in the folder by an earlier attempt
                data = build_data(cfg.data, None)
            data.tokenizer.save(str(run_dir))
            if cfg.model.vocab_size != data.tokenizer.vocab_size:
                if ckpt is not None:
                    raise TdlmError(f"checkpoint {ckpt.path} was trained with vocab_size "
                                    f"{cfg.model.vocab_size}, but its tokenizer has "
                                    f"{data.tokenizer.vocab_size} tokens")
                cfg.model.vocab_size = data.tokenizer.vocab_size   # resolved from the tokenizer
            fam_cls = get_family_class(cfg.model.family)
            resources = (fam_cls.resources_from_checkpoint(ckpt) if ckpt is not None
                         else fam_cls.prepare(cfg, data, run_dir))
            family = fam_cls(cfg, **resources)
            atomic_write_text(run_dir / "config.json", cfg.to_json())
            atomic_write_text(run_dir / "data.json", json.dumps(data.provenance, indent=2))
            write_length_report(data, str(run_dir))     # varlen: length_histogram.json/.png
        except BaseException as e:
            if created:     # nothing of this run exists yet: leave no half-made folder behind
                shutil.rmtree(run_dir, ignore_errors=True)
            if not info.distributed:
                raise
            setup_error = e
        if info.distributed and not D.agree(setup_error is None, info):
            raise setup_error
    else:
        # the other ranks wait for rank 0's checks and outputs, then read what it wrote
        if not D.agree(True, info):
            raise TdlmError(f"rank 0 could not set up the run in {run_dir} (see its error); "
                            f"rank {info.rank} stopped")
        if resume:
            ckpt = load_checkpoint(run_dir)
            cfg = ckpt.config
        else:
            cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        tok = Tokenizer.load(str(ckpt.extra("tokenizer"))) if (
            ckpt is not None and ckpt.extra("tokenizer") is not None) else Tokenizer.load(str(run_dir))
        data = build_data(cfg.data, None, tokenizer=tok)
        fam_cls = get_family_class(cfg.model.family)
        resources = (fam_cls.resources_from_checkpoint(ckpt) if ckpt is not None
                     else fam_cls.prepare(cfg, data, None))
        family = fam_cls(cfg, **resources)
    tc = cfg.train
    device = dist_device if info.distributed else resolve_device(tc.device)
    opts = resolve_runtime(tc, device)
    micro, _accum = D.derive_micro(tc.global_batch, tc.micro_batch, W)

    fsdp = info.distributed and tc.parallel == "fsdp"
    torch.manual_seed(tc.seed)
    model = family.build_model()
    if not fsdp:
        model = model.to(device)
    # FSDP: the full model lives in host memory only until fully_shard moves each rank's
    # shards to its device (so a model larger than one device can be trained)
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
    if opts.compile:
        # block by block: works for every family (TDLM calls model.features, not forward)
        for unit in D.fsdp_units(model):
            unit.compile()
    loss_mod = D.LossModule(family, model)
    wrapped = D.wrap_model(loss_mod, tc.parallel, info, device)
    opt = make_optimizer(model.parameters(), tc, opts)
    ema = EMA(model, tc.ema) if tc.ema > 0 else None
    start, history = 0, []
    metrics_path = run_dir / "metrics.jsonl"
    if ckpt is not None:
        osd = ckpt.optimizer_state()
        if osd is not None:
            if info.distributed:
                D.load_optimizer_state(model, opt, osd)
            else:
                opt.load_state_dict(osd)
        if ema is not None:
            if ckpt.ema_state is None:
                raise TdlmError(f"checkpoint {ckpt.path} has no EMA weights but the run uses "
                                f"ema={tc.ema}")
            ema.shadow = {k: (D.shard_like(v.float(), ema.shadow[k]) if info.distributed
                              else v.float()) for k, v in ckpt.ema_state.items()}
        start = int(ckpt.trainer["step"])
        history = list(ckpt.trainer.get("history", []))
        rng = ckpt.rng_state()
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        if main:
            # records written after the checkpoint (by the interrupted process) are replayed
            _write_metrics(metrics_path, history)
            log(f"resumed from {ckpt.path} at step {start}")

    # varlen (ragged) data: length-bucketed batches; micro-batches also capped at
    # cfg.data.micro_tokens tokens (dense batches: rows only)
    bucket = cfg.data.bucket_factor if getattr(data.train, "ragged", False) else 0
    batches = BatchIterator(data.train, tc.global_batch, tc.seed, start_batch=start,
                            bucket_factor=bucket)
    extra = family.state_files()
    extra["tokenizer"] = data.tokenizer.save

    def write_ckpt(step: int) -> Optional[Path]:
        """Rank 0 writes the full state in the single-process format (FSDP: gathered from
        the shards by all ranks); every rank learns whether it worked."""
        if fsdp:
            save_model = D.StateView(D.full_state_dict(model.state_dict(), keep=main))
            save_opt = D.OptimizerView(D.full_optimizer_state(model, opt, keep=main))
            save_ema = D.full_state_dict(ema.shadow, keep=main) if ema is not None else None
        else:
            save_model, save_opt = model, opt
            save_ema = ema.shadow if ema is not None else None
        path, err = None, None
        if main:
            try:
                path = save_checkpoint(run_dir, step, cfg, save_model, save_opt, save_ema,
                                       {"history": history, "data_position": step}, extra)
            except BaseException as e:
                if not info.distributed:
                    raise
                err = e
        if info.distributed and not D.agree(err is None, info, device):
            if err is not None:
                raise err
            raise TdlmError(f"rank 0 could not write the checkpoint of step {step} (see its "
                            f"error); rank {info.rank} stopped")
        return path if main else run_dir / "checkpoints" / f"step_{step:07d}"

    def params_finite() -> bool:
        ok = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                 for p in model.parameters())
        return D.agree(ok, info, device)

    def validate(step: int) -> dict:
        if info.distributed:
            backup = D.swap_in(model, ema.shadow) if ema is not None else None
            try:
                fam_eval = _EvalFamily(family, wrapped if fsdp else None)
                res = evaluate_nelbo(fam_eval, wrapped if fsdp else model, data.val,
                                     batch_size=micro, max_batches=tc.eval_batches,
                                     seed=tc.seed, device=device, precision=tc.precision,
                                     dist=info)
            finally:
                if fsdp:
                    D.reshard(wrapped)
                if backup is not None:
                    D.swap_out(model, backup)
        else:
            eval_model = model
            if ema is not None:
                eval_model = family.build_model().to(device)
                ema.copy_to(eval_model)
            res = evaluate_nelbo(family, eval_model, data.val, batch_size=micro,
                                 max_batches=tc.eval_batches, seed=tc.seed, device=device,
                                 precision=tc.precision)
        rec = {"step": step, "split": "val", **{k: res[k] for k in
               ("nelbo_per_token", "ppl_bound", "bits_per_token", "tokens")}}
        history.append(rec)
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=tc.max_steps, initial=start, desc="train", dynamic_ncols=True)
    losses: list = []
    last_val = next((r for r in reversed(history) if r.get("split") == "val"), None)
    final = ckpt.path if ckpt is not None else None
    t_last, tok_count = time.perf_counter(), 0
    done = start
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for step in range(start, tc.max_steps):
            wrapped.train()
            batch = next(batches)
            lr = lr_at(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            if info.distributed:
                entries = D.rank_micro_batches(batch, micro, cfg.data.micro_tokens, info.rank, W)
            else:
                entries = [(j, mb, 1.0) for j, mb in
                           enumerate(split_micro(batch, micro, cfg.data.micro_tokens))]
            nll_sum, n_tok, bad = 0.0, 0.0, 0
            for i, (j, mb, weight) in enumerate(entries):
                # noise and dropout: a pure function of (seed, step, micro-batch index)
                torch.manual_seed(micro_seed(tc.seed, step, 1, j))
                gen = torch.Generator(device=device).manual_seed(micro_seed(tc.seed, step, 2, j))
                mb = to_device(mb, device)
                with D.set_grad_sync(wrapped, tc.parallel, i == len(entries) - 1):
                    with autocast_ctx(device, tc.precision), sdpa_context(opts):
                        terms = wrapped(mb, gen)
                    nll = terms.nll.float().sum()
                    # backward even when non-finite: the other ranks are in the same
                    # collective; the step is refused below on every rank
                    (nll if weight == 1.0 else nll * weight).backward()
                if weight:
                    v = nll.item()
                    bad += int(not math.isfinite(v))
                    nll_sum += v
                    n_tok += terms.n_tokens.sum().item()
            if info.distributed:
                nll_sum, n_tok, bad = D.all_reduce_sum([nll_sum, n_tok, bad], info, device)
            if bad or not math.isfinite(nll_sum):
                raise _nonfinite("loss", step + 1, final)
            n_tok = max(n_tok, 1.0)
            # DDP/FSDP average the ranks' gradient sums; undo the 1/W with the token count
            denom = n_tok / W if info.distributed else n_tok
            for p in params:
                if p.grad is not None:
                    p.grad.div_(denom)
            loss_val = nll_sum / n_tok
            if tc.grad_clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                if hasattr(gn, "full_tensor"):
                    gn = gn.full_tensor()
                gnorm = gn.item()
                if not math.isfinite(gnorm):
                    raise _nonfinite("gradient norm", step + 1, final)
            else:
                gnorm = float("nan")
            opt.step()
            if ema is not None:
                ema.update(model)
            losses.append(loss_val)
            tok_count += num_tokens(batch)
            done = step + 1
            if done % tc.log_every == 0 or done == tc.max_steps:
                dt = time.perf_counter() - t_last
                rec = {"step": done, "split": "train", "loss": loss_val, "lr": lr,
                       "grad_norm": gnorm, "tokens_per_s": tok_count / max(dt, 1e-9)}
                history.append(rec)
                if main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                t_last, tok_count = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if done % tc.eval_every == 0 or done == tc.max_steps:
                last_val = validate(done)
                if bar is not None:
                    bar.write(f"step {done}: val NELBO/token {last_val['nelbo_per_token']:.4f} "
                              f"(ppl <= {last_val['ppl_bound']:.2f})")
            if done % tc.ckpt_every == 0 or done == tc.max_steps or done == stop_after:
                if not params_finite():
                    raise _nonfinite("parameters", done, final)
                final = write_ckpt(done)
            if stop_after is not None and done >= stop_after:
                break
    finally:
        if bar is not None:
            bar.close()
    if main:
        plot_history(history, run_dir / "loss_curve.png")
    return TrainResult(run_dir, done, losses, final, last_val)


class _EvalFamily:
    """The family as ``evaluate_nelbo`` sees it in a distributed run: with FSDP the loss is
    computed through the sharded root module's ``forward`` (which gathers the parameters)."""

    def __init__(self, family, root=None):
        self._family, self._root = family, root

    def loss(self, model, batch, generator, exact: bool = False):
        if self._root is None:
            return self._family.loss(model, batch, generator, exact=exact)
        return self._root(batch, generator, exact=exact)

    def __getattr__(self, name):
        return getattr(self._family, name)


def plot_history(history: list, path: Path) -> None:
    """Training loss and validation NELBO per token against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [(r["step"], r["loss"]) for r in history if r.get("split") == "train"]
    va = [(r["step"], r["nelbo_per_token"]) for r in history if r.get("split") == "val"]
    if not tr and not va:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss (NELBO/token)", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val NELBO/token")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
