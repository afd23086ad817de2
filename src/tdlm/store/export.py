"""Exported (shareable) model folders: their format, writing and verified reading.

The user-facing ``save_pretrained`` / ``from_pretrained`` live in :mod:`tdlm.pipeline`
(re-exported by ``tdlm`` and ``tdlm.export``).

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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, TdlmError
from ..utils.io import atomic_folder, sha256_file, write_json
from .checkpoint import (PRETRAINED_FORMAT, Checkpoint, _read_json, verified_config,
                         verified_manifest_files)

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_meta.json")
MANIFEST = "manifest.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def hub_snapshot(name: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                 what: str = "model", allow_patterns=None) -> Path:
    """A local snapshot of the Hugging Face hub repository ``name`` (``user/model``) via
    ``huggingface_hub.snapshot_download``; every failure (not a hub id, the package missing,
    network, auth, missing repo or revision) is a one-line :class:`CheckpointError` that
    starts with "``what`` not found"."""
    if not _HUB_ID.match(name) or name.startswith("."):
        raise CheckpointError(f"{what} not found: {name} (not a local path nor a Hugging "
                              "Face hub id like user/model)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{what} not found: {name} is not a local path, and "
                              "huggingface_hub is not installed to fetch it from the hub "
                              "(pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id=name, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=allow_patterns))
    except Exception as e:          # network, auth, missing repo/revision: one line
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"{what} not found: {name} is not a local path, and fetching "
                              f"it from the Hugging Face hub failed: {msg}") from None


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


def _model_card(cfg, family: str, weights: str, step, source: str, n_params: int,
                details: Optional[dict] = None) -> str:
    m = cfg.backbone
    tree = "".join(f", {k} {v}" for k, v in (details or {}).items())
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


def write_pretrained(pipe, folder, *, overwrite: bool = False,
                     provenance: Optional[dict] = None) -> Path:
    """Write ``pipe`` (an object with ``cfg``, ``family``, ``model``, ``tokenizer``,
    ``checkpoint`` and ``weights``: a :class:`tdlm.pipeline.Pipeline`) to ``folder`` as an
    exported model (layout and guarantees: module docstring). ``provenance``: where weights
    that were not trained here come from (``tdlm convert``: ``{"source": ..., "notes": [...],
    ...}``), stored in the manifest as ``converted_from`` and shown in the model card.
    Returns the folder. Raises TdlmError (one line) when the target exists and is not empty
    (unless ``overwrite``) or cannot be written."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from .. import __version__
    from ..nn.dit import count_parameters
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TdlmError(f"export folder {folder} is a file")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise TdlmError(f"export folder {folder} already exists and is not empty; choose "
                        "another folder (nothing was written)")
    family = pipe.cfg.family.name
    weights = getattr(pipe, "weights", "raw")
    ck = pipe.checkpoint
    step = ck.trainer.get("step") if ck is not None else None
    # provenance without the local absolute path: <run>/checkpoints/step_N
    source = Path(*ck.path.parts[-3:]).as_posix() if ck is not None else "in-memory model"
    if provenance is not None:
        source = str(provenance.get("source", source))
    try:
        with atomic_folder(folder, replace=True, prefix=".tmp-export-") as tmp:
            (tmp / "config.json").write_text(json.dumps(pipe.cfg.to_dict(), indent=2,
                                                        sort_keys=True), encoding="utf-8")
            state = {k: v.detach().to("cpu").contiguous()
                     for k, v in pipe.model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"),
                      metadata={"format": PRETRAINED_FORMAT, "family": family, "weights": weights})
            pipe.tokenizer.save(str(tmp))
            extras = []
            for name, writer in pipe.family.state_files().items():   # e.g. TDLM: tree
                writer(tmp)
                extras.append(name)
            try:
                n_params = int(count_parameters(pipe.model)["total"])
            except Exception:           # the card is cosmetic
                n_params = sum(p.numel() for p in pipe.model.parameters())
            card = _model_card(pipe.cfg, family, weights, step, source, n_params,
                               pipe.family.describe())
            if provenance is not None:
                card += "\n## Provenance\n\n" + "".join(
                    f"- {n}\n" for n in provenance.get("notes", [f"converted from {source}"]))
            (tmp / "README.md").write_text(card, encoding="utf-8")
            files = {p.relative_to(tmp).as_posix(): sha256_file(p)
                     for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != "README.md"}
            write_json(tmp / MANIFEST, {"format": PRETRAINED_FORMAT, "family": family,
                                        "weights": weights, "step": step, "source": source,
                                        "tdlm_version": __version__, "extras": extras,
                                        **({"converted_from": provenance} if provenance
                                           else {}),
                                        "files": files})
    except OSError as e:
        what = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
        raise TdlmError(f"could not export to {folder}: {what}") from None
    except SafetensorError as e:
        raise TdlmError(f"could not export to {folder}: {str(e).splitlines()[0]}") from None
    return folder
