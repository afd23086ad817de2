"""``tdlm convert``: published checkpoints in, this library's exported-model format out.

:func:`convert` reads a published checkpoint folder (a local path, or a Hugging Face hub id
fetched with ``huggingface_hub.snapshot_download`` when online; e.g. ``kuleshov-group/mdlm-owt``,
``s-sahoo/duo``), maps its weights with the importer a family declares for that layout
(:attr:`tdlm.families.base.Family.importers`; MDLM declares ``mdlm`` and ``duo``:
:mod:`tdlm.families.mdlm.convert`), and writes an exported model folder
(:mod:`tdlm.store.export`: ``config.json``, ``model.safetensors``, tokenizer, model card,
sha256 manifest with a ``converted_from`` record) that ``tdlm eval``, ``tdlm sample``,
``tdlm schedule`` and ``tdlm.load`` take like any other.

Only ``config.json`` and safetensors are read. Pickle formats (``pytorch_model.bin``,
Lightning ``.ckpt``, ``.pt``/``.pth``) are refused with a one-line error that gives the one
command to convert them to safetensors in an environment the user trusts: unpickling a file
runs code it contains.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .data.tokenizer import get_tokenizer
from .errors import CheckpointError
from .families.base import detect_import, get_family_class, importer_for
from .pipeline import Pipeline
from .store.export import hub_snapshot, write_pretrained

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SAFE_CONVERT = ("python -c \"import torch; from safetensors.torch import save_file; "
                "sd = torch.load('{f}', map_location='cpu', weights_only=True); "
                "sd = sd.get('state_dict', sd); "
                "save_file({{k: v.contiguous() for k, v in sd.items()}}, 'model.safetensors')\"")


def _weights_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(_pickle_refusal(pickles[0]))
    raise CheckpointError(f"no *.safetensors weights in {folder}")


def _pickle_refusal(p: Path) -> str:
    return (f"{p.name} is a pickle file, which is never loaded here (unpickling runs code); "
            f"convert it once where you trust the file: {SAFE_CONVERT.format(f=p)} "
            "and convert the folder holding model.safetensors and config.json")


def read_published(path: str, revision: Optional[str] = None,
                   cache_dir: Optional[str] = None) -> tuple[dict, dict, str]:
    """``(state, hub_config, where)`` of a published checkpoint: a folder (``config.json`` +
    one or more ``*.safetensors``), a single ``.safetensors`` file (``config.json`` beside
    it), or a hub id. Nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    p = Path(os.path.expanduser(path))
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(_pickle_refusal(p))
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p} is neither a folder nor a .safetensors file")
        folder, files = p.parent, [p]
    else:
        folder = p if p.is_dir() else hub_snapshot(path, revision, cache_dir, what="checkpoint",
                                                    allow_patterns=["*.json", "*.safetensors"])
        files = _weights_files(folder)
    state: dict = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {f.name}: {str(e).splitlines()[0]}") from None
        state.update(part)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json beside the weights in {folder} (the number of "
                              "attention heads and the time conditioning are read from it)")
    try:
        hub_config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"config.json in {folder} is not valid JSON: {e}") from None
    if not isinstance(hub_config, dict):
        raise CheckpointError(f"config.json in {folder} is not a JSON object")
    return state, hub_config, str(path)


def convert(path: str, out: str, source: str = "auto", tokenizer: str = "gpt2", *,
            revision: Optional[str] = None, cache_dir: Optional[str] = None,
            overwrite: bool = False) -> tuple[Path, Pipeline, dict]:
    """Convert the published checkpoint at ``path`` (module docstring) into an exported model
    folder ``out``; returns ``(folder, pipeline, provenance)``. ``tokenizer``: the vocabulary
    the checkpoint was trained with (GPT-2 for both papers' OWT models)."""
    tok = get_tokenizer(tokenizer)
    state, hub_config, where = read_published(path, revision, cache_dir)
    if source == "auto":
        source = detect_import(hub_config, state, tok.vocab_size)
        if source is None:
            raise CheckpointError("cannot tell the checkpoint's layout (no known model_type "
                                  "in config.json, and its embedding fits no importer): "
                                  "pass --from")
    family_name, fn = importer_for(source)
    cfg, ours, notes = fn(state, hub_config, tok.vocab_size)
    cfg.data.tokenizer = tokenizer
    fam_cls = get_family_class(family_name)
    family = fam_cls(cfg, **fam_cls.shape_resources(cfg))
    model = family.build_model()
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"converted weights do not fit the model: "
                              f"{str(e).splitlines()[0]}") from None
    model.eval()
    pipe = Pipeline(cfg, family, model, tok, None, "raw")
    prov = {"source": where, "layout": source, "revision": revision, "notes": notes,
            "hub_config": hub_config,
            "parameters": int(sum(p.numel() for p in model.parameters()))}
    folder = write_pretrained(pipe, out, overwrite=overwrite, provenance=prov)
    return folder, pipe, prov

