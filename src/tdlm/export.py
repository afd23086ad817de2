"""Shareable models: ``save_pretrained`` / ``from_pretrained``.

An exported model is a self-contained folder that loads offline (no training state)::

    config.json           the resolved RunConfig of the run (unchanged)
    model.safetensors     one set of weights: the EMA weights when the checkpoint has them
                          (and ``use_ema``), else the raw ones; the safetensors metadata and
                          manifest.json say which ("weights": "ema" | "raw")
    tokenizer.json        the run's tokenizer (tokenizers format) ...
    tokenizer_meta.json   ... with its name, EOS/BOS/PAD ids and vocabulary hash
    tree.safetensors      TDLM only: the vocabulary tree (any family artefact is stored here)
    README.md             a model-card stub (free to edit: it is not hashed)
    manifest.json         format "tdlm-pretrained-v1", family, weights, source checkpoint and
                          step, and the sha256 of every file above except README.md; written last

Guarantees:

* ``save_pretrained`` writes into a hidden temporary folder next to the target and renames it
  into place, so an interrupted export never leaves a folder that loads; an existing non-empty
  target is refused unless ``overwrite=True`` (then it is replaced only once the new folder is
  complete). Failures raise :class:`~tdlm.errors.TdlmError` with a one-line message.
* Loading (``tdlm.load`` or ``from_pretrained``) verifies every hash of the manifest before
  reading anything, reads only JSON and safetensors (nothing is unpickled), and gives a
  one-line :class:`~tdlm.errors.CheckpointError` naming the first missing or altered file.
* The exported weights are bit-identical to the weights the source pipeline generates with,
  so ``generate`` (same seed) and ``nelbo`` give the same results as the source checkpoint.
* ``from_pretrained(name)`` uses ``huggingface_hub.snapshot_download`` only when ``name`` is
  not an existing local path and ``huggingface_hub`` is importable; otherwise one-line error.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import CheckpointError, TdlmError
from .train.checkpoint import (PRETRAINED_FORMAT, Checkpoint, _read_json, verified_config,
                               verified_manifest_files)

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_meta.json")
MANIFEST = "manifest.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass
class PretrainedCheckpoint(Checkpoint):
    """An exported folder seen as a :class:`Checkpoint` (weights only, no training state):
    ``model_state`` holds the exported weights, ``ema_state`` is None, ``trainer`` holds
    the source step; family artefacts and the tokenizer live in the folder itself."""
    weights: str = "raw"

    def extra(self, name: str) -> Optional[Path]:
        if name == "tokenizer":
            return self.path if (self.path / "tokenizer.json").is_file() else None
        return self.path if name in self.manifest.get("extras", []) else None

    def optimizer_state(self):
        return None

    def rng_state(self) -> dict:
        raise CheckpointError(f"{self.path} is an exported model: it has no training state "
                              "to resume from")


def is_pretrained_folder(path) -> bool:
    """True when ``path`` is a folder whose manifest.json declares an exported model."""
    m = Path(path) / MANIFEST
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text(encoding="utf-8")).get("format") == PRETRAINED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_pretrained_checkpoint(path, expect_family: Optional[str] = None) -> PretrainedCheckpoint:
    """Verify an exported folder (every manifest hash) and read its config and weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    manifest = _read_json(p, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != PRETRAINED_FORMAT:
        raise CheckpointError(f"{p} is not a {PRETRAINED_FORMAT} folder")
    files = verified_manifest_files(p, manifest, REQUIRED, what="exported model")
    for f in sorted(p.iterdir()):   # whatever the loader may read must be covered too
        if f.is_file() and f.suffix in (".safetensors", ".json") and f.name != MANIFEST \
                and f.name not in files:
            raise CheckpointError(f"exported model {p} is corrupt: {f.name} is not listed in "
                                  "manifest.json")
    cfg = verified_config(p, manifest, expect_family, what="exported model")
    try:
        state = load_file(str(p / "model.safetensors"), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"exported model {p} weights cannot be read: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    weights = manifest.get("weights", "raw")
    return PretrainedCheckpoint(p, cfg, state, None, {"step": manifest.get("step")}, manifest,
                                weights=weights if weights in ("ema", "raw") else "raw")


def _model_card(cfg, family: str, weights: str, step, source: str, n_params: int) -> str:
    m = cfg.model
    tree = f", tree K={m.tree_K} H={m.tree_H}" if family == "tdlm" else ""
    return f"""---
library_name: tdlm
tags:
- discrete-diffusion
- {family}
---

# {family.upper()} model (tdlm library)

A `{family}` model of the `tdlm` library (discrete diffusion LMs): {m.n_layers} blocks,
d_model {m.d_model}, {m.n_heads} heads, vocabulary {m.vocab_size}{tree}, sequence length
{cfg.data.seq_len}; {n_params:,} parameters. Weights: **{weights}** (step {step} of
`{source}`). Trained on `{cfg.data.source}` with the `{cfg.data.tokenizer}` tokenizer.

```python
import tdlm
pipe = tdlm.from_pretrained("path/or/hub-id")     # or tdlm.load("path")
print(pipe.generate(num=2, steps=128, seed=0))
print(pipe.nelbo(["Some text to score."]))
```

Files are listed with their sha256 in `manifest.json` and verified on load.
Intended use, training data details, evaluation and limitations: (to be written).
"""


def save_pretrained(model, folder, *, use_ema: bool = True, overwrite: bool = False) -> Path:
    """Export ``model`` (a :class:`tdlm.api.Pipeline`, or a run/checkpoint/exported folder,
    loaded with ``use_ema``) to ``folder`` (layout and guarantees: module docstring).
    Returns the folder. Raises TdlmError (one line) when the target exists and is not empty
    (unless ``overwrite``) or cannot be written."""
    from safetensors.torch import save_file

    from . import __version__
    from .api import Pipeline, load
    from .nn.dit import count_parameters
    from .utils import sha256_file

    pipe = model if isinstance(model, Pipeline) else load(model, use_ema=use_ema)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TdlmError(f"export folder {folder} is a file")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise TdlmError(f"export folder {folder} already exists and is not empty; choose "
                        "another folder (nothing was written)")
    family = pipe.cfg.model.family
    weights = getattr(pipe, "weights", "raw")
    ck = pipe.checkpoint
    step = ck.trainer.get("step") if ck is not None else None
    # provenance without the local absolute path: <run>/checkpoints/step_N
    source = Path(*ck.path.parts[-3:]).as_posix() if ck is not None else "in-memory model"
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-export-{folder.name}-"))
        (tmp / "config.json").write_text(json.dumps(pipe.cfg.to_dict(), indent=2,
                                                    sort_keys=True), encoding="utf-8")
        state = {k: v.detach().to("cpu").contiguous() for k, v in pipe.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"),
                  metadata={"format": PRETRAINED_FORMAT, "family": family, "weights": weights})
        pipe.tokenizer.save(str(tmp))
        extras = []
        for name, writer in pipe.family.state_files().items():   # e.g. TDLM: tree.safetensors
            writer(tmp)
            extras.append(name)
        try:
            n_params = int(count_parameters(pipe.model)["total"])
        except Exception:           # the card is cosmetic
            n_params = sum(p.numel() for p in pipe.model.parameters())
        (tmp / "README.md").write_text(_model_card(pipe.cfg, family, weights, step, source,
                                                   n_params), encoding="utf-8")
        files = {p.relative_to(tmp).as_posix(): sha256_file(p)
                 for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != "README.md"}
        manifest = {"format": PRETRAINED_FORMAT, "family": family, "weights": weights,
                    "step": step, "source": source, "tdlm_version": __version__,
                    "extras": extras, "files": files}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        aside = None
        if folder.exists():         # empty, or overwrite=True: move the old copy aside first
            aside = folder.parent / f".old-export-{folder.name}-{os.getpid()}"
            os.replace(folder, aside)
        os.replace(tmp, folder)
        tmp = None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except OSError as e:
        what = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
        raise TdlmError(f"could not export to {folder}: {what}") from None
    except Exception as e:
        from safetensors import SafetensorError
        if isinstance(e, SafetensorError):
            raise TdlmError(f"could not export to {folder}: {str(e).splitlines()[0]}") from None
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def from_pretrained(name_or_path, device: str = "cpu", *, revision: Optional[str] = None,
                    expect_family: Optional[str] = None, use_ema: bool = True,
                    cache_dir: Optional[str] = None):
    """A :class:`tdlm.api.Pipeline` from a local folder (exported, run or checkpoint folder)
    or, when ``name_or_path`` is not an existing local path, from the Hugging Face hub
    (``huggingface_hub.snapshot_download(name_or_path, revision=...)``; needs the package
    and network access). Errors are one-line TdlmError/CheckpointError."""
    from .api import load
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.exists():
        return load(p, device=device, use_ema=use_ema, expect_family=expect_family)
    name = str(name_or_path)
    if not _HUB_ID.match(name) or name.startswith("."):
        raise CheckpointError(f"model not found: {name} (not a local folder nor a Hugging "
                              "Face hub id like user/model)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"model not found: {name} is not a local folder, and "
                              "huggingface_hub is not installed to fetch it from the hub "
                              "(pip install huggingface_hub)") from None
    try:
        local = snapshot_download(repo_id=name, revision=revision, cache_dir=cache_dir)
    except Exception as e:          # network, auth, missing repo/revision: one line
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"model not found: {name} is not a local folder, and fetching "
                              f"it from the Hugging Face hub failed: {msg}") from None
    if not is_pretrained_folder(local):
        raise CheckpointError(f"hub repository {name} is not a tdlm exported model "
                              f"(no {PRETRAINED_FORMAT} manifest.json)")
    return load(local, device=device, use_ema=use_ema, expect_family=expect_family)
