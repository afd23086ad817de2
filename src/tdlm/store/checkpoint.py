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
loads as valid. Loading verifies every hash of the manifest (a mismatch is a one-line
CheckpointError naming the file) and refuses weights/state/extra files the manifest does not
list. Only JSON and safetensors are read: nothing is unpickled.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import RunConfig
from ..errors import CheckpointError, ConfigError

FORMAT = "tdlm-checkpoint-v1"
PRETRAINED_FORMAT = "tdlm-pretrained-v1"     # tdlm.export folders


from ..utils.io import atomic_write_text  # noqa: E402,F401  (module attributes: tests patch them)
from ..utils.io import atomic_folder  # noqa: E402
from ..utils.io import sha256_file as _sha256  # noqa: E402
from ..utils.io import write_json as _write_json  # noqa: E402


def _step_of(p: Path) -> int:
    try:
        return int(p.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


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


def _write_state(tmp: Path, step: int, cfg, model, optimizer, ema, trainer_state,
                 extra_files) -> None:
    """The files of a checkpoint, manifest.json last (its hashes cover every other file)."""
    _write_json(tmp / "config.json", cfg.to_dict())
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"), metadata={"format": FORMAT,
                                                       "family": cfg.family.name})
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
    manifest = {"format": FORMAT, "family": cfg.family.name, "step": step,
                "files": {p.relative_to(tmp).as_posix(): _sha256(p) for p in files}}
    _write_json(tmp / "manifest.json", manifest)


def save_checkpoint(run_dir: Path, step: int, cfg: RunConfig, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    ema: Optional[dict] = None, trainer_state: Optional[dict] = None,
                    extra_files: Optional[dict] = None, keep: int = 2,
                    keep_every: int = 0) -> Path:
    """Write ``run_dir/checkpoints/step_<step>`` atomically and point ``latest`` at it.
    ``extra_files``: name -> callable(folder) that writes an artefact into ``extra/<name>``.

    Order: everything goes into a hidden temporary folder (manifest.json last), which is
    fsynced and renamed to ``step_<step>``; only then is ``latest`` replaced (atomically).
    A failure at any point leaves ``latest`` on the previous checkpoint, and a folder
    without its manifest never loads. Older checkpoints beyond ``keep`` are deleted last
    (never the one ``latest`` points at), except those whose step is a multiple of
    ``keep_every`` (> 0)."""
    ckdir = Path(run_dir) / "checkpoints"
    name = f"step_{step:07d}"
    final = ckdir / name
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        # leftovers of a write killed midway (one writer per run folder)
        for stale in (*ckdir.glob(".tmp-step_*"), *ckdir.glob(".old-step_*")):
            shutil.rmtree(stale, ignore_errors=True)
        # re-writing a step replaces the old copy only once the new one is complete
        with atomic_folder(final, replace=True, prefix=".tmp-") as tmp:
            _write_state(tmp, step, cfg, model, optimizer, ema, trainer_state, extra_files)
        atomic_write_text(ckdir / "latest", name + "\n")
    except (OSError, SafetensorError) as e:
        msg = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"could not write checkpoint to {ckdir}: {msg}") from None
    # keep the newest `keep` checkpoints
    if keep > 0:
        old = sorted((p for p in ckdir.glob("step_*") if p.is_dir()), key=_step_of)
        for p in old[:-keep]:
            if p.name != name and not (keep_every > 0 and _step_of(p) % keep_every == 0):
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
        meta = _read_json(self.path, "optimizer.json")
        try:
            return _optimizer_state_dict(load_file(str(f)), meta)
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.path} optimizer state cannot be read: "
                                  f"{e}") from None

    def rng_state(self) -> dict:
        f = self.path / "rng.safetensors"
        try:
            return load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint {self.path} RNG state cannot be read: {e}") from None

    def extra(self, name: str) -> Optional[Path]:
        p = self.path / "extra" / name
        return p if p.exists() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its ``latest`` checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        raise CheckpointError(f"{p} is not a tdlm checkpoint folder (expected a folder with "
                              "manifest.json, or a run folder)")
    if (p / "manifest.json").exists() or (p / "model.safetensors").exists():
        return p
    for cand in (p / "checkpoints", p):
        latest = cand / "latest"
        if latest.is_file():
            try:
                name = latest.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"cannot read {latest}: {e}") from None
            target = cand / name
            if not name or "/" in name or "\\" in name or name in (".", "..") \
                    or not target.is_dir():
                raise CheckpointError(f"{latest} points at {name!r}, which is not a "
                                      f"checkpoint folder in {cand}")
            return target
    raise CheckpointError(f"no checkpoint found in {p} (not a checkpoint or run folder)")


def _read_json(p: Path, rel: str):
    try:
        return json.loads((p / rel).read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"checkpoint {p}: cannot read {rel}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {p} has a corrupt {rel}") from None


REQUIRED = ("config.json", "model.safetensors", "trainer.json")
OPTIONAL = ("ema.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors")


def verify_files(p: Path, files: dict, what: str = "checkpoint") -> None:
    """Check every ``relative path -> sha256`` of a manifest against the files in ``p``.
    Raises CheckpointError (one line, naming the first bad file) when a file is missing,
    unreadable, truncated or altered; paths that leave ``p`` are refused."""
    root = p.resolve()
    for rel, digest in files.items():
        f = p / str(rel)
        if not isinstance(rel, str) or not isinstance(digest, str) \
                or root not in f.resolve().parents:
            raise CheckpointError(f"{what} {p} has a corrupt manifest.json (bad entry {rel!r})")
        if not f.is_file():
            raise CheckpointError(f"{what} {p} is missing {rel}")
        try:
            ok = _sha256(f) == digest
        except OSError as e:
            raise CheckpointError(f"{what} {p}: cannot read {rel}: {e.strerror or e}") from None
        if not ok:
            raise CheckpointError(f"{what} {p} is corrupt: {rel} does not match its hash "
                                  "(truncated or modified)")


def verified_manifest_files(p: Path, manifest: dict, required, what: str = "checkpoint") -> dict:
    """The ``relative path -> sha256`` list of a manifest, after checking that it lists every
    ``required`` file and that every listed file matches its hash (:func:`verify_files`)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{what} {p} has a corrupt manifest.json (no file list)")
    for rel in required:
        if rel not in files:
            raise CheckpointError(f"{what} {p} is incomplete: manifest.json does not list {rel}")
    verify_files(p, files, what=what)
    return files


def verified_config(p: Path, manifest: dict, expect_family: Optional[str] = None,
                    what: str = "checkpoint") -> RunConfig:
    """The RunConfig in ``p/config.json`` (already hash-verified), checked against the
    manifest's family and ``expect_family``."""
    try:
        cfg = RunConfig.from_dict(_read_json(p, "config.json"))
    except ConfigError as e:
        raise CheckpointError(f"{what} {p} has an invalid config: {e}") from None
    if manifest.get("family", cfg.family.name) != cfg.family.name:
        raise CheckpointError(f"{what} {p} is inconsistent: manifest family "
                              f"{manifest.get('family')!r}, config family {cfg.family.name!r}")
    if expect_family is not None and cfg.family.name != expect_family:
        raise CheckpointError(f"{what} {p} holds a {cfg.family.name!r} model, "
                              f"expected {expect_family!r}")
    return cfg


def load_checkpoint(path: str | Path, expect_family: Optional[str] = None,
                    map_location: str = "cpu") -> Checkpoint:
    """Load and verify a checkpoint. Raises CheckpointError (one line) when it is missing,
    truncated, altered (any manifest hash differs), holds files the manifest does not list,
    is foreign (no tdlm manifest), or of another model family than ``expect_family``."""
    p = resolve_checkpoint(path)
    mpath = p / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {p} is incomplete or not a tdlm checkpoint: "
                              "manifest.json missing (an interrupted write, or a folder from "
                              "another library)")
    manifest = _read_json(p, "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        if fmt == PRETRAINED_FORMAT:
            raise CheckpointError(f"{p} is an exported model ({fmt}), not a training checkpoint: "
                                  "load it with tdlm.load or tdlm.from_pretrained")
        raise CheckpointError(f"{p} is not a {FORMAT} checkpoint (format {fmt!r})")
    files = verified_manifest_files(p, manifest, REQUIRED)
    # files the loader reads when present must be covered by the manifest too
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p).as_posix()
        if f.is_file() and rel not in files and (rel in OPTIONAL or rel.startswith("extra/")):
            raise CheckpointError(f"checkpoint {p} is corrupt: {rel} is not listed in "
                                  "manifest.json (added after the checkpoint was written)")
    cfg = verified_config(p, manifest, expect_family)
    try:
        model_state = load_file(str(p / "model.safetensors"), device=map_location)
        ema = (load_file(str(p / "ema.safetensors"), device=map_location)
               if (p / "ema.safetensors").exists() else None)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {p} weights cannot be read: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    trainer = _read_json(p, "trainer.json")
    if not isinstance(trainer, dict) or "step" not in trainer:
        raise CheckpointError(f"checkpoint {p} has a corrupt trainer.json (no step)")
    return Checkpoint(p, cfg, model_state, ema, trainer, manifest)


def tokenizer_of(ckpt: Checkpoint):
    """The tokenizer a checkpoint (or exported folder) was trained with: its saved copy, or
    the vendored GPT-2 tokenizer for runs that named it."""
    from ..data import get_tokenizer
    from ..data.tokenizer import Tokenizer
    p = ckpt.extra("tokenizer")
    if p is not None:
        return Tokenizer.load(str(p))
    if ckpt.config.data.tokenizer == "gpt2":
        return get_tokenizer("gpt2")
    raise CheckpointError(f"checkpoint {ckpt.path} carries no tokenizer")


def run_dir_of(ckpt_path) -> Path:
    """The run folder of ``<run>/checkpoints/step_N``; for a checkpoint folder kept
    elsewhere, the folder that holds it (never the checkpoint folder itself)."""
    ckpt_path = Path(ckpt_path)
    if ckpt_path.parent.name == "checkpoints":
        return ckpt_path.parent.parent
    return ckpt_path.parent
