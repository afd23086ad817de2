"""Where does the light model hurt? Step-importance analysis and the segment search.

**Step importance** (:func:`analyze_steps`, ``tdlm schedule analyze``). For a grid of noise
levels t_i (midpoints of ``grid`` equal bins of (0, 1]), validation sequences x are noised
once, z ~ q(z_t | x), and the *same* z goes to both models. Over the noised positions M
(MDLM: masked; TDLM: positions whose node moved to its parent at level h(t)):

    loss_m(t)   = mean_{i in M} -log p_m(x_i | z)        (TDLM: the child on x's path)
    gap(t)      = loss_light(t) - loss_heavy(t)            (+ its standard error over positions,
                  as if independent: positions of one sequence share z, so it is a lower bound)
    KL_HL(t)    = mean_{i in M} KL(p_heavy(. | z)_i || p_light(. | z)_i)
    KL_LH(t)    = mean_{i in M} KL(p_light(. | z)_i || p_heavy(. | z)_i)

``step_fraction = 1 - t`` places t on the sampler's clock (0 = first step, all noise).
Variant on the heavy model's own sampling trajectories (:func:`analyze_trajectories`): the
heavy model samples (no cache); at every step, the light model sees the same z and KL both ways
and top-1 agreement are averaged over the positions still noised.

**Segment search** (:func:`segment_search`, ``tdlm schedule search``). T steps are cut into S
contiguous segments (``split_even``); every assignment of the light model to a set of segments
(all sets of a given size, or all 2^S) is sampled with the same seeds (common random numbers:
schedules differ only by the model used, not by the random draws) and scored by a judge (gen
PPL, entropy); block and full FLOPs saved come from the forward calls made. The frontier holds
the schedules not dominated in (saved block FLOPs up, gen PPL down).
"""
from __future__ import annotations

import csv
import itertools
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from ..sampling.result import StepPlan
from .sampler import check_compatible
from .schedule import ModelPlan, split_even


# ---- per-t loss / KL on held-out data ----------------------------------------------------------
def _log_probs_on_noised(pipe, x0, valid, t: float, gen):
    """Draw z ~ q(z_t | x0) once (with ``pipe``'s family) and return ``(run, n)``: ``run(model)``
    gives ``(log p_model [n, C], target [n])`` at the n noised positions of that same z, so
    both models are evaluated on identical inputs (``Family.noised_predictions``)."""
    return pipe.family.noised_predictions(x0, valid, t, gen)


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p || q) from log-probabilities (classes with p = 0 contribute 0)."""
    p = lp.exp()
    d = torch.where(p > 0, lp - lq, torch.zeros_like(lp))
    return (p * d).sum(-1)


@torch.no_grad()
def analyze_steps(heavy, light, grid: int = 20, batches: int = 4, batch_size: int = 16,
                  seed: int = 0) -> list[dict]:
    """Rows ``{t, step_fraction, noised, loss_heavy, loss_light, gap, gap_se, kl_heavy_light,
    kl_light_heavy}`` for t on a grid (module docstring), on the first validation batches."""
    from ..data import BatchIterator, build_data
    if grid < 1 or batches < 1 or batch_size < 1:
        raise ConfigError("grid, batches and batch size must be >= 1")
    check_compatible({"heavy": heavy, "light": light})   # the light model reads heavy's z
    data = build_data(heavy.cfg.data, None, tokenizer=heavy.tokenizer, need_train=False)
    val = data.val
    n_b = min(batches, math.ceil(len(val) / batch_size))
    it = BatchIterator(val, batch_size, seed, start_batch=0, shuffle=False)
    dev = heavy.device
    bs = []
    for bi in range(n_b):
        keep = min(batch_size, len(val) - bi * batch_size)
        b = next(it)
        x = b["input_ids"][:keep].to(dev)
        bs.append((x, b.get("valid", torch.ones_like(b["input_ids"], dtype=torch.bool))[:keep]
                   .to(dev)))
    heavy.model.eval()
    light.model.eval()
    rows = []
    for i in range(grid):
        t = (i + 0.5) / grid
        acc = {"n": 0, "lh": 0.0, "ll": 0.0, "g2": 0.0, "klhl": 0.0, "kllh": 0.0}
        for bi, (x, valid) in enumerate(bs):
            gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + i * 1009 + bi)
            run, n = _log_probs_on_noised(heavy, x, valid, t, gen)
            if n == 0:
                continue
            lph, tgt = run(heavy.model)
            lpl, _ = run(light.model)
            ceh = -lph.gather(-1, tgt[:, None]).squeeze(-1).double()
            cel = -lpl.gather(-1, tgt[:, None]).squeeze(-1).double()
            acc["n"] += n
            acc["lh"] += float(ceh.sum())
            acc["ll"] += float(cel.sum())
            acc["g2"] += float(((cel - ceh) ** 2).sum())
            acc["klhl"] += float(_kl(lph.double(), lpl.double()).sum())
            acc["kllh"] += float(_kl(lpl.double(), lph.double()).sum())
        n = acc["n"]
        if n == 0:
            rows.append({"t": t, "step_fraction": 1 - t, "noised": 0})
            continue
        gap = (acc["ll"] - acc["lh"]) / n
        var = max(acc["g2"] / n - gap ** 2, 0.0)
        rows.append({"t": t, "step_fraction": 1 - t, "noised": n,
                     "loss_heavy": acc["lh"] / n, "loss_light": acc["ll"] / n, "gap": gap,
                     "gap_se": math.sqrt(var / n), "kl_heavy_light": acc["klhl"] / n,
                     "kl_light_heavy": acc["kllh"] / n})
    return rows


class _Probe(torch.nn.Module):
    """Wraps the heavy model: returns its output and, on the same input, records KL both ways
    and top-1 agreement with the light model over the positions still noised."""

    def __init__(self, pipe, heavy, light, records):
        super().__init__()
        self.pipe, self.heavy, self.light, self.records = pipe, heavy, light, records
        self.dummy = torch.nn.Parameter(torch.zeros(1, device=pipe.device))

    def forward(self, z, sigma=None, level=None):
        fam = self.pipe.family
        if level is None:
            out_h, out_l = self.heavy(z, sigma), self.light(z, sigma)
            noised = z == fam.mask_id
            cut = fam.mask_id
        else:
            out_h, out_l = self.heavy(z, sigma, level), self.light(z, sigma, level)
            noised = fam.height.to(z.device)[z] == (level[:, None] + 1)
            cut = out_h.shape[-1]
        if bool(noised.any()):
            lph = torch.log_softmax(out_h.double()[..., :cut][noised], -1)
            lpl = torch.log_softmax(out_l.double()[..., :cut][noised], -1)
            self.records.append({"noised": int(noised.sum()),
                                 "kl_heavy_light": float(_kl(lph, lpl).mean()),
                                 "kl_light_heavy": float(_kl(lpl, lph).mean()),
                                 "top1_agreement": float((lph.argmax(-1) == lpl.argmax(-1))
                                                         .double().mean())})
        else:
            self.records.append({"noised": 0})
        return out_h

    def child(self, node, r):
        return self.heavy.child(node, r)


@torch.no_grad()
def analyze_trajectories(heavy, light, num: int = 8, steps: int = 64, seed: int = 0) -> list[dict]:
    """Per sampling step of the heavy model: KL both ways and top-1 agreement on its own z_t."""
    check_compatible({"heavy": heavy, "light": light})
    records: list = []
    probe = _Probe(heavy, heavy.model, light.model, records)
    ts: list = []
    heavy.sample(num, steps, seed=seed, plan=StepPlan({"probe": probe}, ["probe"] * steps),
                 cache=False, on_forward=ts.append)
    step_t = [st.t for st in heavy.family.sample_steps(steps)]
    rows = []
    for k, rec in zip(ts, records):
        if k >= steps:              # MDLM's final noise-removal pass
            continue
        rows.append({"step": k, "step_fraction": k / steps, "t_input": step_t[k], **rec})
    return rows


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    keys: list = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    from ..utils.io import atomic_write_text
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def plot_analysis(rows, traj_rows, path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r.get("noised")]
    x = [r["step_fraction"] for r in ok]
    fig, ax = plt.subplots(1, 3 if traj_rows else 2, figsize=(15 if traj_rows else 10, 3.8))
    ax[0].plot(x, [r["loss_heavy"] for r in ok], "o-", label="heavy")
    ax[0].plot(x, [r["loss_light"] for r in ok], "s-", label="light")
    ax0b = ax[0].twinx()
    ax0b.errorbar(x, [r["gap"] for r in ok], yerr=[2 * r["gap_se"] for r in ok], color="C3",
                  fmt="^--", label="gap (light - heavy), 2 s.e.")
    ax[0].set_xlabel("sampling progress 1 - t (0 = all masked)")
    ax[0].set_ylabel("masked-token loss (nats)")
    ax0b.set_ylabel("gap (nats)", color="C3")
    ax[0].legend(loc="upper left", fontsize=8)
    ax0b.legend(loc="upper right", fontsize=8)
    ax[1].plot(x, [r["kl_heavy_light"] for r in ok], "o-", label="KL(heavy || light)")
    ax[1].plot(x, [r["kl_light_heavy"] for r in ok], "s-", label="KL(light || heavy)")
    ax[1].set_xlabel("sampling progress 1 - t")
    ax[1].set_ylabel("nats / noised position")
    ax[1].legend(fontsize=8)
    ax[1].set_title("same noised validation input")
    if traj_rows:
        tr = [r for r in traj_rows if r.get("noised")]
        xs = [r["step_fraction"] for r in tr]
        ax[2].plot(xs, [r["kl_heavy_light"] for r in tr], label="KL(heavy || light)")
        ax[2].plot(xs, [r["kl_light_heavy"] for r in tr], label="KL(light || heavy)")
        ax[2].set_xlabel("sampling step / T")
        ax[2].set_title("heavy model's own trajectories")
        ax[2].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- segment search ------------------------------------------------------------------------------
def segment_schedules(steps: int, segments: int, light_segments: Optional[int],
                      light: str = "L", heavy: str = "H", extra_masks: Sequence[str] = ()
                      ) -> list[tuple[str, ModelPlan]]:
    """``(mask, ModelPlan)`` for every assignment of the light model to ``light_segments`` of the
    S segments (None: all 2^S assignments; -1: none, only ``extra_masks``) plus ``extra_masks``.
    ``mask`` reads like ``LHHHHHHL``. The all-heavy schedule is always included (the
    reference)."""
    lens = split_even(steps, segments)
    for m in extra_masks:
        if len(m) != segments or set(m) - {"L", "H"}:
            raise ConfigError(f"mask {m!r}: expected {segments} letters L/H, e.g. "
                              f"{'L' + 'H' * (segments - 2) + 'L'}")
    if light_segments is None:
        masks = list(itertools.product("HL", repeat=segments))
    elif light_segments == -1:
        masks = [("H",) * segments]
    else:
        if not 0 <= light_segments <= segments:
            raise ConfigError(f"light segments must be in [0, {segments}], got {light_segments}")
        masks = []
        for chosen in itertools.combinations(range(segments), light_segments):
            masks.append(tuple("L" if i in chosen else "H" for i in range(segments)))
        masks.append(("H",) * segments)
    masks += [tuple(m) for m in extra_masks]
    out, seen = [], set()
    for m in masks:
        key = "".join(m)
        if key in seen:
            continue
        seen.add(key)
        segs = [(light if c == "L" else heavy, n) for c, n in zip(m, lens)]
        from .schedule import _merge
        out.append((key, ModelPlan(key, steps, _merge(segs), light=light, heavy=heavy)))
    return out


NAMED_OF_MASK = {"sandwich": lambda S, k: "L" * ((k + 1) // 2) + "H" * (S - k) + "L" * (k // 2),
                 "light-first": lambda S, k: "L" * k + "H" * (S - k),
                 "light-last": lambda S, k: "H" * (S - k) + "L" * k,
                 "light-middle": lambda S, k: ("H" * ((S - k + 1) // 2) + "L" * k
                                               + "H" * ((S - k) // 2))}


def name_of_mask(mask: str) -> str:
    S, k = len(mask), mask.count("L")
    if k == 0:
        return "heavy-only"
    if k == S:
        return "light-only"
    for name, f in NAMED_OF_MASK.items():
        if f(S, k) == mask:
            return name
    return ""


def pareto_front(rows: Sequence[dict], x: str = "saved_blocks", y: str = "gen_ppl") -> list[dict]:
    """Rows not dominated: no other row saves at least as much with a gen PPL at most as high
    (one of them strictly)."""
    front = []
    for r in rows:
        dom = any((o[x] >= r[x] and o[y] <= r[y]) and (o[x] > r[x] or o[y] < r[y]) for o in rows)
        if not dom:
            front.append(r)
    return sorted(front, key=lambda r: r[x])


def segment_search(sampler, judge, steps: int, segments: int, light_segments: Optional[int],
                   num: int, seeds: Sequence[int], light: str = "L", heavy: str = "H",
                   include_light_only: bool = True, batch: int = 0, progress=None,
                   extra_masks: Sequence[str] = (), prefix: Optional[torch.Tensor] = None,
                   done: Optional[dict] = None, share_prefixes: bool = True,
                   keep=None, **sample_kw) -> list[dict]:
    """Sample and score every candidate schedule (module docstring). Per row: mask, name,
    run-length schedule, light steps, saved block/full FLOPs (from counted calls), gen PPL
    and entropy pooled over all seeds, per-seed gen PPL (``ppl_seed_<s>``), their standard
    deviation, seconds. ``batch``: samples per sampler call (0: all ``num`` at once).
    ``prefix`` [num, k]: clamped prefixes (prefix-conditional generation); only the generated
    continuation is scored (the prefix is the judge's context). ``done``: mask -> row of
    schedules already scored with the same settings (a resumed search); they are reused, not
    sampled again (every schedule's draws depend only on its seeds, so the rows are the same
    as an uninterrupted search's). For the same reason schedules that agree on their first
    segments share them: one ``PrefixMemo`` per seed and batch keeps the sampler's state at
    every segment end, and a schedule starts from the longest prefix already sampled (the
    samples and the forward calls counted are those of sampling it alone; ``seconds`` is the
    time spent, so a later schedule may take less). ``share_prefixes=False`` turns it off.
    ``keep(mask, {seed: records})`` receives every sampled schedule's genppl records (not those
    of ``done`` rows), so a caller can store them and score them again under another judge
    (:func:`score_samples`). ``judge`` None: the rows have no judged columns (the samples go
    to ``keep`` only, to be scored later) but their entropy (:func:`entropy_columns`)."""
    if prefix is not None and prefix.shape[0] != num:
        raise ConfigError(f"prefix has {prefix.shape[0]} rows for num={num} samples")
    from ..eval.genppl import load_judge, vocab_ids_hash
    if judge is not None:
        judge = load_judge(judge)
    elif keep is None:
        raise ConfigError("a search without a judge must keep its samples (keep=) to be scored")
    tok = sampler.tokenizer
    vh = vocab_ids_hash(tok.hf) if hasattr(tok, "hf") else None
    cands = segment_schedules(steps, segments, light_segments, light, heavy, extra_masks)
    lens = split_even(steps, segments)
    if include_light_only and light_segments is not None and "L" * segments not in \
            {m for m, _ in cands}:
        from .schedule import _merge
        cands.append(("L" * segments, ModelPlan("L" * segments, steps,
                                               _merge([(light, n) for n in lens]), light, heavy)))
    ends = [sum(lens[:i + 1]) - 1 for i in range(segments)]      # last step of each segment
    memos: dict = {}
    rows = []
    for ci, (mask, sched) in enumerate(cands):
        if done and mask in done:
            rows.append(done[mask])
            if progress:
                progress(ci + 1, len(cands), done[mask])
            continue
        t0 = time.perf_counter()
        by_seed = {}
        cost = {"calls": 0, "blocks": 0, "full": 0, "ref_blocks": 0, "ref_full": 0}
        for s in seeds:
            by_seed[s] = _draw_seed(sampler, sched, steps, s, num, batch, prefix,
                                    memos if share_prefixes else None, ends, sample_kw, cost)
        row = {"mask": mask, "name": name_of_mask(mask), "schedule": str(sched),
               "light_steps": sched.counts().get(light, 0),
               "saved_blocks": 1 - cost["blocks"] / cost["ref_blocks"],
               "saved_full": 1 - cost["full"] / cost["ref_full"],
               **(score_samples(by_seed, judge, vh) if judge is not None
                  else entropy_columns(by_seed, sampler.tokenizer.eos_id)),
               "forward_calls": cost["calls"]}
        row["seconds"] = time.perf_counter() - t0
        if keep:
            keep(mask, by_seed)
        rows.append(row)
        if progress:
            progress(ci + 1, len(cands), row)
    return rows


def score_samples(by_seed: dict, judge, vocab_hash=None) -> dict:
    """The judged columns of a search row from its samples ``{seed: [genppl records]}``:
    pooled over all seeds (``gen_ppl`` = exp of the token-weighted mean NLL, ``nll_per_token``,
    ``entropy``, ``tokens``, ``samples``), per seed (``ppl_seed_<s>``, ``entropy_seed_<s>``)
    and the standard deviation of the per-seed gen PPL across seeds (``gen_ppl_seed_std``,
    0 for one seed). ``judge``: a loaded :class:`tdlm.eval.genppl.Judge`."""
    from ..eval.genppl import generative_perplexity
    recs = [x for r in by_seed.values() for x in r]
    pooled = generative_perplexity(recs, judge, sample_vocab_hash=vocab_hash)
    # every sample is scored once: a seed's gen PPL is exp(sum of its samples' NLL / sum of
    # their tokens) and its entropy the mean of theirs, read off the pooled per-sample values
    per_seed, at = {}, 0
    for s, r in by_seed.items():
        part = pooled["per_sample"][at:at + len(r)]
        at += len(r)
        n = sum(v["tokens"] for v in part)
        nll = sum(v["nll"] for v in part)
        per_seed[s] = {"gen_ppl": math.exp(min(nll / n, 700)) if n else float("nan"),
                       "entropy": (sum(v["entropy"] for v in part) / len(part)
                                   if part else float("nan"))}
    ppls = [v["gen_ppl"] for v in per_seed.values()]
    row = {"gen_ppl": pooled["gen_ppl"], "nll_per_token": pooled["nll_per_token"],
           "entropy": pooled["entropy"], "tokens": pooled["tokens"], "samples": len(recs),
           "gen_ppl_seed_std": (float(torch.tensor(ppls, dtype=torch.float64).std())
                                if len(ppls) > 1 else 0.0)}
    for s, v in per_seed.items():
        row[f"ppl_seed_{s}"] = v["gen_ppl"]
        row[f"entropy_seed_{s}"] = v["entropy"]
    return row


def entropy_columns(by_seed: dict, eos: Optional[int] = None) -> dict:
    """The judge-free columns of a search row from its samples ``{seed: [genppl records]}``:
    ``entropy`` (mean unigram entropy of the samples' generated ids, nats, over all seeds)
    and ``entropy_seed_<s>`` (over seed ``s``'s samples) -- the values :func:`score_samples`
    gives for samples in the judge's own vocabulary (:func:`tdlm.eval.genppl.sample_entropy`),
    so a search sampled without a judge (``--score-later``) reports its entropy at once.
    ``eos``: the samples' EOS id (leading EOS counted on the ids; else on the text)."""
    from ..eval.genppl import sample_entropy
    ents = {s: [sample_entropy(r, eos) for r in recs] for s, recs in by_seed.items()}
    if any(e is None for v in ents.values() for e in v) or not any(ents.values()):
        return {}                   # records without ids: only a judge's retokenisation
    every = [e for v in ents.values() for e in v]
    row = {"entropy": sum(every) / len(every)}
    for s, v in ents.items():
        row[f"entropy_seed_{s}"] = sum(v) / len(v) if v else float("nan")
    return row


def _draw_seed(sampler, sched, steps: int, s: int, num: int, batch: int, prefix, memos,
               ends, sample_kw: dict, cost: dict) -> list[dict]:
    """Seed ``s``'s ``num`` samples under ``sched`` (batches of ``batch``; the draws of batch
    ``start`` use seed ``s * 100003 + start``) as genppl records; the calls and FLOPs the
    sampler reports are added to ``cost``. ``memos`` ((seed, start) -> PrefixMemo with states
    at the segment ends ``ends``; None: no sharing) carries shared plan prefixes."""
    from ..sampling.loop import PrefixMemo
    tok = sampler.tokenizer
    out = []
    bsz = batch or num
    for start in range(0, num, bsz):
        n = min(bsz, num - start)
        kw = dict(sample_kw)
        if prefix is not None:
            kw["prefix"] = prefix[start:start + n]
        if memos is not None:
            kw["memo"] = memos.setdefault((s, start), PrefixMemo(ends))
        ids = sampler.generate_ids(n, steps, schedule=sched, seed=s * 100_003 + start, **kw)
        rep = sampler.last_report
        cost["calls"] += rep["forward_calls_total"]
        for part in ("blocks", "full"):
            cost[part] += rep["flops"][part]
            cost["ref_" + part] += rep["reference"][part]
        k = 0 if prefix is None else prefix.shape[1]
        out += [{"text": tok.decode(r.tolist()), "ids": r.tolist(), "prefix_len": k,
                 "prefix_text": tok.decode(r[:k].tolist())} for r in ids]
    return out


def plot_frontier(rows, path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [100 * r["saved_blocks"] for r in rows]
    y = [r["gen_ppl"] for r in rows]
    ax.scatter(x, y, s=14, color="0.6", label="schedules")
    front = pareto_front(rows)
    ax.plot([100 * r["saved_blocks"] for r in front], [r["gen_ppl"] for r in front], "k-",
            lw=1, label="frontier")
    for r in rows:
        if r["name"]:
            ax.annotate(r["name"], (100 * r["saved_blocks"], r["gen_ppl"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
            ax.scatter([100 * r["saved_blocks"]], [r["gen_ppl"]], s=22)
    ax.set_xlabel("block FLOPs saved vs heavy-only (%)")
    ax.set_ylabel("generative perplexity")
    ax.legend(fontsize=8)
    if title:
        import textwrap
        ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ----------------------------------------------------------------------------
