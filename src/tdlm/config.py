"""Typed, validated run configuration with named presets.

A run is described by a :class:`RunConfig` made of small dataclasses. Every field is
validated in ``__post_init__``; errors raise :class:`tdlm.errors.ConfigError` naming the
field and the allowed values. Configs round-trip through JSON (``to_dict``/``from_dict``),
and every run saves its resolved config next to its outputs.

Presets (``PRESETS``) give published sizes exactly (``mdlm-small`` = 169.6M parameters with
the GPT-2 vocabulary + [MASK]) and ``tiny`` models that train on a CPU in minutes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .errors import ConfigError

EPS_MIN = 1e-12      # smallest diffusion.eps: below it 1 - eps rounds to 1 in float64 and the
                     # time input sigma(1) = -log eps is no longer finite (tdlm.schedules)

FAMILIES = ("mdlm", "ar", "tdlm", "did")
SCHEDULES = ("loglinear", "linear", "cosine")
LAYOUTS = ("packed", "crop_pad", "packed_bos", "varlen")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")
PARALLEL = ("ddp", "fsdp")


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"invalid config value for '{name}': {msg}")


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, n,
               f"must be > 0, got {v!r}")


def _choice(obj: Any, name: str, allowed: tuple) -> None:
    v = getattr(obj, name)
    _check(v in allowed, name, f"{v!r} is not one of {', '.join(map(str, allowed))}")


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
        _choice(self, "family", FAMILIES)
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "cond_dim",
                  "mlp_ratio", "max_seq_len", "tree_K", "tree_H")
        _check(self.d_model % self.n_heads == 0, "n_heads",
               f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        _check((self.d_model // self.n_heads) % 2 == 0, "n_heads",
               "head dimension must be even for rotary embeddings")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _choice(self, "tree_head", ("shared", "per_level"))
        _choice(self, "tree_source", ("corpus", "random", "frequency", "checkpoint", "file"))
        _check(self.tree_source not in ("checkpoint", "file") or bool(self.tree_path),
               "tree_path", f"required when tree_source={self.tree_source!r}")
        _check(self.tree_K >= 2, "tree_K", f"must be >= 2, got {self.tree_K}")
        _positive(self, "tree_capacity_ratio", "tree_embed_dim")
        _choice(self, "did_length", ("fixed", "variable"))


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
        _choice(self, "schedule", SCHEDULES)
        _check(EPS_MIN <= self.eps < 0.5, "eps", f"must be in [{EPS_MIN:g}, 0.5), got {self.eps}")
        for name in ("train_t_min", "eval_t_min"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and 0.0 <= v < 0.5, name,
                   f"must be in [0, 0.5), got {v!r}")
        _check(isinstance(self.num_timesteps, int) and self.num_timesteps >= 0,
               "num_timesteps", f"must be an integer >= 0, got {self.num_timesteps!r}")
        _choice(self, "window_allocation", ("linear", "exponential"))
        _choice(self, "level_weighting", ("none", "linear", "exponential"))
        _positive(self, "window_ratio", "level_weight_ratio")
        _check(self.train_weight_clip >= 0, "train_weight_clip", "must be >= 0")
        _choice(self, "train_weighting", ("elbo", "simple"))


@dataclass
class DataConfig:
    """Where text comes from and how it becomes batches.

    ``source``: ``bundled`` (the corpus shipped with the package), ``hf:NAME`` for
    openwebtext, lm1b, wikitext103, text8 (hub name or local cache), or a path to a
    .txt/.jsonl file or a folder of them; ``bundled:paragraphs`` is the bundled corpus cut into
    passages of at least 200 characters (a variable-length corpus). ``layout``: ``packed``
    (MDLM: documents joined with EOS, cut into blocks), ``crop_pad`` (GIDD/TDLM: BOS+text+EOS
    per document, random crop, padding), ``packed_bos`` (DID fixed length: the packed stream
    in blocks of seq_len-1 tokens, each led by BOS) or ``varlen`` (DID variable length: BOS +
    document per item, no EOS, no padding, at most seq_len tokens; ragged batches, see
    ``tdlm.data.batches``). ``bucket_factor`` and ``micro_tokens`` apply to ``varlen`` only.
    """
    source: str = "bundled"
    tokenizer: str = "gpt2"          # gpt2 | bpe-<size> (trained locally, e.g. bpe-8k)
    layout: str = "packed"
    seq_len: int = 128
    val_fraction: float = 0.02
    split_seed: int = 0
    cache_dir: str = "~/.cache/tdlm"  # token caches, trained tokenizers, built trees
    max_train_docs: int = 0          # 0: all
    text_field: str = "text"
    # varlen layout: batches are drawn from windows of ``bucket_factor`` x batch items sorted
    # by length (0: no bucketing); micro-batches hold at most ``micro_tokens`` tokens (0: off).
    bucket_factor: int = 16
    micro_tokens: int = 0

    def __post_init__(self) -> None:
        _choice(self, "layout", LAYOUTS)
        _positive(self, "seq_len")
        _check(0.0 < self.val_fraction < 0.5, "val_fraction",
               f"must be in (0, 0.5), got {self.val_fraction}")
        _check(self.max_train_docs >= 0, "max_train_docs", "must be >= 0")
        _check(self.bucket_factor >= 0, "bucket_factor", "must be >= 0")
        _check(self.micro_tokens >= 0, "micro_tokens", "must be >= 0")
        _check(self.tokenizer == "gpt2" or self.tokenizer.startswith("bpe-"), "tokenizer",
               f"{self.tokenizer!r} is not one of gpt2, bpe-<size> (e.g. bpe-8k)")

    @property
    def cache_path(self) -> str:
        """``cache_dir`` with ``~`` expanded (the config keeps the portable form)."""
        import os
        return os.path.expanduser(self.cache_dir)


@dataclass
class TrainConfig:
    """Optimisation. ``global_batch`` sequences per optimizer step; the micro-batch is
    ``micro_batch`` (0: equal to the global batch) and accumulation is derived.

    Under ``torchrun`` with W processes the global batch stays ``global_batch``:
    ``micro_batch`` is the per-device micro-batch (0: ``global_batch / W``, one per device)
    and each device accumulates ``global_batch / (W * micro_batch)`` micro-batches
    (``global_batch`` must be divisible by ``W * micro_batch``; checked at start-up).
    ``parallel``: ``ddp`` (DistributedDataParallel, a full replica per device) or ``fsdp``
    (FSDP2, parameters, gradients and optimizer state sharded across devices); ignored in a
    single process."""
    global_batch: int = 32
    micro_batch: int = 0
    max_steps: int = 1000
    lr: float = 3e-4
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema: float = 0.0                 # 0 disables EMA
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    compile: bool = False            # torch.compile the transformer blocks (CUDA only)
    parallel: str = "ddp"            # ddp | fsdp (multi-process runs only)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _positive(self, "global_batch", "max_steps", "lr", "eval_every", "eval_batches",
                  "ckpt_every", "log_every")
        _check(self.micro_batch >= 0, "micro_batch", "must be >= 0")
        if self.micro_batch:
            _check(self.global_batch % self.micro_batch == 0, "micro_batch",
                   f"global_batch={self.global_batch} must be a multiple of "
                   f"micro_batch={self.micro_batch}")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _choice(self, "lr_schedule", LR_SCHEDULES)
        _choice(self, "precision", PRECISIONS)
        _choice(self, "parallel", PARALLEL)
        _check(0.0 <= self.ema < 1.0, "ema", f"must be in [0, 1), got {self.ema}")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
               "must be two numbers in [0, 1)")

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch or self.global_batch)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "custom"

    def __post_init__(self) -> None:
        _check(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
               f"{self.data.seq_len} exceeds the model's max_seq_len {self.model.max_seq_len}")
        if self.model.family == "did":
            _check(self.data.layout in ("packed_bos", "varlen"), "data.layout",
                   f"the did family needs BOS-led sequences: packed_bos or varlen, "
                   f"got {self.data.layout!r}")
        else:
            _check(self.data.layout != "varlen", "data.layout",
                   f"varlen (ragged batches) is supported by the did family only, "
                   f"not {self.model.family!r}")

    # ---- JSON round trip -------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError("invalid config: expected a JSON object")
        sections = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}; "
                              f"allowed: {', '.join(sections)}")
        kw: dict = {}
        for name, sub in (("model", ModelConfig), ("diffusion", DiffusionConfig),
                          ("data", DataConfig), ("train", TrainConfig)):
            if name in d:
                kw[name] = _build(sub, d[name], name)
        if "preset" in d:
            kw["preset"] = d["preset"]
        return cls(**kw)

    def override(self, assignments: list[str]) -> "RunConfig":
        """Apply ``section.field=value`` assignments (values parsed as JSON when possible)."""
        d = self.to_dict()
        for a in assignments:
            if "=" not in a or "." not in a.split("=", 1)[0]:
                raise ConfigError(f"invalid override {a!r}: expected section.field=value")
            key, raw = a.split("=", 1)
            section, name = key.split(".", 1)
            if section not in d or not isinstance(d[section], dict):
                raise ConfigError(f"unknown config section {section!r} in override {a!r}")
            if name not in d[section]:
                raise ConfigError(f"unknown config field '{key}'; allowed: "
                                  f"{', '.join(sorted(d[section]))}")
            try:
                val = json.loads(raw)
            except json.JSONDecodeError:
                val = raw
            d[section][name] = val
        return RunConfig.from_dict(d)


def _build(cls, d: Any, section: str):
    if not isinstance(d, dict):
        raise ConfigError(f"invalid config section '{section}': expected an object")
    allowed = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(allowed)
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(f'{section}.{u}' for u in sorted(unknown))}; "
                          f"allowed: {', '.join(allowed)}")
    kw = {}
    for k, v in d.items():
        default = getattr(cls(), k) if k != "betas" else (0.9, 0.999)
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ConfigError(f"invalid config value for '{section}.{k}': expected true/false, got {v!r}")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(v, (int, float)):
            raise ConfigError(f"invalid config value for '{section}.{k}': expected a number, got {v!r}")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(v, float):
            raise ConfigError(f"invalid config value for '{section}.{k}': expected an integer, got {v!r}")
        if isinstance(default, str) and not isinstance(v, str):
            raise ConfigError(f"invalid config value for '{section}.{k}': expected a string, got {v!r}")
        kw[k] = v
    return cls(**kw)


# ---- presets ----------------------------------------------------------------------------
def _preset(model: dict, data: Optional[dict] = None, train: Optional[dict] = None,
            diffusion: Optional[dict] = None) -> dict:
    return {"model": model, "data": data or {}, "train": train or {}, "diffusion": diffusion or {}}


_GPT2 = 50257
_OWT_TRAIN = dict(global_batch=512, lr=3e-4, warmup_steps=2500, max_steps=1_000_000,
                  ema=0.9999, precision="bf16", eval_every=10_000, ckpt_every=10_000)
_GIDD_TRAIN = dict(global_batch=512, lr=5e-4, betas=(0.9, 0.99), weight_decay=0.02,
                   warmup_steps=10_000, lr_schedule="cosine", min_lr_ratio=0.1,
                   max_steps=500_000, precision="bf16", eval_every=10_000, ckpt_every=10_000)
# GIDD trains on the padding of its crop+pad batches (evaluation excludes it).
_GIDD_DIFFUSION = dict(train_on_padding=True)
# CPU-scale training used by the README main job and the tests.
_TINY_TRAIN = dict(global_batch=16, lr=1e-3, warmup_steps=50, max_steps=600, eval_every=200,
                   eval_batches=8, ckpt_every=200, log_every=10, ema=0.0)
# GPT-2-vocabulary tiny models cost ~1 s per step of 8 x 128 tokens on 2 cores.
_TINY_GPT2_TRAIN = dict(global_batch=8, lr=1e-3, warmup_steps=20, max_steps=200, eval_every=100,
                        eval_batches=8, ckpt_every=100, log_every=10, ema=0.0)

PRESETS: dict[str, dict] = {
    # Published sizes (MDLM paper / code). GPT-2 vocabulary, L=1024, packed OWT recipe.
    "mdlm-small": _preset(dict(family="mdlm", vocab_size=_GPT2, d_model=768, n_layers=12, n_heads=12,
                               max_seq_len=1024, time_conditioning=False),
                          dict(seq_len=1024, layout="packed", source="hf:openwebtext"), _OWT_TRAIN),
    "mdlm-medium": _preset(dict(family="mdlm", vocab_size=_GPT2, d_model=1024, n_layers=24, n_heads=16,
                                max_seq_len=1024, time_conditioning=False),
                           dict(seq_len=1024, layout="packed", source="hf:openwebtext"), _OWT_TRAIN),
    # MDLM's 'tiny' DiT (d=512, 8 blocks, 8 heads).
    "mdlm-tiny": _preset(dict(family="mdlm", vocab_size=_GPT2, d_model=512, n_layers=8, n_heads=8,
                              max_seq_len=1024, time_conditioning=False),
                         dict(seq_len=1024, layout="packed", source="hf:openwebtext"), _OWT_TRAIN),
    # GIDD/TDLM setup baseline: L=512, BOS+text+EOS, crop+pad, GIDD optimiser.
    "mdlm-base": _preset(dict(family="mdlm", vocab_size=_GPT2, d_model=1024, n_layers=24, n_heads=16,
                              max_seq_len=512),
                         dict(seq_len=512, layout="crop_pad", source="hf:openwebtext"), _GIDD_TRAIN,
                         _GIDD_DIFFUSION),
    "ar-small": _preset(dict(family="ar", vocab_size=_GPT2, d_model=768, n_layers=12, n_heads=12,
                             max_seq_len=1024, time_conditioning=False),
                        dict(seq_len=1024, layout="packed", source="hf:openwebtext"), _OWT_TRAIN),
    # TDLM (GIDD setup, L=512): depth chosen so total parameters equal mdlm-small / mdlm-base
    # within 1% (tests/test_presets.py); H=2, K=512 [reported]; head < 0.5% of parameters.
    "tdlm-small": _preset(dict(family="tdlm", vocab_size=_GPT2, d_model=768, n_layers=17, n_heads=12,
                               max_seq_len=512, tree_K=512, tree_H=2),
                          dict(seq_len=512, layout="crop_pad", source="hf:openwebtext"), _GIDD_TRAIN,
                          _GIDD_DIFFUSION),
    "tdlm-base": _preset(dict(family="tdlm", vocab_size=_GPT2, d_model=1024, n_layers=28, n_heads=16,
                              max_seq_len=512, tree_K=512, tree_H=2),
                         dict(seq_len=512, layout="crop_pad", source="hf:openwebtext"), _GIDD_TRAIN,
                         _GIDD_DIFFUSION),
    # CPU presets: run in minutes on 2 cores with the bundled corpus.
    # tdlm-tiny has the parameter budget of tiny-gpt2 (13.9M): the V-way head's 6.4M
    # parameters become 26 more blocks.
    "tdlm-tiny": _preset(dict(family="tdlm", vocab_size=_GPT2, d_model=128, n_layers=30, n_heads=4,
                              cond_dim=64, max_seq_len=128, dropout=0.0, tree_K=256, tree_H=2),
                         dict(seq_len=128, tokenizer="gpt2", layout="packed"), _TINY_GPT2_TRAIN),
    "tiny": _preset(dict(family="mdlm", vocab_size=8192, d_model=128, n_layers=4, n_heads=4,
                         cond_dim=64, max_seq_len=128, dropout=0.0),
                    dict(seq_len=128, tokenizer="bpe-8k", layout="packed"), _TINY_TRAIN),
    "tiny-gpt2": _preset(dict(family="mdlm", vocab_size=_GPT2, d_model=128, n_layers=4, n_heads=4,
                              cond_dim=64, max_seq_len=128, dropout=0.0),
                         dict(seq_len=128, tokenizer="gpt2", layout="packed"), _TINY_GPT2_TRAIN),
    # DID (Ding et al. 2026): the MDLM backbone sizes without the [MASK] row, plus a d -> 1
    # rate head. Fixed length (DICE, no time input) on packed [BOS]+text blocks, L = 1024.
    "did-small": _preset(dict(family="did", vocab_size=_GPT2, d_model=768, n_layers=12, n_heads=12,
                              max_seq_len=1024, time_conditioning=False, did_length="fixed"),
                         dict(seq_len=1024, layout="packed_bos", source="hf:openwebtext"), _OWT_TRAIN),
    "did-medium": _preset(dict(family="did", vocab_size=_GPT2, d_model=1024, n_layers=24, n_heads=16,
                               max_seq_len=1024, time_conditioning=False, did_length="fixed"),
                          dict(seq_len=1024, layout="packed_bos", source="hf:openwebtext"), _OWT_TRAIN),
    # CPU: the backbone of tiny-gpt2. did-tiny: fixed length on packed blocks; did-tiny-var:
    # variable length (DISE, time-conditioned) on bundled paragraphs, ragged batches.
    "did-tiny": _preset(dict(family="did", vocab_size=_GPT2, d_model=128, n_layers=4, n_heads=4,
                             cond_dim=64, max_seq_len=128, dropout=0.0, time_conditioning=False,
                             did_length="fixed"),
                        dict(seq_len=128, tokenizer="gpt2", layout="packed_bos"), _TINY_GPT2_TRAIN),
    "did-tiny-var": _preset(dict(family="did", vocab_size=_GPT2, d_model=128, n_layers=4, n_heads=4,
                                 cond_dim=64, max_seq_len=128, dropout=0.0, time_conditioning=True,
                                 did_length="variable"),
                            dict(seq_len=128, tokenizer="gpt2", layout="varlen",
                                 source="bundled:paragraphs"), _TINY_GPT2_TRAIN),
    "ar-tiny": _preset(dict(family="ar", vocab_size=8192, d_model=128, n_layers=4, n_heads=4,
                            cond_dim=64, max_seq_len=128, dropout=0.0, time_conditioning=False),
                       dict(seq_len=128, tokenizer="bpe-8k", layout="packed"), _TINY_TRAIN),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    cfg = RunConfig.from_dict(copy.deepcopy(PRESETS[name]))
    cfg.preset = name
    return cfg


def load_config(path: str) -> RunConfig:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    return RunConfig.from_dict(d)
