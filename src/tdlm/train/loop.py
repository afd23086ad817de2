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


def _check_out_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        if not (run_dir / "checkpoints" / "latest").is_file():
            raise TdlmError(f"--resume: no checkpoint in {run_dir}")
        return
    if (run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists():
        raise TdlmError(f"output folder {run_dir} already holds a run; pass --resume to continue "
                        "it or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TdlmError(f"output folder {run_dir} is not writable: {e.strerror or e}") from None


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          stop_after: Optional[int] = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``cfg`` into ``out_dir``. ``stop_after`` stops (after checkpointing) at that
    step, simulating an interruption; ``resume`` continues from the latest checkpoint."""
    from ..data import BatchIterator, build_data
    from ..eval.nelbo import evaluate_nelbo

    run_dir = Path(out_dir)
    _check_out_dir(run_dir, resume)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(run_dir)
        cfg = ckpt.config      # the run's own resolved config
    tc = cfg.train
    device = resolve_device(tc.device)
    data = build_data(cfg.data, str(run_dir))
    if cfg.model.vocab_size != data.tokenizer.vocab_size:
        cfg.model.vocab_size = data.tokenizer.vocab_size   # resolved from the tokenizer
    fam_cls = get_family_class(cfg.model.family)
    resources = (fam_cls.resources_from_checkpoint(ckpt) if ckpt is not None
                 else fam_cls.prepare(cfg, data, run_dir))
    family = fam_cls(cfg, **resources)
    atomic_write_text(run_dir / "config.json", cfg.to_json())
    atomic_write_text(run_dir / "data.json", json.dumps(data.provenance, indent=2))

    torch.manual_seed(tc.seed)
    model = family.build_model().to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, eps=tc.adam_eps,
                            weight_decay=tc.weight_decay, fused=fused or None)
    ema = EMA(model, tc.ema) if tc.ema > 0 else None
    start, history = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        osd = ckpt.optimizer_state()
        if osd is not None:
            opt.load_state_dict(osd)
        if ema is not None and ckpt.ema_state is not None:
            ema.shadow = {k: v.float() for k, v in ckpt.ema_state.items()}
        start = int(ckpt.trainer["step"])
        history = ckpt.trainer.get("history", [])
        torch.set_rng_state(ckpt.rng_state()["torch_cpu"])
        log(f"resumed from {ckpt.path} at step {start}")
    model_fwd = torch.compile(model) if (tc.compile and device.type == "cuda") else model

    micro = tc.micro_batch or tc.global_batch
    batches = BatchIterator(data.train, tc.global_batch, tc.seed, start_batch=start)
    metrics_path = run_dir / "metrics.jsonl"
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
    losses, last_val, final = [], None, None
    t_last, tok_count = time.perf_counter(), 0
    step = start
    try:
        for step in range(start, tc.max_steps):
            model.train()
            batch = next(batches)
            torch.manual_seed(step_seed(tc.seed, step, 1))
            gen = torch.Generator(device=device).manual_seed(step_seed(tc.seed, step, 2))
            lr = lr_at(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            n_tok_total = batch["valid"].sum().clamp_min(1).float().to(device)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for i in range(0, tc.global_batch, micro):
                mb = {k: v[i:i + micro].to(device) for k, v in batch.items()}
                with autocast_ctx(device, tc.precision):
                    terms = family.loss(model_fwd, mb, gen)
                loss = terms.nll.sum() / n_tok_total
                if not torch.isfinite(loss):
                    raise TdlmError(f"non-finite loss at step {step}; stopped, last good "
                                    f"checkpoint kept in {run_dir / 'checkpoints'}")
                loss.backward()
                loss_sum += loss.item()
            gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip).item()
                     if tc.grad_clip > 0 else float("nan"))
            opt.step()
            if ema is not None:
                ema.update(model)
            losses.append(loss_sum)
            tok_count += int(n_tok_total.item())
            done = step + 1
            if done % tc.log_every == 0 or done == tc.max_steps:
                dt = time.perf_counter() - t_last
                rec = {"step": done, "split": "train", "loss": loss_sum, "lr": lr,
                       "grad_norm": gnorm, "tokens_per_s": tok_count / max(dt, 1e-9)}
                history.append(rec)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
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
    return TrainResult(run_dir, step + 1, losses, final, last_val)


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
