"""Models report their own parameter groups and FLOPs (torchtitan's rule), so that
counting never matches parameter *names*.

Protocol: a module of ``tdlm.nn`` that is a meaningful unit for counting implements

* ``param_groups() -> dict[str, list[nn.Parameter]]``: its parameters by group. The groups
  used by the library are ``embedding`` (input table), ``blocks`` (transformer blocks),
  ``head`` (output linear layers) and ``other`` (time embedding, final norms, adaLN of heads);
* ``flops(stats: SeqStats, head_out: int | None = None) -> dict[str, int]``: forward FLOPs of
  one pass over sequences with these statistics, by the same groups (``tdlm.flops`` states
  the convention). ``head_out`` is the number of outputs a model computes from its head when
  that is fewer than the head holds (MDLM never computes the [MASK] row); modules that are
  not heads ignore it.

:func:`parameter_groups` walks a model's children and unions the groups of the modules that
implement the protocol (it does not descend into them), so a model composed of a DiT and
heads of ``tdlm.nn`` is counted without code of its own. Parameters that no reporting module
claims (e.g. a family's extra linear layer) go to ``other``; every parameter ends in exactly
one group.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Union

import torch
import torch.nn as nn

GROUPS = ("embedding", "blocks", "head", "other")


class SeqStats(NamedTuple):
    """What FLOPs depend on in a batch of sequences of lengths l_1..l_B; ``cond_rows``: rows
    of the conditioning (time embedding, adaLN modulations) computed, None = one per
    sequence (a model without time input computes one row shared by all: ``tdlm.nn.dit``)."""
    sequences: int          # B
    tokens: int             # T = sum l_b
    sq_tokens: int          # S2 = sum l_b^2 (attention)
    cond_rows: Optional[int] = None

    @property
    def conditioning(self) -> int:
        """Rows of conditioning computed in the pass."""
        return self.sequences if self.cond_rows is None else self.cond_rows

    def shared_conditioning(self) -> "SeqStats":
        """The same batch with one conditioning row for all (none for an empty batch)."""
        return self._replace(cond_rows=min(1, self.sequences))


def seq_stats(lengths: Union[Iterable[int], torch.Tensor]) -> SeqStats:
    """``SeqStats`` of a sequence of lengths (ints, or a tensor of any shape)."""
    if isinstance(lengths, torch.Tensor):
        ls = [int(v) for v in lengths.reshape(-1).tolist()]
    else:
        ls = [int(v) for v in lengths]
    if any(v < 0 for v in ls):
        raise ValueError("sequence lengths must be >= 0")
    return SeqStats(len(ls), sum(ls), sum(v * v for v in ls))


def reporting_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost modules under (and including) ``model`` that implement
    ``param_groups``, in module order."""
    out = []

    def visit(m: nn.Module) -> None:
        if callable(getattr(m, "param_groups", None)):
            out.append(m)
            return
        for child in m.children():
            visit(child)

    visit(model)
    return out


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``{group: [parameters]}`` over the reporting modules of ``model``, with every parameter
    they do not claim in ``other``. Raises ValueError if a parameter is claimed twice or a
    module reports one that is not the model's."""
    mine = {id(p): p for p in model.parameters()}
    groups: dict[str, list] = {g: [] for g in GROUPS}
    seen: set = set()
    for m in reporting_modules(model):
        for g, ps in m.param_groups().items():
            for p in ps:
                if id(p) in seen or id(p) not in mine:
                    raise ValueError(f"{type(m).__name__}.param_groups reports a parameter "
                                     "twice or one that is not the model's")
                seen.add(id(p))
                groups.setdefault(g, []).append(p)
    groups["other"].extend(p for i, p in mine.items() if i not in seen)
    return groups


def count_parameters(model: nn.Module) -> dict:
    """Total, embedding (input table), head (output linear(s)), transformer-block and other
    parameter counts, from :func:`parameter_groups`; ``head_share`` = head / total."""
    n = {g: sum(p.numel() for p in ps) for g, ps in parameter_groups(model).items()}
    total = sum(n.values())
    return {"total": total, "embedding": n["embedding"], "head": n["head"],
            "blocks": n["blocks"], "other": n["other"], "head_share": n["head"] / total}


def model_flops(model: nn.Module, lengths, shared_conditioning: Optional[bool] = None) -> dict:
    """Forward FLOPs of ``model`` over sequences of the given lengths (one forward): the sum of
    its reporting modules' ``flops`` (``head_out`` from ``model.head_out`` when the model
    declares it). ``shared_conditioning``: whether the forward computed one conditioning row
    for all sequences (no time input, or one sigma for all); None = as the model's config says
    (no time input). Returns ``{"blocks", "embedding", "head", "other", "full", "tokens",
    "sequences"}``."""
    s = seq_stats(lengths)
    mods = reporting_modules(model)
    if not mods:
        raise ValueError("FLOPs need a model built from tdlm.nn modules (a DiT and a head)")
    head_out = getattr(model, "head_out", None)
    if shared_conditioning is None:
        shared_conditioning = any(getattr(m, "shared_conditioning", False) for m in mods)
    if shared_conditioning:
        s = s.shared_conditioning()
    out = {"blocks": 0, "embedding": 0, "head": 0, "other": 0}
    for m in mods:
        for g, v in m.flops(s, head_out=head_out).items():
            out[g] = out.get(g, 0) + v
    out["full"] = sum(out.values())
    out.update(tokens=s.tokens, sequences=s.sequences)
    return out
