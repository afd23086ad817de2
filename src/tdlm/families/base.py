"""The family contract and the registry that maps a config's family to its class.

A family (``families/<name>/``: ``config.py`` with its config section and sample options,
``family.py`` with its class, and the modules its math needs) provides a model builder, a
training objective (``loss``) and a separate evaluation bound (``nelbo``), both computed by
``objective`` under a :class:`Regime` naming the three things that differ between them (the
draw of t, whether padding is counted, exact or training weights), and a sampler
(``sample(model, num, seq_len, opts, generator, plan) -> SampleResult``). It *declares* what
shared code needs (``Config``, ``SampleOptions``, ``layouts``, ``causal``, ``schedulable``,
``variable_length``, ``is_diffusion``; ``describe``, ``process_signature``, ``phases``,
``noised_predictions``, ``eval_conventions``), so shared code never asks
``if family == ...``. Families are found by importing ``<subpackage>.family`` for every
subpackage of this package: a new family is a new folder.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Optional

import torch
import torch.nn as nn

from ..config import RunConfig
from ..errors import ConfigError
from ..nn.layout import PackedLayout
from ..sampling.result import SampleOptions, SampleResult, StepPlan


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


@dataclass(frozen=True)
class Regime:
    """What differs between the training objective and the evaluation NELBO.

    ``t_min``: t ~ U(t_min, 1) (``family.train_t_min`` / ``eval_t_min``); ``count_padding``:
    crop_pad padding positions are counted (GIDD trains on them; evaluation never counts
    them); ``exact_weights``: the ELBO weights as derived (evaluation), else the family's
    training weights (clipping, TDLM level multipliers, DID's simple weighting)."""
    name: str
    t_min: float
    count_padding: bool
    exact_weights: bool


class Family:
    """Interface of a model family. Subclasses set ``name`` and implement the methods."""
    name = "base"
    Config: ClassVar[type]                          # its config section (set by ``register``)
    SampleOptions: ClassVar[type] = SampleOptions   # its typed sampling options
    is_diffusion = True
    discrete_time = False       # honours family.num_timesteps (discrete-time NELBO)
    causal = False              # left-to-right model (can serve as a generative-PPL judge)
    schedulable = False         # may take part in a model-scheduling plan
    variable_length = False     # samples have varying lengths (length histograms are written)
    # the field names of ``SampleOptions`` (set by ``register``)
    sample_options: frozenset = frozenset()
    reports_forwards = False    # its sampler records forward passes in a ForwardLog
    # the ``sampling.options.PREFIX_CONVENTION`` at which this family's sampler last changed
    # how it shows a clamped prefix to the model: prefix-conditional results recorded under
    # an earlier convention are stale for it (TDLM: 2), not for a family that never changed
    prefix_convention = 1
    layouts: tuple = ("packed", "crop_pad", "packed_bos")   # data layouts it trains on
    # published checkpoint layouts this family imports (``tdlm convert --from NAME``):
    # NAME -> fn(state, hub_config, vocab_size) -> (RunConfig, state_dict, notes)
    importers: ClassVar[dict] = {}

    @staticmethod
    def detect_import(hub_config: dict, state: dict, vocab_size: int) -> Optional[str]:
        """Which of :attr:`importers` fits a published checkpoint (None: none of them)."""
        return None

    def describe(self) -> dict:
        """Family-specific facts for ``tdlm info``, sample metadata and model cards."""
        return {}

    def process_signature(self) -> dict:
        """What two models must share, beyond vocabulary, schedule and length, to be mixed
        in one sampling plan (e.g. a tree)."""
        return {}

    def state_labels(self, ids, counts=None, decode=None, top: int = 3) -> dict:
        """How a sampling trajectory's ids that are not tokens (``id >= vocab_size``) are
        shown: ``{id: {"label", "kind", ...}}`` for those in ``ids`` (MDLM: ``[MASK]``;
        TDLM: a tree node as its ``top`` most frequent member tokens by ``counts``, decoded
        with ``decode``). Default: none (the family's states are tokens)."""
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

    def regime(self, train: bool) -> Regime:
        """The training (``train=True``) or evaluation regime, from this family's section."""
        f = self.cfg.family
        return Regime("train" if train else "eval",
                      t_min=getattr(f, "train_t_min" if train else "eval_t_min", 0.0),
                      count_padding=train and getattr(f, "train_on_padding", False),
                      exact_weights=not train)

    def counted(self, batch: dict, regime: Regime) -> torch.Tensor:
        """[B, L] positions whose loss is counted: real tokens (``valid``), or every position
        when the regime counts padding (GIDD's training models the pads)."""
        x0 = batch["input_ids"]
        valid = batch.get("valid")
        if valid is None or regime.count_padding:
            return torch.ones_like(x0, dtype=torch.bool)
        return valid

    def eval_conventions(self) -> dict:
        """How this family's evaluation number is computed, written beside it in
        ``metrics.json``: padding excluded from numerator and token count; for diffusion
        families the time draw (``family.eval_t_min``; MDLM evaluates with t ~ U(1e-3, 1))."""
        out = {"padding": "excluded"}
        if self.is_diffusion:
            d = self.cfg.family
            T = getattr(d, "num_timesteps", 0)
            out["eval_t_min"] = d.eval_t_min
            out["t_convention"] = (f"discrete time, T={T} steps drawn uniformly"
                                   if T > 0 and self.discrete_time else
                                   f"t ~ U({d.eval_t_min:g}, 1)"
                                   + (", antithetic" if d.antithetic else ""))
        return out

    def objective(self, model: nn.Module, batch: dict, generator: torch.Generator,
                  regime: Regime) -> LossTerms:
        """Per-sequence NELBO terms of ``batch`` under ``regime``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator,
             exact: bool = False) -> LossTerms:
        """The training objective (``objective`` in the training regime). ``exact=True`` is
        the deprecated spelling of :meth:`nelbo`."""
        if exact:
            warnings.warn("Family.loss(exact=True) is deprecated: use Family.nelbo",
                          DeprecationWarning, stacklevel=2)
            return self.nelbo(model, batch, generator)
        return self.objective(model, batch, generator, self.regime(train=True))

    def nelbo(self, model: nn.Module, batch: dict, generator: torch.Generator) -> LossTerms:
        """The evaluation bound: exact weights, ``eval_t_min``, real tokens only."""
        return self.objective(model, batch, generator, self.regime(train=False))

    # ---- sampling -------------------------------------------------------------------------
    def run_sampler(self, model: nn.Module, num: int, seq_len: int, steps: int,
                    generator: torch.Generator):
        """The family's sampling algorithm with its options as keywords (no ``**kwargs``):
        a [num, L] tensor or a list of 1-D tensors. Shared code calls :meth:`sample`."""
        raise NotImplementedError

    @classmethod
    def _sampler_params(cls) -> frozenset:
        return frozenset(inspect.signature(cls.run_sampler).parameters) - _SAMPLE_ARGS

    @torch.no_grad()
    def sample(self, model: nn.Module, num: int, seq_len: int, opts=None,
               generator: Optional[torch.Generator] = None, plan: Optional[StepPlan] = None,
               *, log=None, on_forward: Optional[Callable] = None, **legacy) -> SampleResult:
        """``num`` samples of ``seq_len`` tokens (DID: the target length or the cap) under
        ``opts`` (this family's ``SampleOptions``; defaults when None) and an optional model
        ``plan`` (schedulable families). ``log`` (a ``ForwardLog``) records the forward
        passes made and ``on_forward(step)`` is called after each, where the sampler counts
        them. Deprecated form: ``sample(model, num, seq_len, steps, generator, **options)``
        returns what the sampler returns (a tensor, or DID's list of tensors)."""
        if opts is not None and not isinstance(opts, SampleOptions):
            return self._legacy_sample(model, num, seq_len, opts, generator,
                                       dict(legacy, plan=plan, log=log, on_forward=on_forward))
        if legacy:
            raise ConfigError(f"sample(): give options in {self.SampleOptions.__name__}, not as "
                              f"keywords ({', '.join(sorted(legacy))})")
        opts = self.SampleOptions() if opts is None else opts
        if not isinstance(opts, self.SampleOptions):
            raise ConfigError(f"{self.name} sampling takes {self.SampleOptions.__name__}, got "
                              f"{type(opts).__name__}")
        params = self._sampler_params()
        kw = {f.name: getattr(opts, f.name) for f in fields(opts) if f.name != "steps"}
        traj = [] if kw.pop("trajectory", False) else None
        if traj is not None:
            kw["trajectory"] = traj
        stats: dict = {}
        if "stats" in params:
            kw["stats"] = stats
        if plan is not None and not self.schedulable and len(plan.models) == 1:
            model, plan = next(iter(plan.models.values())), None     # a one-model plan
        if plan is not None:
            if not self.schedulable:
                raise ConfigError(f"{self.name!r} models cannot be mixed in a model plan")
            kw.update(models=dict(plan.models), plan=list(plan.per_step),
                      time_conditioned=dict(plan.time_conditioned))
            if plan.memo is not None:
                kw["memo"] = plan.memo
        for name, hook in (("log", log), ("on_forward", on_forward)):
            if hook is not None:
                if name not in params:
                    raise ConfigError(f"the {self.name!r} sampler does not report forward "
                                      f"passes ({name})")
                kw[name] = hook
        rows = self.run_sampler(model, num, seq_len, opts.steps, generator, **kw)
        return SampleResult.from_rows(rows, traj, stats)

    def _legacy_sample(self, model, num, seq_len, steps, generator, kw: dict):
        warnings.warn("Family.sample(model, num, seq_len, steps, generator, **options) is "
                      "deprecated: pass a SampleOptions", DeprecationWarning, stacklevel=3)
        kw = {k: v for k, v in kw.items() if v is not None}
        unknown = sorted(set(kw) - self._sampler_params())
        if unknown:
            raise ConfigError(f"sampling option(s) {', '.join(unknown)} do not apply to "
                              f"{self.name!r} models (options: "
                              f"{', '.join(sorted(self._sampler_params()))})")
        return self.run_sampler(model, num, seq_len, steps, generator, **kw)

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
    """Class decorator: registers a family under ``name``, attaches its config section
    (``Config``, from ``families/<name>/config.py``) and the layouts it declares, and checks
    that its ``run_sampler`` lists its options (no ``**kwargs`` catch-all) and takes every
    field of its ``SampleOptions``, so that no option is silently ignored."""
    from ..config import family_section

    def deco(cls):
        params = inspect.signature(cls.run_sampler).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            raise TypeError(f"family {name!r}: run_sampler() must list its options (no **kwargs)")
        ignored = sorted(cls.SampleOptions.names() - {"steps"} - set(params))
        if ignored:
            raise TypeError(f"family {name!r}: run_sampler() does not take option(s) {ignored}")
        cls.sample_options = cls.SampleOptions.names()
        cls.reports_forwards = "log" in params
        cls.Config = family_section(name)
        cls.layouts = cls.Config.layouts
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


def _discover() -> None:
    """Import ``<subpackage>.family`` for every subpackage of this package (each registers
    its family): a new family is a new folder, no list to edit."""
    import importlib
    import pkgutil
    import sys
    pkg = sys.modules[__package__]
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.ispkg:
            importlib.import_module(f"{__package__}.{info.name}.family")


def family_names(**declared) -> list[str]:
    """Registered family names, optionally only those with the given declarations
    (e.g. ``family_names(schedulable=True)``)."""
    _discover()
    return sorted(n for n, c in _REGISTRY.items()
                  if all(getattr(c, k) == v for k, v in declared.items()))


def importer_for(source: str) -> tuple[str, Callable]:
    """``(family name, fn)`` of the family that imports published checkpoints of layout
    ``source`` (:attr:`Family.importers`); one-line ConfigError when none does."""
    _discover()
    found = {src: (n, c.importers[src]) for n, c in _REGISTRY.items() for src in c.importers}
    if source not in found:
        raise ConfigError(f"no family imports {source!r} checkpoints; known: "
                          f"{', '.join(sorted(found)) or 'none'}")
    return found[source]


def detect_import(hub_config: dict, state: dict, vocab_size: int) -> Optional[str]:
    """The published layout a family recognises in a checkpoint (``tdlm convert --from
    auto``), or None."""
    _discover()
    for cls in _REGISTRY.values():
        found = cls.detect_import(hub_config, state, vocab_size)
        if found is not None:
            return found
    return None


def get_family_class(name: str) -> type:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"model family {name!r} is not available; available: "
                          f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_family(cfg: RunConfig, **resources) -> Family:
    return get_family_class(cfg.family.name)(cfg, **resources)


def meta_family(cfg: RunConfig) -> tuple[Family, nn.Module]:
    """The family (with shape-only resources) and its model built on the meta device (no
    memory), for parameter counts and ``describe``."""
    cls = get_family_class(cfg.family.name)
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



# ---- ragged (varlen) batches -------------------------------------------------------------------
def packed_layout(batch: dict, causal: bool = False) -> Optional[PackedLayout]:
    """The ``PackedLayout`` of a ragged batch (``cu_seqlens`` given: ``input_ids`` holds the T
    tokens of B sequences without padding, the ``varlen`` layout), None for a dense batch."""
    cu = batch.get("cu_seqlens")
    if cu is None:
        return None
    return PackedLayout(cu.to(batch["input_ids"].device), causal=causal)


def per_sequence(values: torch.Tensor, layout: Optional[PackedLayout]) -> torch.Tensor:
    """Per-token ``values`` summed per sequence: [B, L] -> [B] (dense), [T] -> [B] (packed)."""
    if layout is None:
        return values.sum(-1)
    out = torch.zeros(layout.B, dtype=values.dtype, device=values.device)
    return out.index_add_(0, layout.seq_id, values)


def per_token(values: torch.Tensor, layout: Optional[PackedLayout]) -> torch.Tensor:
    """Per-sequence ``values`` [B] as per-token values: [B] (dense, broadcast by the caller)
    or [T] (packed)."""
    return values if layout is None else values[layout.seq_id]
