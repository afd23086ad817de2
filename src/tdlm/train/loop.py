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
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from .preemption import Preempted, Preemption
from .step import (EMA, RuntimeOptions, StepContext, lr_at, make_optimizer,  # noqa: F401
                   micro_seed, nonfinite_error, resolve_runtime, sdpa_context, step_seed,
                   train_step)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TdlmError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


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


def _train(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool,
           stop_after: Optional[int], log: Callable[[str], None], info, dist_device) -> TrainResult:
    from . import distributed as D
    from ..data import BatchIterator, build_data
    from ..data.batches import num_tokens
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
    step_ctx = StepContext(wrapped=wrapped, model=model, opt=opt, tc=tc, micro=micro,
                           micro_tokens=cfg.data.micro_tokens, device=device, opts=opts,
                           info=info, ema=ema)
    preempt = Preemption(info, device)
    try:
        for step in range(start, tc.max_steps):
            wrapped.train()
            batch = next(batches)
            res = train_step(step_ctx, batch, step, final)
            loss_val, lr, gnorm = res.loss, res.lr, res.grad_norm
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
            stop = preempt.requested()          # a collective: every rank stops at this step
            if (done % tc.ckpt_every == 0 or done == tc.max_steps or done == stop_after
                    or stop):
                if not params_finite():
                    raise nonfinite_error("parameters", done, final)
                final = write_ckpt(done)
            if stop and done < tc.max_steps:
                raise Preempted(preempt.signame, done, final, run_dir)
            if stop_after is not None and done >= stop_after:
                break
    finally:
        preempt.restore()
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
