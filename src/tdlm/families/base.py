"""What every model family provides, and the registry that maps a config's family to it.

A family = a model builder + an objective (``loss``; with ``exact=True`` it is the
evaluation NELBO with exact weights) + a sampler, and it *declares* what shared code needs to
know (class attributes ``causal``, ``schedulable``, ``variable_length``, ``sample_options``;
methods ``describe``, ``process_signature``, ``phases``, ``noised_predictions``), so shared code
(training, evaluation, scheduling, CLI) never asks ``if family == ...``. Families are found by
importing every module of this package (no hard-coded list): a new family is a new module
that calls :func:`register`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..config import RunConfig
from ..errors import ConfigError


@dataclass
class LossTerms:
    """Per-sequence negative-ELBO terms in nats.

    ``nll[b]``: the (Monte-Carlo) NELBO of sequence b; ``n_tokens[b]``: tokens it is
    normalised by (non-padding tokens); ``parts``: named per-sequence components that sum to
    ``nll`` (e.g. per tree level)."""
    nll: torch.Tensor
    n_tokens: torch.Tensor
    parts: dict = field(default_factory=dict)

    def per_token(self) -> torch.Tensor:
        return self.nll.sum() / self.n_tokens.sum().clamp_min(1)


class Family:
    """Interface of a model family. Subclasses set ``name`` and implement the methods."""
    name = "base"
    is_diffusion = True
    discrete_time = False       # honours diffusion.num_timesteps (discrete-time NELBO)
    causal = False              # left-to-right model (can serve as a generative-PPL judge)
    schedulable = False         # may take part in a model-scheduling plan
    variable_length = False     # samples have varying lengths (length histograms are written)
    # the keyword options ``sample`` accepts (set by ``register`` from its signature): an
    # option a family does not take is a one-line error in ``Pipeline.generate_ids``
    sample_options: frozenset = frozenset()
    layouts: tuple = ("packed", "crop_pad", "packed_bos")   # data layouts it trains on

    def describe(self) -> dict:
        """Family-specific facts for ``tdlm info``, sample metadata and model cards."""
        return {}

    def process_signature(self) -> dict:
        """What two models must share, beyond vocabulary, schedule and length, to be mixed
        in one sampling plan (e.g. a tree)."""
        return {}

    def phases(self, steps: int, split=None):
        """Sampling steps per phase in sampling order (TDLM: per level, root first), or None
        for a single phase."""
        return None

    def noised_predictions(self, x0: torch.Tensor, valid: torch.Tensor, t: float,
                           generator: torch.Generator):
        """Noise ``x0`` once at time t and return ``(run, n)``: ``run(model)`` gives
        ``(log p_model [n, C], target [n])`` at the n noised, valid positions of that same
        z (step-importance analysis of model scheduling)."""
        raise ConfigError(f"step analysis is not available for the {self.name!r} family")

    def __init__(self, cfg: RunConfig, **resources):
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def counted(self, batch: dict, exact: bool) -> torch.Tensor:
        """[B, L] positions whose loss is counted: real tokens (``valid``); in training, every
        position when ``diffusion.train_on_padding`` is set (GIDD models the pads)."""
        x0 = batch["input_ids"]
        valid = batch.get("valid")
        if valid is None or (not exact and self.cfg.diffusion.train_on_padding):
            return torch.ones_like(x0, dtype=torch.bool)
        return valid

    def eval_conventions(self) -> dict:
        """How this family's evaluation number is computed, written beside it in
        ``metrics.json``: padding excluded from numerator and token count; for diffusion
        families the time draw (``diffusion.eval_t_min``; MDLM evaluates with t ~ U(1e-3, 1))."""
        out = {"padding": "excluded"}
        if self.is_diffusion:
            d = self.cfg.diffusion
            out["eval_t_min"] = d.eval_t_min
            out["t_convention"] = (f"discrete time, T={d.num_timesteps} steps drawn uniformly"
                                   if d.num_timesteps > 0 and self.discrete_time else
                                   f"t ~ U({d.eval_t_min:g}, 1)"
                                   + (", antithetic" if d.antithetic else ""))
        return out

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator,
             exact: bool = False) -> LossTerms:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, model: nn.Module, num: int, seq_len: int, steps: int,
               generator: torch.Generator, temperature: float = 1.0, top_p: float = 1.0,
               **kw) -> torch.Tensor:
        raise NotImplementedError

    def state_files(self) -> dict:
        """Extra artefacts saved with a checkpoint (e.g. a vocabulary tree): name -> writer."""
        return {}

    @classmethod
    def prepare(cls, cfg: RunConfig, data, run_dir) -> dict:
        """Build resources the family needs before training (e.g. a vocabulary tree from the
        corpus); returned as keyword arguments for ``__init__``."""
        return {}

    @classmethod
    def shape_resources(cls, cfg: RunConfig) -> dict:
        """Resources with the right shapes but no data, for counting parameters."""
        return {}

    @classmethod
    def resources_from_checkpoint(cls, ckpt) -> dict:
        """Load the resources saved by ``state_files`` back from a checkpoint."""
        return {}


_REGISTRY: dict[str, Callable[..., Family]] = {}


_SAMPLE_ARGS = {"self", "model", "num", "seq_len", "steps", "generator"}


def register(name: str):
    """Class decorator: registers a family under ``name`` and records the options its
    ``sample`` accepts (``sample_options``; a ``**kwargs`` catch-all is refused, so that no
    option is silently ignored)."""
    import inspect

    def deco(cls):
        params = inspect.signature(cls.sample).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            raise TypeError(f"family {name!r}: sample() must list its options (no **kwargs)")
        cls.sample_options = frozenset(params) - _SAMPLE_ARGS
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


def _discover() -> None:
    """Import every module and subpackage of this package (each registers its families)."""
    import importlib
    import pkgutil
    import sys
    pkg = sys.modules[__package__]
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "base":
            importlib.import_module(f"{__package__}.{info.name}")


def family_names(**declared) -> list[str]:
    """Registered family names, optionally only those with the given declarations
    (e.g. ``family_names(schedulable=True)``)."""
    _discover()
    return sorted(n for n, c in _REGISTRY.items()
                  if all(getattr(c, k) == v for k, v in declared.items()))


def get_family_class(name: str) -> type:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"model family {name!r} is not available; available: "
                          f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_family(cfg: RunConfig, **resources) -> Family:
    return get_family_class(cfg.model.family)(cfg, **resources)


def meta_family(cfg: RunConfig) -> tuple[Family, nn.Module]:
    """The family (with shape-only resources) and its model built on the meta device (no
    memory), for parameter counts and ``describe``."""
    cls = get_family_class(cfg.model.family)
    fam = cls(cfg, **cls.shape_resources(cfg))
    with torch.device("meta"):
        return fam, fam.build_model()


def meta_model(cfg: RunConfig) -> nn.Module:
    """The family's model built on the meta device (no memory), for parameter counts."""
    return meta_family(cfg)[1]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_ctx(device: torch.device, precision: str):
    """bf16 autocast on CUDA only; float32 elsewhere (bf16 matmuls are very slow on CPU)."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib
    return contextlib.nullcontext()

