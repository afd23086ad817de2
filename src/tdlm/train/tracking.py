"""Experiment tracking through the field's libraries (``train.tracker``).

The trainer hands every record it appends to ``metrics.jsonl`` to a tracker (rank 0 only),
which logs the record's numbers as scalars at the record's step, under ``<split>/<key>``;
nested numbers get their path (``train/parts_per_token/level_0``,
``val/parts_per_token/level_1``). So a tracker shows exactly what ``metrics.jsonl`` holds:
training loss and its named parts (TDLM: per level; DID: rate and token terms), learning
rate, gradient norm and tokens/s; validation NELBO per token (and per level), perplexity
bound, bits per token and tokens. ``None`` values are skipped; NaN (the gradient norm with
clipping off) is logged as NaN. The resolved config is logged once at the start.

* ``none``: nothing (default).
* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` in ``<run>/tensorboard``;
  scalars are written as float64 tensors (``new_style``, ``double_precision``), so the values
  read back equal ``metrics.jsonl``'s; the config is a text summary ``config`` (JSON). On
  resume, events after the checkpoint's step left by the interrupted process are purged
  (``purge_step``).
* ``wandb``: ``wandb.init`` with the config; everything W&B reads from the environment
  applies (``WANDB_MODE=offline``, ``WANDB_PROJECT`` (default ``tdlm``), ``WANDB_ENTITY``,
  ``WANDB_NAME`` (default: the run folder's name), ``WANDB_DIR`` (default: the run folder),
  ``WANDB_API_KEY``, ...). The W&B run id is kept in ``<run>/wandb_run.json`` so a resumed
  run continues the same W&B run (W&B ignores steps it has already seen; exact resume makes
  them equal anyway, but tokens/s).

A missing package is a one-line :class:`TdlmError` naming the extra to install
(``pip install "tdlm[tensorboard]"``), raised before training starts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..config.sections import TRACKERS
from ..errors import ConfigError

WANDB_RUN_FILE = "wandb_run.json"


def scalars(rec: dict) -> dict:
    """``{"<split>/<key>[/<sub>...]": float}`` of a metrics record (``step`` and ``split``
    are the coordinates, not scalars; strings and ``None`` are skipped)."""
    split = rec.get("split", "train")
    out: dict = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k in sorted(v):
                walk(f"{prefix}/{k}", v[k])
        elif isinstance(v, bool) or v is None or isinstance(v, str):
            return
        elif isinstance(v, (int, float)):
            out[prefix] = float(v)

    for k, v in rec.items():
        if k not in ("step", "split"):
            walk(f"{split}/{k}", v)
    return out


def _missing(kind: str, package: str) -> ConfigError:
    return ConfigError(f"train.tracker={kind!r} needs the {package} package: "
                       f'pip install "tdlm[{kind}]"')


def check_available(kind: str) -> None:
    """Raise the one-line error when the tracker's package is not installed."""
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise _missing(kind, "tensorboard") from None
    elif kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise _missing(kind, "wandb") from None
    elif kind != "none":
        raise ConfigError(f"unknown tracker {kind!r}; allowed: {', '.join(TRACKERS)}")


class Tracker:
    """No tracking (``none``); the base of the others."""

    def log(self, rec: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict, resume_step: int = 0):
        check_available("tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        kw = {"purge_step": resume_step + 1} if resume_step else {}
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), **kw)
        if not resume_step:
            self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```",
                                 global_step=0)

    def log(self, rec: dict) -> None:
        step = int(rec["step"])
        for tag, v in scalars(rec).items():
            self.writer.add_scalar(tag, v, step, new_style=True, double_precision=True)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict, resume_step: int = 0):
        check_available("wandb")
        import wandb
        run_dir = Path(run_dir)
        saved = run_dir / WANDB_RUN_FILE
        run_id = None
        if resume_step and saved.is_file():
            try:
                run_id = json.loads(saved.read_text())["id"]
            except (OSError, ValueError, KeyError, TypeError):
                run_id = None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "tdlm",
                              name=os.environ.get("WANDB_NAME") or run_dir.name,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir),
                              config=config, id=run_id,
                              resume="allow" if run_id else None)
        if run_id is None:
            from ..utils.io import atomic_write_json
            atomic_write_json(saved, {"id": self.run.id, "project": self.run.project})

    def log(self, rec: dict) -> None:
        vals = scalars(rec)
        if vals:
            self.run.log(vals, step=int(rec["step"]))

    def close(self) -> None:
        self.run.finish()


def make_tracker(kind: str, run_dir: Path, config: dict, resume_step: int = 0) -> Tracker:
    """The tracker ``kind`` (``train.tracker``) for a run writing into ``run_dir``;
    ``resume_step``: the checkpoint step a resumed run starts from (0: a fresh run)."""
    check_available(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, config, resume_step)
    if kind == "wandb":
        return WandbTracker(run_dir, config, resume_step)
    return Tracker()
