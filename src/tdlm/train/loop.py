"""Training loop: AdamW, warm-up + constant/cosine LR, clipping, accumulation, EMA,
periodic validation, JSONL metrics, loss-curve PNG, atomic checkpoints and exact resume.

Exact resume: every source of randomness is a pure function of (seed, step): the batch is
``BatchIterator(..., start_batch=step)``, the noise generator and the dropout RNG are reseeded
from (seed, step) at every step. With the optimizer/EMA state restored, a run stopped at step
k and resumed reproduces the uninterrupted run's losses bit for bit (tests/test_train.py).
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
    are accumulated over the micro-batches and divided by the step's token count."""
    from ..data import BatchIterator, build_data
    from ..data.batches import num_tokens, split_micro, to_device
    from ..data.layouts import write_length_report
    from ..data.tokenizer import Tokenizer
    from ..eval.nelbo import evaluate_nelbo

    if stop_after is not None and stop_after < 1:
        raise TdlmError(f"stop_after must be >= 1, got {stop_after}")
    run_dir = Path(out_dir)
    created = _check_out_dir(run_dir, resume)
    ckpt = None
    try:
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
        device = resolve_device(tc.device)
        if ckpt is not None and ckpt.extra("tokenizer") is not None:
            # the checkpoint's own tokenizer: resuming never retrains or swaps it
            data = build_data(cfg.data, None, tokenizer=Tokenizer.load(str(ckpt.extra("tokenizer"))))
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
    except BaseException:
        if created:     # nothing of this run exists yet: leave no half-made folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise

    torch.manual_seed(tc.seed)
    model = family.build_model().to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, eps=tc.adam_eps,
                            weight_decay=tc.weight_decay, fused=fused or None)
    ema = EMA(model, tc.ema) if tc.ema > 0 else None
    start, history = 0, []
    metrics_path = run_dir / "metrics.jsonl"
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        osd = ckpt.optimizer_state()
        if osd is not None:
            opt.load_state_dict(osd)
        if ema is not None:
            if ckpt.ema_state is None:
                raise TdlmError(f"checkpoint {ckpt.path} has no EMA weights but the run uses "
                                f"ema={tc.ema}")
            ema.shadow = {k: v.float() for k, v in ckpt.ema_state.items()}
        start = int(ckpt.trainer["step"])
        history = list(ckpt.trainer.get("history", []))
        rng = ckpt.rng_state()
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        # records written after the checkpoint (by the interrupted process) are replayed
        _write_metrics(metrics_path, history)
        log(f"resumed from {ckpt.path} at step {start}")
    model_fwd = torch.compile(model) if (tc.compile and device.type == "cuda") else model

    micro = tc.micro_batch or tc.global_batch
    # varlen (ragged) data: length-bucketed batches; micro-batches also capped at
    # cfg.data.micro_tokens tokens (dense batches: rows only)
    bucket = cfg.data.bucket_factor if getattr(data.train, "ragged", False) else 0
    batches = BatchIterator(data.train, tc.global_batch, tc.seed, start_batch=start,
                            bucket_factor=bucket)
    extra = family.state_files()
    extra["tokenizer"] = data.tokenizer.save

    def write_ckpt(step: int) -> Path:
        return save_checkpoint(run_dir, step, cfg, model, opt,
                               ema.shadow if ema is not None else None,
                               {"history": history, "data_position": step}, extra)

    def validate(step: int) -> dict:
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
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    bar = None
    if progress:
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
            model.train()
            batch = next(batches)
            torch.manual_seed(step_seed(tc.seed, step, 1))
            gen = torch.Generator(device=device).manual_seed(step_seed(tc.seed, step, 2))
            lr = lr_at(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            nll_sum, n_tok = 0.0, 0.0
            for mb in split_micro(batch, micro, cfg.data.micro_tokens):
                mb = to_device(mb, device)
                with autocast_ctx(device, tc.precision):
                    terms = family.loss(model_fwd, mb, gen)
                nll = terms.nll.float().sum()
                if not torch.isfinite(nll):
                    raise TdlmError(f"non-finite loss at step {step}; stopped, last good "
                                    f"checkpoint kept in {run_dir / 'checkpoints'}")
                nll.backward()
                nll_sum += nll.item()
                n_tok += terms.n_tokens.sum().item()
            n_tok = max(n_tok, 1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.div_(n_tok)
            loss_val = nll_sum / n_tok
            gnorm = (torch.nn.utils.clip_grad_norm_(params, tc.grad_clip).item()
                     if tc.grad_clip > 0 else float("nan"))
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
                final = write_ckpt(done)
            if stop_after is not None and done >= stop_after:
                break
    finally:
        if bar is not None:
            bar.close()
    plot_history(history, run_dir / "loss_curve.png")
    return TrainResult(run_dir, done, losses, final, last_val)


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
