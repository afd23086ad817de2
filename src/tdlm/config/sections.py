"""The config sections every run has (backbone, data, train) and the base of the family
sections, which each family declares in ``tdlm/families/<name>/config.py``.

Family sections are found by name through :func:`family_section`: the registry imports
``tdlm.families.<name>.config`` on demand (a module that depends on this layer only), so
this layer never names a family and a new family's section is found without editing it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .base import EPS_MIN, check, choice, opt, positive

SCHEDULES = ("loglinear", "linear", "cosine")
LAYOUTS = ("packed", "crop_pad", "packed_bos", "varlen")
#: layouts whose every row starts with a BOS at position 0 (a sampled row should too)
BOS_LED_LAYOUTS = ("crop_pad", "packed_bos", "varlen")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")
PARALLEL = ("ddp", "fsdp")
TRACKERS = ("none", "tensorboard", "wandb")
CPU_ALLOCATORS = ("retain", "system")
AUTO = "auto"           # train.micro_batch: sized from the device's memory at training start


@dataclass
class BackboneConfig:
    """The DiT backbone every family builds on (sizes, dropout, time conditioning).

    ``vocab_size`` is the tokenizer vocabulary; a family adds the rows it needs (masked
    families one [MASK] row). ``time_conditioning=False`` zeroes the time input, as in
    MDLM's OWT models."""
    vocab_size: int = opt(50257, "tokenizer vocabulary size (resolved from the tokenizer at training start)")
    d_model: int = opt(768, "hidden width d")
    n_layers: int = opt(12, "number of DiT blocks")
    n_heads: int = opt(12, "attention heads (d_model / n_heads must be even: rotary)")
    cond_dim: int = opt(128, "width of the time-conditioning vector (adaLN input)")
    mlp_ratio: int = opt(4, "MLP hidden width / d_model")
    dropout: float = opt(0.1, "dropout probability in the blocks, in [0, 1)")
    max_seq_len: int = opt(1024, "longest sequence the model accepts")
    time_conditioning: bool = opt(True, "feed the time input to the network (False: zeros, as MDLM-OWT)")

    def __post_init__(self) -> None:
        s = "backbone."
        positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "cond_dim",
                 "mlp_ratio", "max_seq_len", section=s)
        check(self.d_model % self.n_heads == 0, s + "n_heads",
              f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        check((self.d_model // self.n_heads) % 2 == 0, s + "n_heads",
              "head dimension must be even for rotary embeddings")
        check(0.0 <= self.dropout < 1.0, s + "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class DataConfig:
    """Where text comes from and how it becomes batches.

    ``source``: ``bundled`` (the corpus shipped with the package), ``hf:NAME`` for
    openwebtext, lm1b, wikitext103, text8 (hub name or local cache), or a path to a
    .txt/.jsonl file or a folder of them; ``bundled:paragraphs`` is the bundled corpus cut into
    passages of at least 200 characters (a variable-length corpus). ``layout``: ``packed``
    (MDLM: documents joined with EOS, cut into blocks), ``crop_pad`` (GIDD/TDLM: BOS+text+EOS
    per document, random crop, padding), ``packed_bos`` (DID fixed length: the packed stream
    in blocks of seq_len-1 tokens, each led by BOS) or ``varlen`` (BOS + document per item,
    no EOS, no padding, at most seq_len tokens; ragged batches, see ``tdlm.data.batches``).
    ``bucket_factor`` and ``micro_tokens`` apply to ``varlen`` only. Which layouts a family
    trains on is declared by its section (``layouts``).
    """
    source: str = opt("bundled", "bundled | bundled:paragraphs | hf:NAME | a .txt/.jsonl file or folder")
    tokenizer: str = opt("gpt2", "gpt2 | bpe-<size> (trained locally on the corpus, e.g. bpe-8k)")
    layout: str = opt("packed", "packed | crop_pad | packed_bos | varlen")
    seq_len: int = opt(128, "tokens per training sequence (at most backbone.max_seq_len)")
    val_fraction: float = opt(0.02, "fraction of documents held out for validation, in (0, 0.5)")
    split_seed: int = opt(0, "seed of the train/validation document split")
    cache_dir: str = opt("~/.cache/tdlm", "token caches, trained tokenizers, built trees")
    max_train_docs: int = opt(0, "use at most this many training documents (0: all)")
    text_field: str = opt("text", "the text column of JSONL / hub datasets")
    bucket_factor: int = opt(16, "varlen: batches drawn from windows of bucket_factor x batch items sorted by length (0: off)")
    micro_tokens: int = opt(0, "varlen: micro-batches hold at most this many tokens (0: off)")

    def __post_init__(self) -> None:
        s = "data."
        choice(self, "layout", LAYOUTS, section=s)
        positive(self, "seq_len", section=s)
        check(0.0 < self.val_fraction < 0.5, s + "val_fraction",
              f"must be in (0, 0.5), got {self.val_fraction}")
        check(self.max_train_docs >= 0, s + "max_train_docs", "must be >= 0")
        check(self.bucket_factor >= 0, s + "bucket_factor", "must be >= 0")
        check(self.micro_tokens >= 0, s + "micro_tokens", "must be >= 0")
        check(self.tokenizer == "gpt2" or self.tokenizer.startswith("bpe-"), s + "tokenizer",
              f"{self.tokenizer!r} is not one of gpt2, bpe-<size> (e.g. bpe-8k)")

    @property
    def cache_path(self) -> str:
        """``cache_dir`` with ``~`` expanded (the config keeps the portable form)."""
        return os.path.expanduser(self.cache_dir)


@dataclass
class TrainConfig:
    """Optimisation. ``global_batch`` sequences per optimizer step; the micro-batch is
    ``micro_batch`` (0: equal to the global batch) and accumulation is derived.

    Under ``torchrun`` with W processes the global batch stays ``global_batch``:
    ``micro_batch`` is the per-device micro-batch (0: ``global_batch / W``, one per device)
    and each device accumulates ``global_batch / (W * micro_batch)`` micro-batches
    (``global_batch`` must be divisible by ``W * micro_batch``; checked at start-up,
    ``tdlm.train.parallel.derive_micro``).

    ``micro_batch = "auto"`` (CUDA only): at training start the largest divisor of
    ``global_batch / W`` whose estimated peak memory (``tdlm.train.memory``, the estimate of
    ``tdlm fit``) fits the device with a 10% margin; accumulation follows, so the global batch
    is unchanged. The run's config.json records the number chosen (resume and evaluation use
    it). On the CPU "auto" is a one-line error: give a number."""
    global_batch: int = opt(32, "sequences per optimizer step (all processes together)")
    micro_batch: int = opt(0, "sequences per forward/backward on one device (0: global_batch / world size; auto: the largest that fits the CUDA device, tdlm fit's estimate)", words=(AUTO,))
    max_steps: int = opt(1000, "optimizer steps")
    lr: float = opt(3e-4, "peak learning rate (AdamW)")
    betas: tuple = opt((0.9, 0.999), "AdamW betas")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay")
    warmup_steps: int = opt(100, "linear warm-up steps")
    lr_schedule: str = opt("constant", "constant | cosine (to min_lr_ratio x lr at max_steps)")
    min_lr_ratio: float = opt(0.1, "cosine schedule floor, as a fraction of lr")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    ema: float = opt(0.0, "EMA decay of the weights (0: off)")
    eval_every: int = opt(200, "validate every this many steps")
    eval_batches: int = opt(8, "validation batches per evaluation")
    ckpt_every: int = opt(200, "write a checkpoint every this many steps")
    keep_every: int = opt(0, "besides the newest 2 checkpoints, keep every checkpoint whose step is a multiple of this (0: none), e.g. to evaluate a run at equal compute later")
    log_every: int = opt(10, "log training metrics every this many steps")
    seed: int = opt(0, "seed of initialisation, noise and data order")
    precision: str = opt("fp32", "fp32 | bf16 (bf16 autocast, CUDA only)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    compile: bool = opt(False, "torch.compile the transformer blocks (CUDA; the CPU too when a C++ compiler is found, else a one-line notice and eager)")
    parallel: str = opt("ddp", "ddp | fsdp (multi-process runs only)")
    cpu_allocator: str = opt("retain", "CPU runs: retain | system. retain: freed memory stays in the process heap (glibc: no mmap for large blocks, no trimming), so each step reuses the last step's pages instead of page-faulting fresh ones; system: the C library's defaults")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in backward (applied by train.parallel)")
    tracker: str = opt("none", "experiment tracker fed metrics.jsonl's scalars and the config on rank 0: none | tensorboard (<run>/tensorboard) | wandb (WANDB_* variables honoured)")

    def __post_init__(self) -> None:
        s = "train."
        self.betas = tuple(self.betas)
        positive(self, "global_batch", "max_steps", "lr", "eval_every", "eval_batches",
                 "ckpt_every", "log_every", section=s)
        check(isinstance(self.keep_every, int) and self.keep_every >= 0, s + "keep_every",
              f"must be an integer >= 0, got {self.keep_every!r}")
        mb = self.micro_batch
        check(mb == AUTO or (isinstance(mb, int) and not isinstance(mb, bool) and mb >= 0),
              s + "micro_batch", f"must be an integer >= 0 or {AUTO!r}, got {mb!r}")
        if self.micro_batch and self.micro_batch != AUTO:
            check(self.global_batch % self.micro_batch == 0, s + "micro_batch",
                  f"global_batch={self.global_batch} must be a multiple of "
                  f"micro_batch={self.micro_batch}")
        check(self.warmup_steps >= 0, s + "warmup_steps", "must be >= 0")
        choice(self, "lr_schedule", LR_SCHEDULES, section=s)
        choice(self, "precision", PRECISIONS, section=s)
        choice(self, "parallel", PARALLEL, section=s)
        choice(self, "tracker", TRACKERS, section=s)
        choice(self, "cpu_allocator", CPU_ALLOCATORS, section=s)
        check(0.0 <= self.ema < 1.0, s + "ema", f"must be in [0, 1), got {self.ema}")
        check(self.grad_clip >= 0, s + "grad_clip", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), s + "betas",
              "must be two numbers in [0, 1)")


# ---- family sections -----------------------------------------------------------------------
@dataclass
class FamilySection:
    """Base of a family's config section (``RunConfig.family``).

    A subclass sets ``name`` (the family's name in configs), ``layouts`` (the data layouts
    it trains on), optionally ``renamed`` (``{flat v1 key: field}`` for fields whose name
    changed when the section was split out of the v1 ``model``/``diffusion`` sections, e.g.
    ``{"model.tree_K": "K"}``), and registers itself with :func:`register_section`."""
    name: ClassVar[str] = ""
    layouts: ClassVar[tuple] = ("packed", "crop_pad", "packed_bos")
    renamed: ClassVar[dict] = {}

    def check_run(self, run) -> None:
        """Checks across sections (the whole ``RunConfig`` is built); default: the layout."""
        check(run.data.layout in self.layouts, "data.layout",
              f"the {self.name} family trains on {' or '.join(self.layouts)}, "
              f"got {run.data.layout!r}")


@dataclass
class NoiseSection(FamilySection):
    """Fields of every diffusion family: the noise schedule alpha(t) and the draw of t
    (``tdlm.schedules``; MDLM spec, 'Process and loss')."""
    schedule: str = opt("loglinear", "noise schedule alpha(t): loglinear | linear | cosine")
    eps: float = opt(1e-3, "alpha(1) = eps (1 - eps of the tokens noised at t = 1)")
    antithetic: bool = opt(True, "antithetic (stratified) t over the batch")
    train_t_min: float = opt(1e-3, "training draws t ~ U(train_t_min, 1) (MDLM's sampling_eps)")
    eval_t_min: float = opt(1e-3, "evaluation NELBO draws t ~ U(eval_t_min, 1) (MDLM: 1e-3)")

    def __post_init__(self) -> None:
        s = "family."
        choice(self, "schedule", SCHEDULES, section=s)
        check(EPS_MIN <= self.eps < 0.5, s + "eps", f"must be in [{EPS_MIN:g}, 0.5), got {self.eps}")
        for n in ("train_t_min", "eval_t_min"):
            v = getattr(self, n)
            check(isinstance(v, (int, float)) and 0.0 <= v < 0.5, s + n,
                  f"must be in [0, 0.5), got {v!r}")


_SECTIONS: dict[str, type] = {}


def register_section(cls: type) -> type:
    """Class decorator: makes a family section findable by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__}: a family section needs a name")
    _SECTIONS[cls.name] = cls
    return cls


def _discover() -> None:
    """Import ``tdlm.families.<name>.config`` for every family subpackage."""
    spec = importlib.util.find_spec("tdlm.families")
    if spec is None or not spec.submodule_search_locations:
        return
    for info in pkgutil.iter_modules(spec.submodule_search_locations):
        if info.ispkg:
            try:
                importlib.import_module(f"tdlm.families.{info.name}.config")
            except ModuleNotFoundError as e:
                if e.name != f"tdlm.families.{info.name}.config":
                    raise


def section_names() -> list[str]:
    _discover()
    return sorted(_SECTIONS)


def family_section(name: str) -> type:
    """The config section class of family ``name`` (a one-line error if there is none)."""
    if name not in _SECTIONS:
        _discover()
    if name not in _SECTIONS:
        raise ConfigError(f"invalid config value for 'family.name': {name!r} is not one of "
                          f"{', '.join(sorted(_SECTIONS))}")
    return _SECTIONS[name]
