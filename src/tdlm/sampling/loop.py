"""The ancestral loop shared by the absorbing-type samplers (MDLM, TDLM).

Reverse step (``reverse_step``): from t to s, each position still in the noised state moves
with probability ``p_move = (alpha_s - alpha_t) / (1 - alpha_t)`` and its destination class is
drawn from ``logp`` by float64 Gumbel-max. Random draws: one float64 uniform per position (the
move decision), then Gumbel noise for the moving rows only, so the cost is proportional to the
positions that move and the stream of draws is the same for any family with the same classes.

Loop (``AncestralLoop``): a family describes its time grid as a list of :class:`Step`
(model time input, ``p_move``, phase = tree level or 0) and gives three functions: which
positions are noised, the prediction ``log p_theta`` of a model at a step, and how a move is
applied. The loop owns what is common:

* which model predicts at step k (``plan[k]`` names it; one name everywhere = plain sampling,
  several = model scheduling);
* caching: the prediction made at step k is reused at step k+1 only if no position moved,
  the model ignores t (``reuse[name]``), the phase is the same **and the same model is named**
  (a cached prediction never crosses a model switch);
* counting: every forward pass actually made is recorded per model name with its batch shape
  (cache hits cost nothing), so FLOPs are computed from the calls made (``tdlm.flops``).

Random draws do not depend on the model or on caching, so the same seed gives the same stream
of uniforms; a one-model plan is bit-identical to the family's plain sampler.

Shared prefixes (optional, ``memo`` a :class:`PrefixMemo`): plans that name the same models
for steps 0..k, from the same start and generator seed, reach the same state after step k --
the draws do not depend on the plan. A memo keeps that state (z, the generator's state, the
forward calls made so far) keyed by the plan's first k+1 names, at the steps it is asked to
(``boundaries``, e.g. the ends of a segment search's segments) where no cached prediction is
pending (a cache would be a [B, L, V] tensor per state; time-conditioned models never cache),
and a later run with the same plan prefix resumes from the longest one it holds. The samples, and
the forward calls the log reports (those the plan makes, replayed), are bit-identical to a
run without it; only the work is saved. Not used while a trajectory is recorded.

Trajectory (optional, ``trajectory`` a list): the loop appends the starting state
(``"step": -1, "initial": True``) and the state after every step k, ``{"step": k, "t",
"p_move", "phase", "ids": z as nested lists}`` (:meth:`AncestralLoop.record`; a family
appends its final noise-removal state the same way). Recording only reads z: the samples are
bit-identical with and without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from .gumbel import gumbel_argmax


def reverse_step(noised: torch.Tensor, logp: torch.Tensor, p_move: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(move [B, L] bool, choice [n_move] class indices)``."""
    u = torch.rand(noised.shape, generator=generator, device=noised.device, dtype=torch.float64)
    move = noised & (u < p_move)
    if not move.any():
        return move, torch.empty(0, dtype=torch.long, device=noised.device)
    return move, gumbel_argmax(logp[move], generator)


@dataclass(frozen=True)
class Step:
    """One reverse step: ``t`` is the time value the family turns into the model's input
    (MDLM: global t; TDLM: local time u inside the level window), ``p_move`` the probability
    that a noised position moves, ``phase`` a label whose change invalidates the cache (TDLM:
    the tree level being denoised; MDLM: 0)."""
    t: float
    p_move: float
    phase: int = 0


@dataclass
class ForwardLog:
    """Forward passes actually made, per model name: ``calls[name]`` and the batch shapes
    ``shapes[name][(num, seq_len)] = count`` (what FLOPs are computed from), plus the step
    index of every call in order (``steps``: list of (step, name))."""
    calls: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)

    def record(self, name: str, k: int, shape: tuple) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        by = self.shapes.setdefault(name, {})
        by[tuple(shape)] = by.get(tuple(shape), 0) + 1
        self.steps.append((k, name))


class PrefixMemo:
    """States of an ancestral loop after step k keyed by the plan's names for steps 0..k
    (module docstring). One memo serves runs that differ only in their plan: the caller binds
    it to everything else (:meth:`bind`); ``boundaries`` is the set of step indices k after
    which states are kept (None: every step). ``hits`` counts resumed runs, ``skipped`` the
    steps they did not recompute, ``forwards_saved`` the forward passes not made."""

    def __init__(self, boundaries: Optional[Sequence[int]] = None):
        self.boundaries = None if boundaries is None else frozenset(int(b) for b in boundaries)
        self.context = None
        self._states: dict = {}
        self.hits = self.skipped = self.forwards_saved = 0

    def bind(self, context) -> None:
        """Tie the memo to one sampling setting (seed, batch, options...): a different one is
        an error, so states are never reused across settings."""
        if self.context is None:
            self.context = context
        elif self.context != context:
            raise ValueError("a PrefixMemo serves one sampling setting; this call differs in "
                             "more than its plan")

    def keeps(self, k: int) -> bool:
        return self.boundaries is None or k in self.boundaries

    def put(self, key: tuple, state: tuple) -> None:
        self._states.setdefault(key, state)

    def longest(self, plan: Sequence[str], lo: int, hi: int):
        """``(k, state)`` of the largest k in [lo, hi) whose plan prefix is held, else None."""
        for k in range(hi - 1, lo - 1, -1):
            st = self._states.get(tuple(plan[:k + 1]))
            if st is not None:
                return k, st
        return None

    def __len__(self) -> int:
        return len(self._states)


class AncestralLoop:
    """Runs ``steps`` reverse steps with per-step model choice and caching (module docstring).

    ``models``: name -> module; ``plan``: the model name for each step (``len(plan)`` must
    cover every step index the caller asks a prediction for: T steps, plus one for MDLM's
    final noise removal); ``reuse``: name -> whether that model's prediction may be reused
    while nothing changed; ``predict(model, z, step) -> logp`` (float64 log-probabilities over
    the classes ``choice`` indexes); ``on_forward(k)`` is called after every forward pass;
    ``trajectory`` (a list) receives the state after every step; ``memo`` (a
    :class:`PrefixMemo`) lets runs with a common plan prefix share it (module docstring)."""

    def __init__(self, models: Mapping[str, torch.nn.Module], plan: Sequence[str],
                 reuse: Mapping[str, bool], predict: Callable,
                 log: Optional[ForwardLog] = None, on_forward: Optional[Callable] = None,
                 trajectory: Optional[list] = None, memo: Optional[PrefixMemo] = None):
        missing = sorted(set(plan) - set(models))
        if missing:
            raise ValueError(f"plan names unknown models: {missing}")
        self.models, self.plan, self.reuse = models, list(plan), dict(reuse)
        self.predict, self.log, self.on_forward = predict, log, on_forward
        self.trajectory = trajectory
        self.memo = memo if trajectory is None else None
        self._logp: Optional[torch.Tensor] = None
        self._key = None                 # (model name, phase) of the cached prediction
        self._calls: list = []           # (name, k, shape) of every forward made (the memo's)

    def prediction(self, k: int, step: Step, z: torch.Tensor) -> torch.Tensor:
        """``log p_theta(. | z)`` of the model planned for step k: the cached one when it was
        made by the same model in the same phase and not invalidated since, else a forward."""
        name = self.plan[k]
        if self._logp is None or self._key != (name, step.phase):
            self._logp = self.predict(self.models[name], z, step)
            self._key = (name, step.phase)
            self._calls.append((name, k, tuple(z.shape)))
            if self.log is not None:
                self.log.record(name, k, tuple(z.shape))
            if self.on_forward:
                self.on_forward(k)
        return self._logp

    def run(self, z: torch.Tensor, steps: Sequence[Step], noised: Callable,
            apply: Callable, generator: torch.Generator, start: int = 0) -> torch.Tensor:
        """Steps ``start .. start+len(steps)-1`` of the plan. ``noised(z, step) -> [B, L] bool``
        (positions that may move); ``apply(model, z, move, choice) -> z`` writes the moves into
        a copy of z. The cache is dropped when a position moved or the model must not reuse."""
        if start == 0 and steps:
            self.record(-1, Step(steps[0].t, 0.0, steps[0].phase), z, initial=True)
        first = 0
        if self.memo is not None:
            got = self.memo.longest(self.plan, start, start + len(steps))
            if got is not None:
                k, (z, rng, calls) = got
                generator.set_state(rng)
                self._logp, self._key = None, None      # states are kept with no cache
                for name, kk, shape in calls[len(self._calls):]:
                    if self.log is not None:
                        self.log.record(name, kk, shape)
                self.memo.hits += 1
                self.memo.skipped += k + 1 - start
                self.memo.forwards_saved += len(calls) - len(self._calls)
                self._calls = list(calls)
                first = k + 1 - start
        for j, st in enumerate(steps[first:], first):
            k = start + j
            logp = self.prediction(k, st, z)
            move, choice = reverse_step(noised(z, st), logp, st.p_move, generator)
            moved = bool(move.any())
            if moved:
                z = apply(self.models[self.plan[k]], z, move, choice)
            if moved or not self.reuse[self.plan[k]]:
                self._logp = None
            self.record(k, st, z)
            if self.memo is not None and self._logp is None and self.memo.keeps(k):
                self.memo.put(tuple(self.plan[:k + 1]), (z, generator.get_state(),
                                                         list(self._calls)))
        return z

    def record(self, k: int, step: Step, z: torch.Tensor, **extra) -> None:
        """Append the state ``z`` after step ``k`` to the trajectory (when recording)."""
        if self.trajectory is not None:
            self.trajectory.append({"step": k, "t": step.t, "p_move": step.p_move,
                                    "phase": step.phase, **extra, "ids": z.tolist()})


def single_plan(model: torch.nn.Module, n: int, name: str = "model") -> tuple[dict, list]:
    """``(models, plan)`` for plain sampling with one model over ``n`` step indices."""
    return {name: model}, [name] * n


def resolve_plan(model: torch.nn.Module, steps: int, models: Optional[dict],
                 plan: Optional[list], time_conditioned: Optional[dict], cache: bool,
                 default_time_conditioned: bool) -> tuple[dict, list, dict]:
    """``(models, plan, reuse)`` for a sampler call: one model (``single_plan``) unless
    ``models``/``plan`` schedule several; ``plan`` must name a model per step; ``reuse[name]``
    says whether that model's prediction may be cached while nothing changes (only when
    ``cache`` and the model is not time-conditioned; ``time_conditioned`` overrides the
    config's ``default_time_conditioned`` per name)."""
    if models is None:
        models, plan = single_plan(model, steps)
    if len(plan) != steps:
        raise ValueError(f"plan has {len(plan)} entries for {steps} steps")
    tc = time_conditioned or {}
    reuse = {n: cache and not tc.get(n, default_time_conditioned) for n in models}
    return models, plan, reuse
