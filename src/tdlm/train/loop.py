"""Training loop: AdamW, warm-up + constant/cosine LR, clipping, accumulation, EMA,
periodic validation, JSONL metrics, loss-curve PNG, atomic checkpoints and exact resume.

Exact resume: every source of randomness is a pure function of (seed, step): the batch is
``BatchIterator(..., start_batch=step)``, the noise generator and the dropout RNG are reseeded
from (seed, step, micro-batch index) before every micro-batch (:func:`micro_seed`). With the
optimizer/EMA state restored, a run stopped at step k (or killed with SIGKILL) and resumed
reproduces the uninterrupted run's losses bit for bit (tests/train/test_train.py, tests/train/test_fault.py).
Because the noise does not depend on which process draws it, a multi-process (torchrun) run
equals the single-process run with the same ``micro_batch`` (tests/train/test_distributed.py).

One optimizer step is :func:`tdlm.train.step.train_step`; this module owns set-up, resume,
validation, metrics and checkpoints around it. Every metrics record (training: loss and its
named parts per token, learning rate, gradient norm, tokens/s; validation: NELBO and its parts
per token, perplexity bound, bits) goes to ``metrics.jsonl`` and, on rank 0, to the
``train.tracker`` (TensorBoard or W&B; ``tdlm.train.tracking``). SIGTERM/SIGINT: the step in progress is finished
on every rank, checkpointed, and :class:`Preempted` is raised (``tdlm train`` exits 75;
``tdlm.train.preemption``).

GPU paths (:func:`resolve_runtime`): bf16 autocast, per-block ``torch.compile``, fused AdamW
and flash-first SDPA on CUDA only; all off on the CPU (tests/train/test_gpu_paths.py). Activation
checkpointing, compile and DDP/FSDP are applied to the model from outside by
``tdlm.train.parallel.parallelize``; the process's place in the job is a
``tdlm.train.parallel.Runtime``.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import AUTO, RunConfig
from ..errors import TdlmError
from ..flops import TrainingFlops
from ..families import get_family_class
from ..store.checkpoint import load_checkpoint, save_checkpoint
from ..utils.io import atomic_write, atomic_write_text
from . import parallel as P
from .parallel import Runtime, resolve_device  # noqa: F401  (resolve_device: old import path)
from .memory import resolve_auto_micro
from .preemption import Preempted, Preemption
from .tracking import Tracker, check_available, make_tracker
from .step import (EMA, RuntimeOptions, StepContext, lr_at, make_optimizer,  # noqa: F401
                   micro_seed, nonfinite_error, resolve_runtime, retain_heap, sdpa_context, step_seed,
                   train_step)


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
    ``tdlm.train.parallel`` for what is guaranteed (equal to the single-process run with
    the same ``micro_batch``; rank 0 writes everything).

    Non-finite values stop the run with a one-line TdlmError (``tdlm train`` exits 2): a
    non-finite loss or gradient norm before the optimizer step, non-finite parameters before
    a checkpoint. No checkpoint of a non-finite state is written; the last good one stays
    ``latest``."""
    if stop_after is not None and stop_after < 1:
        raise TdlmError(f"stop_after must be >= 1, got {stop_after}")
    dev_name = cfg.train.device
    if resume:
        try:      # the run's own device setting, before the checkpoint is verified
            dev_name = json.loads((Path(out_dir) / "config.json").read_text())["train"]["device"]
        except (OSError, ValueError, KeyError, TypeError):
            dev_name = "auto"
    rt = Runtime.from_env(dev_name)
    ok = False
    try:
        res = _train(cfg, Path(out_dir), resume, progress, stop_after, log, rt)
        ok = True
        return res
    finally:
        rt.teardown(barrier=ok)


def _train(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool,
           stop_after: Optional[int], log: Callable[[str], None], rt: Runtime) -> TrainResult:
    if rt.is_main:
        cfg, ckpt, data, family = _setup_main(cfg, run_dir, resume, rt, log)
    else:
        cfg, ckpt, data, family = _setup_other(run_dir, resume, rt)
    run = _Run(cfg, run_dir, family, data, rt)
    run.build(ckpt, log)
    return run.loop(progress, stop_after)


def _load_data(cfg: RunConfig, ckpt, run_dir: Path, main: bool):
    """The run's data with its tokenizer: the checkpoint's own when resuming (never retrained
    or swapped); a fresh run (rank 0) never reuses a tokenizer left by an earlier attempt;
    other ranks read the one rank 0 saved."""
    from ..data import build_data
    from ..data.tokenizer import Tokenizer
    if ckpt is not None and ckpt.extra("tokenizer") is not None:
        return build_data(cfg.data, None, tokenizer=Tokenizer.load(str(ckpt.extra("tokenizer"))))
    if main:
        return build_data(cfg.data, None)
    return build_data(cfg.data, None, tokenizer=Tokenizer.load(str(run_dir)))


def _setup_main(cfg: RunConfig, run_dir: Path, resume: bool, rt: Runtime, log=print):
    """Rank 0 (or the single process): check the folder, resolve the config and vocabulary,
    prepare the family's resources and write config.json, data.json and the tokenizer. Every
    rank learns whether this worked (an error stops all of them)."""
    from ..data.layouts import write_length_report
    created, error, out = False, None, None
    try:
        created = _check_out_dir(run_dir, resume)
        ckpt = load_checkpoint(run_dir) if resume else None
        # a fresh run works on a copy: the vocabulary size is resolved below and must not
        # leak into the caller's object
        cfg = ckpt.config if ckpt is not None else _copy_config(cfg)
        auto = cfg.train.micro_batch == AUTO
        P.derive_micro(cfg.train.global_batch, 0 if auto else cfg.train.micro_batch, rt.world_size)
        check_available(cfg.train.tracker)      # a missing package stops the run here
        data = _load_data(cfg, ckpt, run_dir, True)
        data.tokenizer.save(str(run_dir))
        if cfg.backbone.vocab_size != data.tokenizer.vocab_size:
            if ckpt is not None:
                raise TdlmError(f"checkpoint {ckpt.path} was trained with vocab_size "
                                f"{cfg.backbone.vocab_size}, but its tokenizer has "
                                f"{data.tokenizer.vocab_size} tokens")
            cfg.backbone.vocab_size = data.tokenizer.vocab_size   # resolved from the tokenizer
        family = _family_for(cfg, ckpt, data, run_dir)
        if auto:          # sized from the device's memory; config.json records the number
            cfg.train.micro_batch = resolve_auto_micro(cfg, family, rt, log)
        atomic_write_text(run_dir / "config.json", cfg.to_json())
        atomic_write_text(run_dir / "data.json", json.dumps(data.provenance, indent=2))
        write_length_report(data, str(run_dir))     # varlen: length_histogram.json/.png
        out = (cfg, ckpt, data, family)
    except BaseException as e:
        if created:     # nothing of this run exists yet: leave no half-made folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        if not rt.distributed:
            raise
        error = e
    if rt.distributed and not rt.agree(error is None):
        raise error
    return out


def _setup_other(run_dir: Path, resume: bool, rt: Runtime):
    """Ranks > 0 wait for rank 0's checks and outputs, then read what it wrote."""
    if not rt.agree(True):
        raise TdlmError(f"rank 0 could not set up the run in {run_dir} (see its error); "
                        f"rank {rt.rank} stopped")
    ckpt = load_checkpoint(run_dir) if resume else None
    cfg = ckpt.config if ckpt is not None else RunConfig.from_dict(
        json.loads((run_dir / "config.json").read_text()))
    data = _load_data(cfg, ckpt, run_dir, False)
    return cfg, ckpt, data, _family_for(cfg, ckpt, data, None)


def _copy_config(cfg: RunConfig) -> RunConfig:
    out = RunConfig.from_dict(cfg.to_dict())
    out.preset = cfg.preset
    return out


def _family_for(cfg: RunConfig, ckpt, data, run_dir):
    fam_cls = get_family_class(cfg.family.name)
    resources = (fam_cls.resources_from_checkpoint(ckpt) if ckpt is not None
                 else fam_cls.prepare(cfg, data, run_dir))
    return fam_cls(cfg, **resources)


class _Run:
    """One training run in this process: model, optimizer, EMA, metrics and checkpoints
    (rank 0 writes), validation, and the loop over :func:`train_step`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, family, data, rt: Runtime):
        self.cfg, self.tc, self.run_dir, self.family, self.data = cfg, cfg.train, run_dir, family, data
        self.rt, self.main, self.device = rt, rt.is_main, rt.device
        self.opts = resolve_runtime(self.tc, rt.device)
        retain_heap(self.opts)
        self.micro, _ = P.derive_micro(self.tc.global_batch, self.tc.micro_batch, rt.world_size)
        self.fsdp = rt.distributed and self.tc.parallel == "fsdp"
        self.metrics_path = run_dir / "metrics.jsonl"
        self.history: list = []
        self.start = 0
        self.final: Optional[Path] = None
        self.tracker = Tracker()          # train.tracker, rank 0 only (set in build)
        self.flops = None                 # TrainingFlops of this rank's forwards (loop)
        self.flops_start = 0.0            # all ranks' training FLOPs up to self.start

    def build(self, ckpt, log) -> None:
        """Model (seeded), its checkpoint state, ``parallelize`` (activation checkpointing,
        compile, DDP/FSDP), AdamW, EMA; on resume the optimizer, EMA, step, metrics history
        and RNG state."""
        tc = self.tc
        torch.manual_seed(tc.seed)
        model = self.family.build_model()
        if not self.fsdp:
            model = model.to(self.device)
        # FSDP: the full model lives in host memory only until fully_shard moves each rank's
        # shards to its device (so a model larger than one device can be trained)
        if ckpt is not None:
            model.load_state_dict(ckpt.model_state)
        self.model = model
        self.wrapped = P.parallelize(
            P.LossModule(self.family, model),
            activation_checkpointing=tc.activation_checkpointing,
            compile=self.opts.compile, parallel=tc.parallel, runtime=self.rt)
        self.opt = make_optimizer(model.parameters(), tc, self.opts)
        self.ema = EMA(model, tc.ema) if tc.ema > 0 else None
        if ckpt is not None:
            self._restore(ckpt, log)
        if self.main:
            self.tracker = make_tracker(tc.tracker, self.run_dir, self.cfg.to_dict(), self.start)

    def _restore(self, ckpt, log) -> None:
        dist = self.rt.distributed
        osd = ckpt.optimizer_state()
        if osd is not None:
            if dist:
                P.load_optimizer_state(self.model, self.opt, osd)
            else:
                self.opt.load_state_dict(osd)
        if self.ema is not None:
            if ckpt.ema_state is None:
                raise TdlmError(f"checkpoint {ckpt.path} has no EMA weights but the run uses "
                                f"ema={self.tc.ema}")
            self.ema.shadow = {k: (P.shard_like(v.float(), self.ema.shadow[k])
                                   if dist else v.float())
                               for k, v in ckpt.ema_state.items()}
        self.start = int(ckpt.trainer["step"])
        self.history = list(ckpt.trainer.get("history", []))
        self.flops_start = ckpt.trainer.get("train_flops")
        self.final = ckpt.path
        rng = ckpt.rng_state()
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        if self.main:
            # records written after the checkpoint (by the interrupted process) are replayed
            _write_metrics(self.metrics_path, self.history)
            log(f"resumed from {ckpt.path} at step {self.start}")

    # ---- outputs ----------------------------------------------------------------------
    def record(self, rec: dict) -> None:
        """Append ``rec`` to the history and (rank 0) to metrics.jsonl and the tracker."""
        self.history.append(rec)
        if self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.tracker.log(rec)

    def write_ckpt(self, step: int) -> Optional[Path]:
        """Rank 0 writes the full state in the single-process format (FSDP: gathered from
        the shards by all ranks); every rank learns whether it worked."""
        rt, main, ema = self.rt, self.main, self.ema
        if self.fsdp:
            save_model = P.StateView(P.full_state_dict(self.model.state_dict(), keep=main))
            save_opt = P.OptimizerView(P.full_optimizer_state(self.model, self.opt, keep=main))
            save_ema = P.full_state_dict(ema.shadow, keep=main) if ema is not None else None
        else:
            save_model, save_opt = self.model, self.opt
            save_ema = ema.shadow if ema is not None else None
        extra = self.family.state_files()
        extra["tokenizer"] = self.data.tokenizer.save
        flops = self.flops_so_far()                 # a collective when distributed
        path, err = None, None
        if main:
            try:
                path = save_checkpoint(self.run_dir, step, self.cfg, save_model, save_opt,
                                       save_ema, {"history": self.history, "data_position": step,
                                                  "train_flops": flops},
                                       extra, keep_every=self.tc.keep_every)
            except BaseException as e:
                if not rt.distributed:
                    raise
                err = e
        if rt.distributed and not rt.agree(err is None):
            if err is not None:
                raise err
            raise TdlmError(f"rank 0 could not write the checkpoint of step {step} (see its "
                            f"error); rank {rt.rank} stopped")
        return path if main else self.run_dir / "checkpoints" / f"step_{step:07d}"

    def flops_so_far(self) -> Optional[float]:
        """Training FLOPs of every rank since step 0 (None for a model without a DiT or a
        resumed run whose checkpoint predates the count); a collective when distributed."""
        if self.flops is None or self.flops.total is None or self.flops_start is None:
            return None
        mine = self.flops.total
        return self.flops_start + (self.rt.all_reduce_sum([mine])[0] if self.rt.distributed
                                   else mine)

    def params_finite(self) -> bool:
        ok = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                 for p in self.model.parameters())
        return self.rt.agree(ok)

    def validate(self, step: int) -> dict:
        """Validation NELBO (EMA weights when the run keeps them) -> metrics."""
        from ..eval.nelbo import evaluate_nelbo
        tc, ema, fsdp = self.tc, self.ema, self.fsdp
        kw = dict(batch_size=self.micro, max_batches=tc.eval_batches, seed=tc.seed,
                  device=self.device, precision=tc.precision)
        if self.rt.distributed:
            backup = P.swap_in(self.model, ema.shadow) if ema is not None else None
            try:
                res = evaluate_nelbo(_EvalFamily(self.family, self.wrapped if fsdp else None),
                                     self.wrapped if fsdp else self.model, self.data.val,
                                     dist=self.rt, **kw)
            finally:
                if fsdp:
                    P.reshard(self.wrapped)
                if backup is not None:
                    P.swap_out(self.model, backup)
        else:
            eval_model = self.model
            if ema is not None:
                eval_model = self.family.build_model().to(self.device)
                ema.copy_to(eval_model)
            res = evaluate_nelbo(self.family, eval_model, self.data.val, **kw)
        rec = {"step": step, "split": "val", **{k: res[k] for k in
               ("nelbo_per_token", "ppl_bound", "bits_per_token", "tokens")}}
        if res.get("parts_per_token"):                   # e.g. TDLM's NELBO per level
            rec["parts_per_token"] = res["parts_per_token"]
        rec["train_flops"] = self.flops_so_far()
        self.record(rec)
        return rec

    # ---- the loop ---------------------------------------------------------------------
    def loop(self, progress: bool, stop_after: Optional[int]) -> TrainResult:
        from ..data import BatchIterator
        tc = self.tc
        # varlen (ragged) data: length-bucketed batches; micro-batches also capped at
        # data.micro_tokens tokens (dense batches: rows only)
        bucket = self.cfg.data.bucket_factor if getattr(self.data.train, "ragged", False) else 0
        batches = BatchIterator(self.data.train, tc.global_batch, tc.seed,
                                start_batch=self.start, bucket_factor=bucket)
        ctx = StepContext(wrapped=self.wrapped, model=self.model, opt=self.opt, tc=tc,
                          micro=self.micro, micro_tokens=self.cfg.data.micro_tokens,
                          runtime=self.rt, opts=self.opts, ema=self.ema)
        bar = _progress_bar(tc, self.start) if progress and self.main else None
        self.losses: list = []
        self.last_val = next((r for r in reversed(self.history) if r.get("split") == "val"), None)
        self.clock = [time.perf_counter(), 0]            # last log time, tokens since
        done = self.start
        preempt = Preemption(self.rt)
        self.flops = TrainingFlops(self.model)
        try:
            for step in range(self.start, tc.max_steps):
                self.wrapped.train()
                batch = next(batches)
                self.flops.discard()                  # forwards since the last step: eval
                res = train_step(ctx, batch, step, self.final)
                self.flops.step_done()
                done = step + 1
                self._after_step(done, batch, res, bar)
                stop = preempt.requested()          # a collective: every rank stops here
                if (done % tc.ckpt_every == 0 or done == tc.max_steps or done == stop_after
                        or stop):
                    if not self.params_finite():
                        raise nonfinite_error("parameters", done, self.final)
                    self.final = self.write_ckpt(done)
                if stop and done < tc.max_steps:
                    raise Preempted(preempt.signame, done, self.final, self.run_dir)
                if stop_after is not None and done >= stop_after:
                    break
        finally:
            preempt.restore()
            self.flops.close()
            self.tracker.close()
            if bar is not None:
                bar.close()
        if self.main:
            plot_history(self.history, self.run_dir / "loss_curve.png")
        return TrainResult(self.run_dir, done, self.losses, self.final, self.last_val)

    def _after_step(self, done: int, batch, res, bar) -> None:
        """Log the training record every ``log_every`` steps, validate every ``eval_every``."""
        from ..data.batches import num_tokens
        tc = self.tc
        self.losses.append(res.loss)
        self.clock[1] += num_tokens(batch)
        if done % tc.log_every == 0 or done == tc.max_steps:
            dt = time.perf_counter() - self.clock[0]
            rec = {"step": done, "split": "train", "loss": res.loss, "lr": res.lr,
                   "grad_norm": res.grad_norm, "tokens_per_s": self.clock[1] / max(dt, 1e-9),
                   "train_flops": self.flops_so_far()}
            if res.parts:                                # e.g. TDLM's per-level terms
                rec["parts_per_token"] = res.parts
            self.record(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{res.loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            self.clock = [time.perf_counter(), 0]
        if bar is not None:
            bar.update(1)
        if done % tc.eval_every == 0 or done == tc.max_steps:
            self.last_val = self.validate(done)
            if bar is not None:
                bar.write(f"step {done}: val NELBO/token {self.last_val['nelbo_per_token']:.4f} "
                          f"(ppl <= {self.last_val['ppl_bound']:.2f})")


def _progress_bar(tc, start: int):
    from tqdm import tqdm
    return tqdm(total=tc.max_steps, initial=start, desc="train", dynamic_ncols=True)


class _EvalFamily:
    """The family as ``evaluate_nelbo`` sees it in a distributed run: with FSDP the loss is
    computed through the sharded root module's ``forward`` (which gathers the parameters)."""

    def __init__(self, family, root=None):
        self._family, self._root = family, root

    def nelbo(self, model, batch, generator):
        if self._root is None:
            return self._family.nelbo(model, batch, generator)
        return self._root(batch, generator, exact=True)

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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    plt.close(fig)
