"""What every family's sampler takes and returns: typed options, a resolved model plan and one
result type (layer 2; the family contract is ``tdlm.families.base``).

* :class:`SampleOptions`: the options every sampler honours (steps, temperature, nucleus
  top-p, a clamped prefix). A family subclasses it with its own fields (MDLM: ``t_min``,
  ``cache``, ``noise_removal``, ``trajectory``; TDLM: ``steps_split``, ``trajectory``; DID:
  ``prompts``, ``trajectory``, ...);
  an option a family does not declare is a one-line :class:`ConfigError` (:func:`build_options`).
* :class:`StepPlan`: which model predicts at each step (model scheduling), already resolved
  to modules: ``models`` (name -> module), ``per_step`` (a name per step), and per model
  whether it is time-conditioned. A single model is ``StepPlan.single(model, steps)``.
* :class:`SampleResult`: ``ids`` [num, L_max] (rows shorter than L_max, as DID's ragged
  samples, are padded with ``PAD = -1`` after ``lengths[b]``), ``lengths`` [num], the
  optional ``trajectory`` (every step's sequences, where the family records them) and
  ``stats`` (forward calls, tokens forwarded, ...).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from ..errors import ConfigError

PAD = -1


@dataclass
class SampleOptions:
    """Options every family's sampler honours."""
    steps: int = 128                         # reverse steps (AR: ignored, one token per forward)
    temperature: float = 1.0                 # logits / temperature
    top_p: float = 1.0                       # nucleus sampling mass, in (0, 1]
    prefix: Optional[torch.Tensor] = None    # [num, k] token ids every sample starts with

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @classmethod
    def names(cls) -> frozenset:
        return frozenset(f.name for f in dataclasses.fields(cls))


def build_options(cls: type, family: str, **kw) -> SampleOptions:
    """``cls(**kw)``; an option ``cls`` does not declare is a one-line ConfigError naming the
    family and the options it takes."""
    unknown = sorted(set(kw) - cls.names())
    if unknown:
        raise ConfigError(f"sampling option(s) {', '.join(unknown)} do not apply to "
                          f"{family!r} models (options: {', '.join(sorted(cls.names()))})")
    return cls(**kw)


@dataclass
class StepPlan:
    """The model that predicts at each step, resolved to modules (see module docstring)."""
    models: Mapping[str, torch.nn.Module]
    per_step: Sequence[str]
    time_conditioned: Mapping[str, bool] = field(default_factory=dict)
    #: a ``tdlm.sampling.loop.PrefixMemo`` shared by runs that differ only in their plan
    memo: Optional[object] = None

    @classmethod
    def single(cls, model: torch.nn.Module, steps: int, name: str = "model") -> "StepPlan":
        return cls({name: model}, [name] * steps)


@dataclass
class SampleResult:
    """One type for every family's samples (see module docstring)."""
    ids: torch.Tensor
    lengths: torch.Tensor
    trajectory: Optional[list] = None
    stats: dict = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows, trajectory: Optional[list] = None,
                  stats: Optional[dict] = None) -> "SampleResult":
        """From a [num, L] tensor (every row full length) or a list of 1-D tensors (ragged)."""
        if isinstance(rows, torch.Tensor):
            lengths = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.long)
            return cls(rows, lengths, trajectory, dict(stats or {}))
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        width = int(lengths.max()) if len(rows) else 0
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.as_tensor(r, dtype=torch.long).cpu()
        return cls(ids, lengths, trajectory, dict(stats or {}))

    def sequences(self) -> list[list[int]]:
        """The samples as lists of token ids, each cut to its length."""
        return [row[:n].tolist() for row, n in zip(self.ids, self.lengths.tolist())]

    def rows(self):
        """What ``generate_ids`` returned before SampleResult: the [num, L] tensor when every
        row is full, else a list of 1-D tensors."""
        if bool((self.lengths == self.ids.shape[1]).all()):
            return self.ids
        return [row[:n] for row, n in zip(self.ids, self.lengths.tolist())]
