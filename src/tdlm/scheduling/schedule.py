"""Model schedules: which model predicts at each of the T denoising steps.

A schedule is a value. It is written as a string and parsed by :func:`parse_schedule` into a
:class:`ScheduleSpec`, which :meth:`ScheduleSpec.resolve` turns into a :class:`ModelPlan` for a
given step count T and set of loaded model names. Step 0 is the first (noisiest) step.

Explicit segments: ``L125,H750,L125`` -- comma-separated ``<name><count>`` runs in sampling
order (``L:125`` is accepted too). At most one segment may omit its count and takes the
remaining steps (``L125,H,L125``); a single bare name (``H``) is every step. Counts must sum
to T exactly, names must be loaded models (names are letters, digits, ``_`` and ``-`` and must
not end in a digit, e.g. ``H``, ``heavy``, ``L_4blk``).

Named forms (two models: a *light* and a *heavy* one): ``FORM:AMOUNT`` where AMOUNT is the
light share as a fraction ``0 <= f <= 1`` (a number with a decimal point, ``0.25``) or a step
count (an integer, ``250``). A fraction becomes ``n_L = floor(f * T + 1/2)`` light steps
(round half up, so ``sandwich:0.25`` at T=1000 is exactly 250 light steps; ``n_L`` in [0, T]).

* ``light-first:f``  ``L n_L, H T-n_L``.
* ``light-last:f``   ``H T-n_L, L n_L``.
* ``sandwich:f``     ``L ceil(n_L/2), H T-n_L, L floor(n_L/2)`` (an odd light step goes first,
  to the noisiest end).
* ``light-middle:f`` ``H ceil((T-n_L)/2), L n_L, H floor((T-n_L)/2)``.
* ``random:f[:seed]`` n_L light steps chosen uniformly without replacement
  (``random.Random(seed).sample(range(T), n_L)``, seed 0 by default); the rest heavy.
* ``interleave:k``   step i is light iff ``i % k == 0`` (every k-th step from the first;
  ``ceil(T/k)`` light steps), k >= 1.
* ``levels:A,B,...`` (TDLM) one model name per tree level, root level first; each takes all
  steps of its level (the steps of a level are contiguous in the coarse-to-fine sampler).

Which model is light: ``light=``/``heavy=`` when given (one of them suffices with two models);
else the models named ``L`` and ``H`` when both are loaded; else, with exactly two models, the
one with fewer block FLOPs per forward (``cost``). Errors are one-line
:class:`tdlm.errors.ConfigError`.

Serialisation: ``ModelPlan.to_dict()`` (spec string, T, run-length segments, light/heavy names,
steps per model) and ``ModelPlan.from_dict``; ``str(schedule)`` is the run-length form
``L125,H750,L125``. MDLM's final noise-removal pass (when masks remain after the last step)
uses the model of the last step.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

from ..errors import ConfigError

NAMED = ("sandwich", "light-first", "light-last", "light-middle", "random", "interleave",
         "levels")
_NAME = r"[A-Za-z_](?:[A-Za-z0-9_-]*[A-Za-z_-])?"
_SEG = re.compile(rf"^({_NAME}):?(\d+)?$")


def light_steps_of(fraction: float, T: int) -> int:
    """``floor(f * T + 1/2)`` clamped to [0, T] (round half up)."""
    return min(T, max(0, math.floor(fraction * T + 0.5)))


@dataclass(frozen=True)
class ScheduleSpec:
    """A parsed, not yet resolved schedule: ``kind`` = ``explicit`` (``segments``: tuple of
    ``(name, count or None)``) or a named form with its ``amount`` / ``seed`` / ``names``."""
    text: str
    kind: str
    segments: tuple = ()
    amount: Optional[float] = None
    amount_is_fraction: bool = False
    seed: int = 0
    names: tuple = ()

    def model_names(self) -> set:
        """Model names the spec refers to explicitly (named forms: none but ``levels``)."""
        if self.kind == "explicit":
            return {n for n, _ in self.segments}
        if self.kind == "levels":
            return set(self.names)
        return set()

    def light_steps(self, T: int) -> int:
        """Light steps of a fraction/count form at T steps (rounding: module docstring)."""
        if self.amount_is_fraction:
            return light_steps_of(self.amount, T)
        n = int(self.amount)
        if n > T:
            raise ConfigError(f"schedule {self.text!r}: {n} light steps exceed the {T} steps")
        return n

    def resolve(self, steps: int, models: Iterable[str], light: Optional[str] = None,
                heavy: Optional[str] = None, level_steps: Optional[Sequence[int]] = None,
                cost: Optional[Mapping[str, float]] = None) -> "ModelPlan":
        """The per-step model names for ``steps`` steps and the loaded ``models``.
        ``level_steps``: steps per tree level, root first (TDLM; needed by ``levels:``);
        ``cost``: block FLOPs per forward of each model (tells light from heavy)."""
        models = list(models)
        if not models:
            raise ConfigError("no models loaded for the schedule")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
        T = steps
        unknown = sorted(self.model_names() - set(models))
        if unknown:
            raise ConfigError(f"schedule {self.text!r} names model(s) {', '.join(unknown)} that "
                              f"are not loaded; loaded: {', '.join(models)}")
        if self.kind == "explicit":
            return ModelPlan(self.text, T, _explicit(self, T))
        if self.kind == "levels":
            if level_steps is None:
                raise ConfigError(f"schedule {self.text!r}: 'levels:' applies to tree (tdlm) "
                                  "models only")
            if len(self.names) != len(level_steps):
                raise ConfigError(f"schedule {self.text!r} names {len(self.names)} model(s) but "
                                  f"the tree has {len(level_steps)} levels (root first)")
            if sum(level_steps) != T:
                raise ConfigError(f"level steps {list(level_steps)} do not sum to {T} steps")
            return ModelPlan(self.text, T, _merge(list(zip(self.names, level_steps))))
        L, H = _light_heavy(self.text, models, light, heavy, cost)
        if self.kind == "interleave":
            k = int(self.amount)
            segs = [(L if i % k == 0 else H, 1) for i in range(T)]
        elif self.kind == "random":
            nl = self.light_steps(T)
            chosen = set(random.Random(self.seed).sample(range(T), nl))
            segs = [(L if i in chosen else H, 1) for i in range(T)]
        else:
            nl = self.light_steps(T)
            nh = T - nl
            if self.kind == "light-first":
                segs = [(L, nl), (H, nh)]
            elif self.kind == "light-last":
                segs = [(H, nh), (L, nl)]
            elif self.kind == "sandwich":
                segs = [(L, (nl + 1) // 2), (H, nh), (L, nl // 2)]
            else:   # light-middle
                segs = [(H, (nh + 1) // 2), (L, nl), (H, nh // 2)]
        return ModelPlan(self.text, T, _merge(segs), light=L, heavy=H)


def _explicit(spec: ScheduleSpec, T: int) -> list:
    given = sum(c for _, c in spec.segments if c is not None)
    open_ = [i for i, (_, c) in enumerate(spec.segments) if c is None]
    if open_:
        rest = T - given
        if rest < 1:
            raise ConfigError(f"schedule {spec.text!r}: the fixed segments take {given} of the "
                              f"{T} steps, leaving {rest} for the open one")
        segs = [(n, rest if c is None else c) for n, c in spec.segments]
    else:
        if given != T:
            raise ConfigError(f"schedule {spec.text!r}: segments sum to {given} steps, but "
                              f"sampling uses {T} steps")
        segs = list(spec.segments)
    return _merge(segs)


def _merge(segs) -> list:
    """Run-length form: adjacent segments of the same model merged, empty ones dropped."""
    out: list = []
    for n, c in segs:
        if c <= 0:
            continue
        if out and out[-1][0] == n:
            out[-1] = (n, out[-1][1] + c)
        else:
            out.append((n, c))
    return out


def _light_heavy(text, models, light, heavy, cost=None) -> tuple[str, str]:
    if light is not None and heavy is None and len(models) == 2:
        heavy = next((m for m in models if m != light), None)
    if heavy is not None and light is None and len(models) == 2:
        light = next((m for m in models if m != heavy), None)
    if light is None and heavy is None:
        if "L" in models and "H" in models:
            light, heavy = "L", "H"
        elif len(models) == 2:
            a, b = models
            ca, cb = (cost or {}).get(a), (cost or {}).get(b)
            if ca is None or cb is None or ca == cb:
                raise ConfigError(f"schedule {text!r}: cannot tell the light from the heavy "
                                  f"model among {a}, {b} (same cost); name them L and H")
            light, heavy = (a, b) if ca < cb else (b, a)
        else:
            raise ConfigError(f"schedule {text!r} needs two models named L (light) and H "
                              f"(heavy); loaded: {', '.join(models)}")
    for role, v in (("light", light), ("heavy", heavy)):
        if v not in models:
            raise ConfigError(f"schedule {text!r}: {role} model {v!r} is not loaded; loaded: "
                              f"{', '.join(models)}")
    if light == heavy:
        raise ConfigError(f"schedule {text!r}: the light and heavy models are the same ({light})")
    return light, heavy


@dataclass
class ModelPlan:
    """Which model predicts at each sampling step (``tdlm.schedules.NoiseSchedule`` is the
    noise; ``tdlm.sampling.result.StepPlan`` is this plan bound to loaded modules). A resolved
    schedule: ``segments`` = run-length list of (model name, steps) summing to
    ``steps``; ``light``/``heavy`` are set for the named two-model forms."""
    spec: str
    steps: int
    segments: list = field(default_factory=list)
    light: Optional[str] = None
    heavy: Optional[str] = None

    def __post_init__(self):
        self.segments = [(str(n), int(c)) for n, c in self.segments]
        tot = sum(c for _, c in self.segments)
        if tot != self.steps or any(c < 1 for _, c in self.segments):
            raise ConfigError(f"schedule {self.spec!r}: segments {self} do not cover "
                              f"{self.steps} steps")

    def per_step(self) -> list[str]:
        """The model name of every step, in sampling order."""
        return [n for n, c in self.segments for _ in range(c)]

    def counts(self) -> dict:
        """Steps per model name."""
        out: dict = {}
        for n, c in self.segments:
            out[n] = out.get(n, 0) + c
        return out

    def names(self) -> list[str]:
        """Model names in order of first use."""
        seen: list = []
        for n, _ in self.segments:
            if n not in seen:
                seen.append(n)
        return seen

    def check_models(self, models: Iterable[str]) -> None:
        models = list(models)
        missing = sorted(set(self.names()) - set(models))
        if missing:
            raise ConfigError(f"schedule {self.spec!r} uses model(s) {', '.join(missing)} that "
                              f"are not loaded; loaded: {', '.join(models)}")

    def __str__(self) -> str:
        return ",".join(f"{n}{c}" for n, c in self.segments)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "steps": self.steps,
                "segments": [[n, c] for n, c in self.segments], "run_length": str(self),
                "light": self.light, "heavy": self.heavy, "steps_per_model": self.counts()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelPlan":
        try:
            return cls(d["spec"], int(d["steps"]), [tuple(s) for s in d["segments"]],
                       d.get("light"), d.get("heavy"))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"invalid saved schedule: {e}") from None

    @classmethod
    def single(cls, name: str, steps: int) -> "ModelPlan":
        return cls(name, steps, [(name, steps)])


def _amount(text: str, form: str, arg: str) -> tuple[float, bool]:
    if re.fullmatch(r"\d+", arg):
        return float(int(arg)), False
    try:
        v = float(arg)
    except ValueError:
        raise ConfigError(f"schedule {text!r}: {form} needs a light share like {form}:0.25 or a "
                          f"light step count like {form}:250, got {arg!r}") from None
    if math.isnan(v) or not (0.0 <= v <= 1.0):
        raise ConfigError(f"schedule {text!r}: the light fraction must be in [0, 1], got {arg}")
    return v, True


def parse_schedule(text: str) -> ScheduleSpec:
    """Parse a schedule string (module docstring) into a :class:`ScheduleSpec`."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("empty schedule; expected e.g. L125,H750,L125 or sandwich:0.25")
    s = "".join(text.split())
    head, _, rest = s.partition(":")
    if head in NAMED:
        if not rest:
            example = {"interleave": "interleave:4", "levels": "levels:L,H"}.get(
                head, f"{head}:0.25")
            raise ConfigError(f"schedule {text!r}: {head} needs an argument, e.g. {example}")
        if head == "levels":
            names = tuple(rest.split(","))
            for n in names:
                if not re.fullmatch(_NAME, n):
                    raise ConfigError(f"schedule {text!r}: {n!r} is not a model name")
            return ScheduleSpec(text, "levels", names=names)
        if head == "interleave":
            if not re.fullmatch(r"\d+", rest) or int(rest) < 1:
                raise ConfigError(f"schedule {text!r}: interleave needs an integer period >= 1, "
                                  "e.g. interleave:4")
            return ScheduleSpec(text, "interleave", amount=float(int(rest)))
        seed = 0
        if head == "random" and ":" in rest:
            rest, seed_s = rest.split(":", 1)
            if not re.fullmatch(r"\d+", seed_s):
                raise ConfigError(f"schedule {text!r}: the random seed must be an integer >= 0")
            seed = int(seed_s)
        amount, frac = _amount(text, head, rest)
        return ScheduleSpec(text, head, amount=amount, amount_is_fraction=frac, seed=seed)
    segs = []
    for part in s.split(","):
        m = _SEG.match(part)
        if not m:
            raise ConfigError(f"schedule {text!r}: cannot read segment {part!r}; expected "
                              f"<model><steps> like L125, or one of {', '.join(NAMED)}")
        n, c = m.group(1), m.group(2)
        if c is not None and int(c) < 1:
            raise ConfigError(f"schedule {text!r}: segment {part!r} has no steps")
        segs.append((n, int(c) if c is not None else None))
    if sum(c is None for _, c in segs) > 1:
        raise ConfigError(f"schedule {text!r}: at most one segment may omit its step count")
    return ScheduleSpec(text, "explicit", segments=tuple(segs))


def resolve_schedule(text: Optional[str], steps: int, models: Sequence[str],
                     light: Optional[str] = None, heavy: Optional[str] = None,
                     level_steps: Optional[Sequence[int]] = None,
                     cost: Optional[Mapping[str, float]] = None) -> ModelPlan:
    """Parse + resolve; with no text and one model, that model at every step."""
    if text is None:
        if len(models) != 1:
            raise ConfigError(f"{len(models)} models loaded ({', '.join(models)}): give a "
                              "schedule, e.g. --schedule sandwich:0.25")
        return ModelPlan.single(models[0], steps)
    return parse_schedule(text).resolve(steps, models, light, heavy, level_steps, cost)


def split_even(total: int, n_segments: int) -> list[int]:
    """``total`` steps cut into ``n_segments`` contiguous segments as equal as possible:
    ``floor(total / S)`` each and one more for the first ``total mod S`` segments."""
    if n_segments < 1 or n_segments > total:
        raise ConfigError(f"cannot cut {total} steps into {n_segments} segments")
    q, r = divmod(total, n_segments)
    return [q + (1 if i < r else 0) for i in range(n_segments)]


Schedule = ModelPlan            # deprecated name (``tdlm.schedules.NoiseSchedule`` is the noise)
