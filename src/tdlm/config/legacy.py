"""Version 1 of the config layout (tdlm before the per-family sections) and its reader.

Version 1 had a ``model`` section (backbone sizes, the family name and every family's
prefixed options: ``tree_*`` for TDLM, ``did_length`` for DID) and a shared ``diffusion``
section. Version 2 (``tdlm.config.run``) has ``backbone``, ``family`` (the family's own
section), ``data`` and ``train``. :func:`upgrade_v1` maps a v1 dict to v2:

* ``model.family`` -> ``family.name``; ``model.activation_checkpointing`` ->
  ``train.activation_checkpointing``; the backbone fields -> ``backbone``;
* every other ``model.*`` / ``diffusion.*`` field -> the family section, under the name the
  section gives it (``renamed``, e.g. ``model.tree_K`` -> ``family.K``) or its own name;
* a field the family's section does not have was ignored by that family in v1 (e.g.
  ``model.tree_K`` of an MDLM run) and is dropped.

:class:`ModelConfig` and :class:`DiffusionConfig` stay importable (deprecated) so that code
building ``RunConfig(model=ModelConfig(...), diffusion=DiffusionConfig(...))`` keeps working.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from .base import EPS_MIN, check, choice, positive
from .sections import SCHEDULES, BackboneConfig, family_section


@dataclass
class ModelConfig:
    """Backbone (DiT) sizes and the model family.

    ``vocab_size`` is the tokenizer vocabulary *without* [MASK]; masked families add one
    row for it (``mask_id = vocab_size``). ``time_conditioning=False`` zeroes the sigma input
    as in MDLM's OWT models.
    """
    family: str = "mdlm"
    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    cond_dim: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.1
    max_seq_len: int = 1024
    time_conditioning: bool = True
    activation_checkpointing: bool = False
    # TDLM (tree) options; ignored by other families.
    tree_K: int = 512
    tree_H: int = 2
    tree_head: str = "shared"           # shared | per_level
    tree_source: str = "corpus"         # corpus | random | frequency | checkpoint | file
    tree_path: str = ""                 # a tree file (file) or a checkpoint (checkpoint)
    tree_seed: int = 0
    tree_capacity_ratio: float = 1.0    # leaf-cluster capacity / K ("cluster size ratio")
    tree_embed_dim: int = 64            # corpus/random embedding dimension
    # DID (deletion-insertion) options; ignored by other families.
    did_length: str = "fixed"           # fixed (DICE, gap-softmax, no time) | variable (DISE)

    def __post_init__(self) -> None:
        check(isinstance(self.family, str) and bool(self.family), "family", f"expected a family name, got {self.family!r}")
        positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "cond_dim",
                  "mlp_ratio", "max_seq_len", "tree_K", "tree_H")
        check(self.d_model % self.n_heads == 0, "n_heads",
               f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        check((self.d_model // self.n_heads) % 2 == 0, "n_heads",
               "head dimension must be even for rotary embeddings")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        choice(self, "tree_head", ("shared", "per_level"))
        choice(self, "tree_source", ("corpus", "random", "frequency", "checkpoint", "file"))
        check(self.tree_source not in ("checkpoint", "file") or bool(self.tree_path),
               "tree_path", f"required when tree_source={self.tree_source!r}")
        check(self.tree_K >= 2, "tree_K", f"must be >= 2, got {self.tree_K}")
        positive(self, "tree_capacity_ratio", "tree_embed_dim")
        choice(self, "did_length", ("fixed", "variable"))


@dataclass
class DiffusionConfig:
    """Noise schedule and objective options (MDLM spec, 'Process and loss')."""
    schedule: str = "loglinear"
    eps: float = 1e-3
    num_timesteps: int = 0          # 0: continuous time; T > 0: discrete-time NELBO
    antithetic: bool = True
    # TDLM: level windows and per-level training multipliers.
    window_allocation: str = "linear"   # linear (equal windows) | exponential
    window_ratio: float = 2.0
    level_weighting: str = "none"       # none | linear | exponential
    level_weight_ratio: float = 2.0
    train_weight_clip: float = 0.0      # 0: exact weights; > 0 clips ELBO weights in training
    train_weighting: str = "elbo"       # elbo | simple (DID: drop the w(t) weight in training)
    keep_first: bool = False            # MDLM: position 0 (BOS) never masked nor counted (DID comparison)
    # t ~ U(t_min, 1) (MDLM's sampling_eps): training, and the evaluation NELBO (MDLM: 1e-3)
    train_t_min: float = 1e-3
    eval_t_min: float = 1e-3
    # crop_pad batches: training also models the padding positions (GIDD does); evaluation and
    # every reported NELBO count real tokens only, whatever this says
    train_on_padding: bool = False

    def __post_init__(self) -> None:
        choice(self, "schedule", SCHEDULES)
        check(EPS_MIN <= self.eps < 0.5, "eps", f"must be in [{EPS_MIN:g}, 0.5), got {self.eps}")
        for name in ("train_t_min", "eval_t_min"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and 0.0 <= v < 0.5, name,
                   f"must be in [0, 0.5), got {v!r}")
        check(isinstance(self.num_timesteps, int) and self.num_timesteps >= 0,
               "num_timesteps", f"must be an integer >= 0, got {self.num_timesteps!r}")
        choice(self, "window_allocation", ("linear", "exponential"))
        choice(self, "level_weighting", ("none", "linear", "exponential"))


_BACKBONE = tuple(f.name for f in dataclasses.fields(BackboneConfig))
_TO_TRAIN = ("activation_checkpointing",)


def v1_key_to_v2(key: str, family: str) -> str | None:
    """``model.tree_K`` -> ``family.K`` etc. for the family ``family``; None when that
    family's section has no such field (the v1 field was ignored by that family)."""
    section, name = key.split(".", 1)
    if key == "model.family":
        return "family.name"
    if section == "model" and name in _BACKBONE:
        return f"backbone.{name}"
    if section == "model" and name in _TO_TRAIN:
        return f"train.{name}"
    if section not in ("model", "diffusion"):
        return key
    cls = family_section(family)
    target = cls.renamed.get(key, name)
    if target in {f.name for f in dataclasses.fields(cls)}:
        return f"family.{target}"
    return None


def upgrade_v1(d: dict) -> dict:
    """A v1 config dict (``model``, ``diffusion``, ``data``, ``train``, ``preset``) as a v2
    dict. The v1 sections are validated by the v1 classes first, so a v1 file that v1 code
    refused is refused here too, with the same field names."""
    from .base import build_section
    model = build_section(ModelConfig, d.get("model", {}), "model")
    diffusion = build_section(DiffusionConfig, d.get("diffusion", {}), "diffusion")
    out: dict = {"version": 2, "backbone": {}, "family": {}, "data": dict(d.get("data", {})),
                 "train": dict(d.get("train", {}))}
    if "preset" in d:
        out["preset"] = d["preset"]
    for section, obj, given in (("model", model, d.get("model", {})),
                                ("diffusion", diffusion, d.get("diffusion", {}))):
        for f in dataclasses.fields(obj):
            if f.name not in given:
                continue            # v1 defaults equal the v2 defaults of the same field
            target = v1_key_to_v2(f"{section}.{f.name}", model.family)
            if target is None:
                if getattr(obj, f.name) != getattr(type(obj)(), f.name):
                    warnings.warn(f"config {section}.{f.name}={getattr(obj, f.name)!r} has no "
                                  f"effect on a {model.family!r} model and is dropped",
                                  stacklevel=3)
                continue
            sec, name = target.split(".", 1)
            out[sec][name] = getattr(obj, f.name)
    out["family"]["name"] = model.family
    return out


def from_v1_objects(model: "ModelConfig", diffusion: "DiffusionConfig | None") -> dict:
    """The v2 dict of ``RunConfig(model=..., diffusion=...)`` built from v1 objects."""
    d = {"model": dataclasses.asdict(model)}
    if diffusion is not None:
        d["diffusion"] = dataclasses.asdict(diffusion)
    return upgrade_v1(d)
