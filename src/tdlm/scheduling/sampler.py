"""Scheduled sampling: several loaded models, one ancestral loop, a schedule picks the model
of every step (spec: shared/spec/MODEL_SCHEDULING.md).

``ScheduledSampler({"H": heavy_pipe, "L": light_pipe})`` checks that the models can be mixed
(:func:`check_compatible`) and samples with ``generate_ids(num, steps, schedule=...)``, which
runs the family's own sampler (MDLM or TDLM) with the per-step plan of the schedule, so with a
one-model schedule the output is bit-identical to ``Pipeline.generate_ids`` at the same seed.
The loop never reuses a cached prediction across a model switch (``tdlm.sampling.loop``).

Cost report (``last_report``): forward calls actually made per model, their FLOPs
(``tdlm.flops``: block-only = the paper's convention, and full), the FLOPs the heavy model
alone would have spent on the same calls, the saved fractions
``saved = 1 - FLOPs(scheduled) / FLOPs(heavy on every call made)``, and wall-clock seconds.
With the sandwich of 250 light steps of 1000 and a light model of 4 blocks next to 12 of the
same width (no cache hits): ``saved_blocks = 250/1000 * (1 - 4/12) = 16.7%``.
"""
from __future__ import annotations

import time
from typing import Mapping, Optional, Sequence

import torch

from ..config.sections import BOS_LED_LAYOUTS
from ..errors import ConfigError
from ..flops import flops_from_log, model_forward_flops
from ..sampling.loop import ForwardLog, PrefixMemo
from ..sampling.result import SampleResult, StepPlan
from .schedule import ModelPlan, parse_schedule, resolve_schedule


def _fingerprint(v):
    """A comparable stand-in for sampling arguments (tensors by shape, dtype and bytes)."""
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        return ("tensor", tuple(t.shape), str(t.dtype), hash(t.numpy().tobytes()))
    if isinstance(v, (list, tuple)):
        return tuple(_fingerprint(x) for x in v)
    return v


def compatibility_key(pipe) -> dict:
    """What models must share to be mixed in one sampling run: family (diffusion type),
    its noise process (schedule, eps, and what the family's ``process_signature`` adds, e.g.
    a tree and its level windows), tokenizer (vocabulary hash),
    vocabulary size (so the [MASK] id), sequence length. Depth, width, heads and time
    conditioning may differ."""
    c = pipe.cfg
    tok = pipe.tokenizer
    key = {"family": c.family.name, "vocab_size": c.backbone.vocab_size,
           "mask_id": getattr(pipe.family, "mask_id", None),
           "seq_len": c.data.seq_len, "noise schedule": getattr(c.family, "schedule", None),
           "eps": getattr(c.family, "eps", None),
           "tokenizer": getattr(tok, "vocab_hash", lambda: getattr(tok, "name", None))()}
    key.update(pipe.family.process_signature())
    return key


def check_compatible(pipes: Mapping[str, object]) -> None:
    """ConfigError (one line) naming the first property two models do not share."""
    if not pipes:
        raise ConfigError("no models given")
    names = list(pipes)
    for n in names if len(names) > 1 else ():      # one model: a one-model plan, any family
        if not pipes[n].family.schedulable:
            from ..families.base import family_names
            raise ConfigError(f"model {n!r} is a {pipes[n].cfg.family.name!r} model; model "
                              f"scheduling applies to "
                              f"{', '.join(family_names(schedulable=True))} models")
    ref = compatibility_key(pipes[names[0]])
    for n in names[1:]:
        k = compatibility_key(pipes[n])
        for field in ref:
            if k.get(field) != ref[field]:
                shown = ("differs" if field in ("tree", "tokenizer") else
                         f"{ref[field]!r} vs {k.get(field)!r}")
                raise ConfigError(f"models {names[0]!r} and {n!r} cannot be mixed: {field} "
                                  f"{shown}")
    devs = {str(p.device) for p in pipes.values()}
    if len(devs) > 1:
        raise ConfigError(f"models are on different devices: {', '.join(sorted(devs))}")


class ScheduledSampler:
    """Name -> :class:`tdlm.api.Pipeline`; samples under a schedule (module docstring)."""

    def __init__(self, pipes: Mapping[str, object]):
        check_compatible(pipes)
        self.pipes = dict(pipes)
        self.names = list(self.pipes)
        self.last_report: Optional[dict] = None

    @property
    def primary(self):
        return self.pipes[self.names[0]]

    @property
    def tokenizer(self):
        return self.primary.tokenizer

    @property
    def cfg(self):
        return self.primary.cfg

    def block_cost(self, seq_len: Optional[int] = None) -> dict:
        """Block FLOPs of one forward of one sequence, per model (light/heavy ordering);
        None for a model that is not a library DiT model (e.g. an exact test denoiser)."""
        L = seq_len or self.cfg.data.seq_len
        out = {}
        for n, p in self.pipes.items():
            try:
                out[n] = model_forward_flops(p.model, [L])["blocks"]
            except ValueError:
                out[n] = None
        return out

    def resolve(self, schedule, steps: int, light: Optional[str] = None,
                heavy: Optional[str] = None, steps_split: Optional[Sequence[int]] = None
                ) -> ModelPlan:
        """A ModelPlan for ``steps`` steps from a string, a ModelPlan or None (one model)."""
        if isinstance(schedule, ModelPlan):
            if schedule.steps != steps:
                raise ConfigError(f"schedule {schedule.spec!r} covers {schedule.steps} steps, "
                                  f"sampling uses {steps}")
            schedule.check_models(self.names)
            return schedule
        level_steps = self.primary.family.phases(steps, steps_split)
        return resolve_schedule(schedule, steps, self.names, light, heavy, level_steps,
                                self.block_cost())

    @torch.no_grad()
    def sample(self, num: int = 1, steps: int = 128, schedule=None, seed: int = 0,
               light: Optional[str] = None, heavy: Optional[str] = None,
               steps_split: Optional[Sequence[int]] = None, memo: Optional[PrefixMemo] = None,
               **kw) -> SampleResult:
        """Samples under ``schedule`` (string, ModelPlan, or None for a single loaded model):
        the plan is resolved to a ``StepPlan`` and run by the first model's pipeline
        (``Pipeline.sample``; the models share the family's process). ``steps_split``: TDLM
        steps per level, leaf level first (as the family's ``steps_per_level``). Other
        keywords as ``Pipeline.sample`` (seq_len, temperature, top_p, prefix, cache, ...).
        ``memo`` (a ``tdlm.sampling.loop.PrefixMemo``): calls that differ only in their
        schedule resume from the state the longest common plan prefix reached (same samples
        and forward-call report; a call with other settings is an error). The cost report
        is left in ``self.last_report``."""
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
        sched = self.resolve(schedule, steps, light, heavy, steps_split)
        used = sched.names()
        plan = StepPlan({n: self.pipes[n].model for n in used}, sched.per_step(),
                        {n: self.pipes[n].cfg.backbone.time_conditioning for n in used})
        if memo is not None:
            memo.bind(_fingerprint((num, steps, seed, steps_split, sorted(kw.items()),
                                    sorted((n, id(p.model)) for n, p in self.pipes.items()))))
            plan.memo = memo
        log = ForwardLog()
        if steps_split is not None:
            kw["steps_split"] = list(steps_split)
        t0 = time.perf_counter()
        res = self.primary.sample(num, steps, seed=seed, plan=plan,
                                  log=log if self.primary.family.reports_forwards else None, **kw)
        seconds = time.perf_counter() - t0
        self.last_report = self.report(sched, log, seconds, heavy=heavy)
        return res

    def generate_ids(self, num: int = 1, steps: int = 128, **kw) -> torch.Tensor:
        """Token ids [num, seq_len] of :meth:`sample`."""
        return self.sample(num, steps, **kw).rows()

    def generate(self, num: int = 1, steps: int = 128, **kw) -> list[str]:
        return [self.tokenizer.decode(ids) for ids in self.sample(num, steps, **kw).sequences()]

    def report(self, sched: ModelPlan, log: ForwardLog, seconds: float,
               heavy: Optional[str] = None) -> dict:
        """Calls, FLOPs (blocks, full), heavy-only reference on the same calls, savings.
        The reference model: the plan's heavy one (named forms), else ``heavy`` (as passed to
        :meth:`sample`), else the loaded model with the most block FLOPs per call -- loaded,
        not only used: ``"L"`` alone with ``L`` and ``H`` loaded saves ``1 - cost_L / cost_H``
        of the block FLOPs, not 0. FLOPs are None when a model is not a library DiT model, and
        call counts too when the family's sampler does not record forward passes (it reports
        its own in the stats)."""
        models = {n: p.model for n, p in self.pipes.items()}
        counted = self.primary.family.reports_forwards
        out = {"schedule": sched.to_dict(), "forward_calls": dict(log.calls) if counted else None,
               "forward_calls_total": sum(log.calls.values()) if counted else None,
               "seconds": seconds, "flops": None, "reference": None, "saved_blocks": None,
               "saved_full": None}
        cost = self.block_cost()
        if not counted or any(cost[n] is None for n in sched.names()):
            return out
        fl = flops_from_log(log, models)
        heavy = sched.heavy or heavy
        if heavy is None:                     # the loaded model with the most block FLOPs per call
            known = [n for n in self.names if cost[n] is not None]
            heavy = max(known, key=lambda n: (cost[n], -self.names.index(n)))
        ref = {"blocks": 0, "full": 0}
        for shapes in log.shapes.values():
            for (num, L), cnt in shapes.items():
                f = model_forward_flops(models[heavy], [L] * num)
                ref["blocks"] += cnt * f["blocks"]
                ref["full"] += cnt * f["full"]
        saved = {k: (1 - fl[k] / ref[k]) if ref[k] else 0.0 for k in ("blocks", "full")}
        out.update({"flops": {"blocks": fl["blocks"], "full": fl["full"],
                              "per_model": fl["per_model"]},
                    "reference": {"model": heavy, **ref},
                    "saved_blocks": saved["blocks"], "saved_full": saved["full"]})
        return out


def load_scheduled(paths: Mapping[str, str], device: str = "cpu", use_ema: bool = True
                   ) -> ScheduledSampler:
    """Load checkpoints by name (``{"H": "runs/heavy", "L": "runs/light"}``)."""
    from ..pipeline import load
    for n in paths:
        try:
            parse_schedule(n)
        except ConfigError:
            raise ConfigError(f"invalid model name {n!r}: use letters, digits, _ or -, not "
                              "ending in a digit (e.g. H, L, heavy)") from None
        if parse_schedule(n).kind != "explicit":
            raise ConfigError(f"invalid model name {n!r}: it is a schedule form")
    return ScheduledSampler({n: load(p, device=device, use_ema=use_ema)
                             for n, p in paths.items()})


# ---- prefixes from held-out documents ------------------------------------------------------
def prefixes_from_validation(pipe, num: int, k: int, skip: int = 0) -> tuple[torch.Tensor, list]:
    """The first ``k`` tokens of the first ``num`` validation documents (the run's own split
    of its data source, in split order, after ``skip`` documents) that have more than ``k``
    tokens. BOS-led layouts (crop_pad, packed_bos, varlen) get ``[BOS]`` in front, as in
    training, so the clamped prefix is then k+1 tokens. Returns ``(prefix [num, k'], info)``
    with ``info[i] = {"doc": index in the validation split, "reference": the document's
    next tokens up to the sequence length}``."""
    from ..data.sources import load_documents, split_documents
    if k < 1:
        raise ConfigError(f"prefix length must be >= 1, got {k}")
    cfg = pipe.cfg
    bos = cfg.data.layout in BOS_LED_LAYOUTS
    if k + int(bos) >= cfg.data.seq_len:
        raise ConfigError(f"prefix of {k} tokens leaves nothing to generate at seq_len "
                          f"{cfg.data.seq_len}")
    docs, _ = load_documents(cfg.data.source, cfg.data.text_field)
    _, val = split_documents(docs, cfg.data.val_fraction, cfg.data.split_seed)
    tok = pipe.tokenizer
    rows, info = [], []
    for i in range(skip, len(val)):
        ids = tok.encode(val[i])
        if len(ids) <= k:
            continue
        lead = [tok.bos_id] if bos else []
        rows.append(lead + ids[:k])
        info.append({"doc": i, "reference_ids": ids[k:cfg.data.seq_len - len(lead)]})
        if len(rows) == num:
            break
    if len(rows) < num:
        raise ConfigError(f"the validation split has only {len(rows)} documents longer than "
                          f"{k} tokens; {num} needed")
    return torch.tensor(rows, dtype=torch.long), info
