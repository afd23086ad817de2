"""Checkpoints: safetensors weights + JSON config + optimizer/RNG/data-position state.

Layout of ``<run>/checkpoints/step_0000200/``::

    config.json          resolved RunConfig
    model.safetensors    model weights
    ema.safetensors      EMA weights (when EMA is on)
    optimizer.safetensors + optimizer.json   AdamW state tensors / hyper-parameters
    trainer.json         step, data position, RNG states, metrics so far
    extra/               family artefacts (tokenizer, vocabulary tree)
    manifest.json        sha256 of every file above; written last

A checkpoint is written into a temporary folder, fsynced and renamed into place, then the
``latest`` pointer is replaced atomically: an interrupted write never leaves a folder that
loads as valid. Loading verifies every hash. Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import RunConfig
from ..errors import CheckpointError, ConfigError

FORMAT = "tdlm-checkpoint-v1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta_state = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta_state[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": meta_state}


def _optimizer_state_dict(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, cfg: RunConfig, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    ema: Optional[dict] = None, trainer_state: Optional[dict] = None,
                    extra_files: Optional[dict] = None, keep: int = 2) -> Path:
    """Write ``run_dir/checkpoints/step_<step>`` atomically and point ``latest`` at it.
    ``extra_files``: name -> callable(folder) that writes an artefact into ``extra/<name>``."""
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckdir, prefix=f".tmp-{name}-"))
    try:
        _write_json(tmp / "config.json", cfg.to_dict())
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"), metadata={"format": FORMAT,
                                                           "family": cfg.model.family})
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()},
                      str(tmp / "ema.safetensors"))
        if optimizer is not None:
            tensors, meta = _optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            _write_json(tmp / "optimizer.json", meta)
        st = dict(trainer_state or {})
        st["step"] = step
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        _write_json(tmp / "trainer.json", st)
        for ename, writer in (extra_files or {}).items():
            (tmp / "extra" / ename).mkdir(parents=True, exist_ok=True)
            writer(tmp / "extra" / ename)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"format": FORMAT, "family": cfg.model.family, "step": step,
                    "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
        _write_json(tmp / "manifest.json", manifest)
        final = ckdir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint to {ckdir}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(ckdir / "latest", name + "\n")
    # keep the newest `keep` checkpoints
    old = sorted(p for p in ckdir.glob("step_*") if p.is_dir())
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    path: Path
    config: RunConfig
    model_state: dict
    ema_state: Optional[dict]
    trainer: dict
    manifest: dict

    def optimizer_state(self) -> Optional[dict]:
        f = self.path / "optimizer.safetensors"
        if not f.exists():
            return None
        meta = json.loads((self.path / "optimizer.json").read_text())
        return _optimizer_state_dict(load_file(str(f)), meta)

    def rng_state(self) -> dict:
        return load_file(str(self.path / "rng.safetensors"))

    def extra(self, name: str) -> Optional[Path]:
        p = self.path / "extra" / name
        return p if p.exists() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its ``latest`` checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / "manifest.json").exists() or (p / "model.safetensors").exists():
        return p
    for cand in (p / "checkpoints", p):
        latest = cand / "latest"
        if latest.is_file():
            name = latest.read_text().strip()
            return cand / name
    if p.is_file():
        raise CheckpointError(f"{p} is not a tdlm checkpoint folder (expected a folder with manifest.json)")
    raise CheckpointError(f"no checkpoint found in {p}")


def load_checkpoint(path: str | Path, expect_family: Optional[str] = None,
                    map_location: str = "cpu") -> Checkpoint:
    """Load and verify a checkpoint. Raises CheckpointError (one line) when it is missing,
    truncated, altered, or of another model family than ``expect_family``."""
    p = resolve_checkpoint(path)
    mpath = p / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {p} is incomplete: manifest.json missing "
                              "(an interrupted write?)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {p} has a corrupt manifest.json") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a {FORMAT} checkpoint (format {manifest.get('format')!r})")
    for rel, digest in manifest.get("files", {}).items():
        f = p / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {p} is missing {rel}")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {p} is corrupt: {rel} does not match its hash "
                                  "(truncated or modified)")
    try:
        cfg = RunConfig.from_dict(json.loads((p / "config.json").read_text()))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {p} has an invalid config: {e}") from None
    if expect_family is not None and cfg.model.family != expect_family:
        raise CheckpointError(f"checkpoint {p} holds a {cfg.model.family!r} model, "
                              f"expected {expect_family!r}")
    try:
        model_state = load_file(str(p / "model.safetensors"), device=map_location)
        ema = (load_file(str(p / "ema.safetensors"), device=map_location)
               if (p / "ema.safetensors").exists() else None)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {p} weights cannot be read: {e}") from None
    trainer = json.loads((p / "trainer.json").read_text()) if (p / "trainer.json").exists() else {}
    return Checkpoint(p, cfg, model_state, ema, trainer, manifest)
