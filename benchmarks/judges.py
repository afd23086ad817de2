"""Generative perplexity under judges that need no training budget (issue 17): Kneser-Ney
n-gram models of orders 1-4 fitted in closed form on the bundled corpus's training split (the
AR judge's data, split and tokenizer: ``tdlm ngram --preset ar-cpu``), so the judge is
*converged by construction*, unlike the AR transformer judge whose NLL still moved 5% from 4000
to 8000 steps (judge.md). The committed samples are scored again under the best of them (by
its own validation NLL), no model or sampling needed:

* scheduling, stage fine (``scheduling_cpu_tree/fine``: TDLM pair, T=64, 25 light steps, 16
  seeds x 32 samples): paired gen-PPL change of every placement against heavy-only with its
  95% CI, and the issue's target (>= 25% of block FLOPs saved within 3% gen PPL, entropy
  within 2%) read under this judge;
* scheduling, coarse search (``scheduling_cpu_tree/search``: 38 schedules x 4 seeds): the
  paired changes under this judge against those under the AR judge that scored the search
  (rank correlation: do the judges order the schedules alike?);
* DID vs MDLM (``runs/did-study/samples``, seed 0, 128 steps, fixed and variable length): gen
  PPL ratio under this judge against the AR judge's committed one, pooled and
  position-matched (``tdlm.eval.genppl.position_matched``: DID's variable-length samples are
  about half as long as MDLM's, and a judge with a long context scores late tokens better),
  also under the AR judges named with ``--ar-judge`` (trained runs on disk).

    python benchmarks/judges.py                  # ~2 min: fit (16 s per order), score, report
    python benchmarks/judges.py --work runs/judges --out benchmarks/results \
        --ar-judge runs/judge-2000/ar-judge

Writes ``judges.json``, ``judges.md`` and ``judges_did_positions.png``; the judges themselves
(250 MB for order 4) stay in ``--work``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduling import run_length  # noqa: E402
from study import T95  # noqa: E402
from tdlm.eval.genppl import Judge  # noqa: E402
from tdlm.scheduling.runs import read_kept  # noqa: E402

torch.set_num_threads(1)
RESULTS = Path(__file__).resolve().parent / "results"
ORDERS = (1, 2, 3, 4)
TREE = RESULTS / "scheduling_cpu_tree"
DID = RESULTS / "runs" / "did-study" / "samples"
#: the AR transformer judges of the same data whose own NLL is committed (judge.py report):
#: steps -> (label, archived run)
AR_JUDGES = {16000: ("AR judge, 16000 steps (judge-16000/judge.md)",
                     RESULTS / "runs" / "judge-16000" / "ar-judge"),
             8000: ("AR judge, 8000 steps (judge.md; scored the coarse search and DID)",
                    RESULTS / "runs" / "judge" / "ar-judge"),
             4000: ("AR judge, 4000 steps", RESULTS / "runs" / "judge-4000" / "ar-judge"),
             2000: ("AR judge, 2000 steps (judge-2000/judge.md; no better than the 4-gram; "
                    "scored stage fine and the DID rows below when it is their --ar-judge)",
                    RESULTS / "runs" / "judge-2000" / "ar-judge")}
GEN_TOL, ENT_TOL, SAVED_MIN = 0.03, 0.02, 0.25


def fit(work: Path) -> dict:
    """``tdlm ngram`` for every order (skipped when its folder exists): {order: metrics}."""
    out = {}
    for n in ORDERS:
        d = work / f"kn{n}"
        if not (d / "final_eval" / "metrics.json").exists():
            subprocess.run([sys.executable, "-m", "tdlm.cli", "ngram", "--preset", "ar-cpu",
                            "--order", str(n), "--out", str(d)], check=True)
        out[n] = json.loads((d / "final_eval" / "metrics.json").read_text())
    return out


def per_seed(by_seed: dict, judge, vocab_hash) -> dict:
    """{seed: (gen PPL, entropy)} of one schedule's samples."""
    from tdlm.eval.genppl import generative_perplexity
    out = {}
    for s, recs in by_seed.items():
        r = generative_perplexity(recs, judge, sample_vocab_hash=vocab_hash)
        out[s] = (r["gen_ppl"], r["entropy"], r["nll_per_token"] * r["tokens"], r["tokens"])
    return out


def paired(a: dict, ref: dict, i: int = 0) -> dict:
    """Mean, s.e. and 95% CI over the shared seeds of a[s][i] / ref[s][i] - 1."""
    d = [a[s][i] / ref[s][i] - 1 for s in sorted(ref) if s in a]
    n = len(d)
    m = sum(d) / n
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    t = T95.get(n - 1, 1.96)
    return {"mean": m, "se": se, "ci95": [m - t * se, m + t * se], "seeds": n}


def score_fine(judge) -> dict:
    blocks = sorted(p for p in (TREE / "fine").glob("seeds-*") if (p / "search.json").exists())
    rows: dict = {}
    for b in blocks:
        meta = json.loads((b / "search.json").read_text())
        for r in meta["rows"]:
            m = rows.setdefault(r["mask"], {"mask": r["mask"], "name": r.get("name", ""),
                                            "saved": [], "seeds": {}})
            m["saved"].append(float(r["saved_blocks"]))
            m["seeds"].update(per_seed(read_kept(b / "samples" / f"{r['mask']}.jsonl.gz"), judge,
                                       meta.get("sample_vocab_hash")))
    heavy = rows["H" * len(next(iter(rows)))]
    out = []
    for m in rows.values():
        nll = sum(v[2] for v in m["seeds"].values())
        tok = sum(v[3] for v in m["seeds"].values())
        out.append({"mask": m["mask"], "schedule": run_length(m["mask"]), "name": m["name"],
                    "saved_blocks": sum(m["saved"]) / len(m["saved"]),
                    "gen_ppl": math.exp(nll / tok), "seeds": len(m["seeds"]),
                    "entropy": sum(v[1] for v in m["seeds"].values()) / len(m["seeds"]),
                    "per_seed": {str(k): {"gen_ppl": v[0], "entropy": v[1]}
                                 for k, v in sorted(m["seeds"].items())},
                    "gen_change": paired(m["seeds"], heavy["seeds"], 0),
                    "entropy_change": paired(m["seeds"], heavy["seeds"], 1)})
    out.sort(key=lambda r: r["saved_blocks"])
    return {"blocks": [b.name for b in blocks], "rows": out}


def spearman(a: list, b: list) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def score_search(judge) -> dict:
    d = TREE / "search"
    meta = json.loads((d / "search.json").read_text())
    seeds = meta["seeds"]
    rows = []
    for r in meta["rows"]:
        ps = per_seed(read_kept(d / "samples" / f"{r['mask']}.jsonl.gz"), judge,
                      meta.get("sample_vocab_hash"))
        ar = {s: (float(r[f"ppl_seed_{s}"]),) for s in seeds}
        rows.append({"mask": r["mask"], "name": r.get("name", ""), "saved_blocks":
                     float(r["saved_blocks"]), "kn": ps, "ar": ar})
    H = next(r for r in rows if set(r["mask"]) == {"H"})
    out = []
    for r in rows:
        out.append({"mask": r["mask"], "name": r["name"], "saved_blocks": r["saved_blocks"],
                    "per_seed": {str(k): {"gen_ppl": v[0], "ar_gen_ppl": r["ar"][k][0]}
                                 for k, v in sorted(r["kn"].items())},
                    "kn_change": paired(r["kn"], H["kn"], 0),
                    "ar_change": paired(r["ar"], H["ar"], 0)})
    others = [r for r in out if r["mask"] != H["mask"]]
    rho = spearman([r["kn_change"]["mean"] for r in others],
                   [r["ar_change"]["mean"] for r in others])
    return {"judge_of_search": (meta.get("judge") or {}).get("label"), "seeds": seeds,
            "rows": out, "spearman": rho}


class ShortContext(Judge):
    """``judge`` seeing only the ``k`` tokens before each scored token (its own context
    otherwise unchanged). ``logits[:, j]`` scores token ``j + 1``, so it is
    ``judge.logits(x[:, j-k+1:j+1])[:, -1]`` (k tokens) for ``j >= k`` and, for the first
    ``k`` positions, one forward of ``x[:, :k]`` (their prefixes are at most k tokens). With
    ``k = n - 1`` the AR judge conditions on what an n-gram judge does, so a gap between the
    two judges that remains is in how they model short contexts, one that closes comes from
    the longer context (windows start mid-text, as the packed rows
    the judge trained on do)."""

    def __init__(self, judge, k: int, chunk: int = 512):
        if k < 1:
            raise ValueError(f"context k must be >= 1, got {k}")
        self.judge, self.k, self.chunk = judge, k, chunk
        for a in ("kind", "path", "context", "eos_id", "bos_id", "precision", "vocab_size",
                  "device", "weights_id"):
            setattr(self, a, getattr(judge, a, getattr(Judge, a)))
        self.label = f"{judge.label or judge.path}, {k}-token context"

    def encode(self, text: str) -> list[int]:
        return self.judge.encode(text)

    def vocab_hash(self):
        return self.judge.vocab_hash()

    def info(self) -> dict:
        return {**self.judge.info(), "label": self.label, "short_context": self.k}

    @torch.no_grad()
    def logits(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.k
        head = self.judge.logits(x[:, :w], mask[:, :w])
        if x.shape[1] <= w:
            return head
        B = x.shape[0]
        xs = x.unfold(1, w, 1)[:, 1:].reshape(-1, w)          # windows ending at j = k..L-1
        ms = mask.unfold(1, w, 1)[:, 1:].reshape(-1, w)
        tail = torch.cat([self.judge.logits(xs[i:i + self.chunk], ms[i:i + self.chunk])[:, -1]
                          for i in range(0, xs.shape[0], self.chunk)])
        return torch.cat([head, tail.view(B, -1, tail.shape[-1])], dim=1)


def did_sides(judge) -> dict:
    """{setting: {side: generative_perplexity(..., per_token=True)}} of the DID study's seed-0
    samples under ``judge`` (ids scored as they are where the samples' tokenizer has the
    judge's vocabulary, else the text retokenised)."""
    from did_study import SETTINGS, SIDES
    from tdlm.eval.genppl import generative_perplexity, read_samples
    out = {}
    for setting, runs in SETTINGS.items():
        sides = {}
        for side in SIDES:
            f = DID / f"{runs[side][0]}-s0-T128.jsonl"
            if f.exists():
                recs, meta = read_samples(f)
                vh = (meta.get("tokenizer") or {}).get("vocab_ids_hash")
                sides[side] = generative_perplexity(recs, judge, sample_vocab_hash=vh,
                                                    per_token=True)
        out[setting] = sides
    return out


def compare_did(sides: dict) -> dict:
    """DID/MDLM gen PPL of one setting's scored sides: pooled (interval from the two s.e.s)
    and position-matched (:func:`tdlm.eval.genppl.position_matched`: MDLM's NLL at the
    positions DID's tokens occupy, bootstrap interval) and the NLL per position in bins of
    32 judge tokens."""
    from did_study import SIDES
    from tdlm.eval.genppl import position_matched
    out = {}
    if any(side not in sides for side in SIDES):
        return out
    for side in SIDES:
        r = sides[side]
        toks = [q["token_nll"] for q in r["per_sample"]]
        bins = []
        for a in range(0, max(map(len, toks)), 32):
            v = [x for t in toks for x in t[a:a + 32]]
            bins.append({"from": a, "tokens": len(v), "nll": sum(v) / len(v)})
        out[side] = {"gen_ppl": r["gen_ppl"], "ci95": r["gen_ppl_ci95"],
                     "retokenised": r["retokenised"], "nll": r["nll_per_token"],
                     "nll_se": r["nll_se_per_token"], "entropy": r["entropy"],
                     "samples": r["num_samples"], "tokens": r["tokens"],
                     "mean_length": r["tokens"] / r["num_samples"], "positions": bins}
    d, m = (out[x] for x in SIDES)
    se = math.hypot(d["nll_se"], m["nll_se"])
    diff = d["nll"] - m["nll"]
    out["ratio"] = d["gen_ppl"] / m["gen_ppl"]
    out["ratio_ci95"] = [math.exp(diff - 1.96 * se), math.exp(diff + 1.96 * se)]
    pm = position_matched(*([q["token_nll"] for q in sides[x]["per_sample"]] for x in SIDES))
    out["matched"] = {k: pm[k] for k in ("matched_ratio", "matched_ratio_ci95", "covered",
                                         "rounds", "seed")}
    return out


def score_did(judge, label: str = "") -> dict:
    """DID vs MDLM (seed 0, 128 steps) under ``judge``, each setting through
    :func:`compare_did`, with the AR judge's committed pooled ratio beside."""
    from did_study import SETTINGS, SIDES
    res = {"judge": label or judge.label}
    for setting, sides in did_sides(judge).items():
        c = compare_did(sides)
        if "ratio" not in c:
            continue
        ar = {}
        for side in SIDES:
            g = DID / f"{SETTINGS[setting][side][0]}-s0-T128.genppl.json"
            ar[side] = json.loads(g.read_text()).get("gen_ppl") if g.exists() else None
        if all(ar.values()):
            c["ar_ratio"] = ar["did"] / ar["mdlm"]
        res[setting] = c
    return res


def plot_did_positions(did: list, path: Path) -> None:
    """NLL per position bin of DID's and MDLM's samples, one row of panels per judge, one
    panel per setting: where a judge's context helps, the shorter DID samples are scored at
    positions with less of it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(did), 2, figsize=(10, 3.2 * len(did)), squeeze=False)
    for row, res in zip(axes, did):
        for ax, setting in zip(row, ("fixed", "variable")):
            v = res.get(setting)
            if not v or "ratio" not in v:
                continue
            for side, color in (("did", "C0"), ("mdlm", "C3")):
                b = v[side]["positions"]
                ax.plot([x["from"] + 16 for x in b], [x["nll"] for x in b], "-", color=color,
                        marker=".", label=f"{side.upper()} (mean length "
                                          f"{v[side]['mean_length']:.0f})")
            ax.set_title(f"{res['judge']}: {setting} length", fontsize=9)
            ax.set_xlabel("position of the scored token (32-token bins)")
            ax.set_ylabel("mean judge NLL (nats)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def two_trainings(res: dict) -> dict:
    """Heavy-only and light-only of the coarse search and of stage fine on their shared seeds
    (two trainings of the same pair), from the scored rows."""
    s, f = res["search"], res["fine"]
    get = lambda rows, c: next(r for r in rows if set(r["mask"]) == {c})     # noqa: E731
    seeds = sorted(set(get(s["rows"], "H")["per_seed"]) & set(get(f["rows"], "H")["per_seed"]),
                   key=int)
    nel = {"search": _pair_nelbo(TREE / "search"), "fine": _pair_nelbo(TREE / "fine")}
    out = {"seeds": [int(x) for x in seeds], "trainings": {}}
    for name, rows in (("the search's (committed tables)", s["rows"]),
                       ("stage fine's (trained again)", f["rows"])):
        h, lo = get(rows, "H")["per_seed"], get(rows, "L")["per_seed"]
        hv = {k: (h[k]["gen_ppl"],) for k in seeds}
        lv = {k: (lo[k]["gen_ppl"],) for k in seeds}
        gm = lambda v: math.exp(sum(math.log(x[0]) for x in v.values()) / len(v))  # noqa: E731
        out["trainings"][name] = {"nelbo": nel["fine" if "fine" in name else "search"],
                                  "heavy_gen_ppl": gm(hv), "light_gen_ppl": gm(lv),
                                  "change": paired(lv, hv)}
    return out


def _pair_nelbo(folder: Path) -> list:
    """[heavy, light] validation NELBO of the pair that sampled ``folder``."""
    pj = folder / "pair.json"
    if pj.exists():
        v = json.loads(pj.read_text())
        return [v["tdlm-heavy"], v["tdlm-light"]]
    run = RESULTS / "runs" / "sched-paper"
    return [json.loads((run / r / "final_eval" / "metrics.json").read_text())["nelbo_per_token"]
            for r in ("tdlm-heavy", "tdlm-light")]


def ar_judges() -> dict:
    """{steps: own validation NLL} of the archived AR judges."""
    out = {}
    for steps, (_, run) in sorted(AR_JUDGES.items()):
        f = run / "final_eval" / "metrics.json"
        if f.exists():
            out[steps] = json.loads(f.read_text())["nelbo_per_token"]
    return out


def ladder(nll: dict) -> dict | None:
    """The AR judges' doubling ladder (each its own cosine schedule): the NLL gained per
    doubling of the steps and, for three doublings L(n), L(2n), L(4n), the asymptote of a power
    law ``L(m) = L_inf + A m^-alpha`` through them: the gains shrink by ``r = 2^-alpha`` per
    doubling, so ``L_inf = L(4n) - d r / (1 - r)`` with ``d = L(2n) - L(4n)``; none when the
    gains do not shrink (r >= 1: no convergence in sight from these points). With three
    doublings or more, ``predicted``: the longest judge's NLL as the power law through the
    three judges before it predicts it, ``L(8n) = L(4n) - d r`` (only where their gains
    shrink, 0 < r < 1, and the doublings are consecutive; a check of the extrapolation
    against a measured point); ``last_rel``: the relative gain of the last doubling, the
    doubling rule's reading (judge.py: converged under 1% either way)."""
    st = sorted(nll)
    if len(st) < 2:
        return None
    gains = [{"from": a, "to": b, "nats": nll[a] - nll[b], "rel": (nll[a] - nll[b]) / nll[a]}
             for a, b in zip(st, st[1:]) if b == 2 * a]
    out = {"gains": gains}
    if gains:
        out["last_rel"] = gains[-1]["rel"]

    def chained(k):                     # the last k gains are consecutive doublings
        g = gains[-k:]
        return len(g) == k and all(a["to"] == b["from"] for a, b in zip(g, g[1:]))
    if chained(2):
        d1, d2 = gains[-2]["nats"], gains[-1]["nats"]
        r = d2 / d1 if d1 > 0 else float("inf")
        out["r"] = r
        out["asymptote"] = (nll[st[-1]] - d2 * r / (1 - r)) if 0 < r < 1 else None
    if chained(3) and 0 < gains[-2]["nats"] < gains[-3]["nats"]:
        # a power law passes through the three points before the last only when their
        # gains shrink (0 < r < 1)
        d0, d1 = gains[-3]["nats"], gains[-2]["nats"]
        out["predicted"] = {"steps": gains[-1]["to"],
                            "nll": nll[gains[-2]["to"]] - d1 * (d1 / d0),
                            "measured": nll[gains[-1]["to"]]}
    return out


def _pct(c: dict) -> str:
    lo, hi = c["ci95"]
    return f"{100 * c['mean']:+.2f}% +- {100 * (hi - c['mean']):.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def _ar_state(lad: dict | None) -> str:
    """The intro's sentence on the AR judges' convergence, from the doubling ladder: the last
    doubling's gain against judge.py's doubling rule (under 1% either way)."""
    if not lad or not lad.get("gains"):
        return ""
    g = lad["gains"][-1]
    ok = abs(g["rel"]) < 0.01
    moved = (f"{100 * g['rel']:.2f}% better" if g["rel"] >= 0 else
             f"{-100 * g['rel']:.2f}% worse" + (": past its best, overfitting"
                                                 if g["rel"] <= -0.01 else ""))
    return (f" The AR transformer judges of the same data are {'' if ok else 'not '}converged "
            f"by the doubling rule (judge.py: under 1% either way): {g['from']} -> {g['to']} "
            f"steps {moved}.")


def markdown(res: dict) -> str:
    best = res["judge_order"]
    L = [f"# Generative perplexity under a converged n-gram judge (Kneser-Ney, order {best})", "",
         f"Command: `{res['command']}` ({res['seconds']:.0f} s on this CPU).", "",
         "Interpolated modified Kneser-Ney (Chen & Goodman 1999; `tdlm.eval.ngram`, `tdlm ngram`)"
         " fitted in closed form on the bundled corpus's training split with the AR judge's "
         "tokenizer (bpe-8k): a judge with no training budget to converge, scoring local fluency "
         "(n-1 tokens of context)." + _ar_state(res.get("ar_ladder")), "",
         "## The judges' own validation NLL (nats/token, the same validation split)", "",
         "| judge | NLL/token |", "|---|---|"]
    for n, m in res["ngram"].items():
        L.append(f"| Kneser-Ney {n}-gram{' (the judge below)' if int(n) == best else ''} | "
                 f"{m['nelbo_per_token']:.4f} |")
    for steps, v in sorted(res["ar_judges"].items(), key=lambda kv: -int(kv[0])):
        L.append(f"| {AR_JUDGES[int(steps)][0]} | {v:.4f} |")
    lad = res.get("ar_ladder")
    if lad and lad["gains"]:
        L += ["", "AR judge doublings (each its own cosine schedule): " + "; ".join(
            f"{g['from']} -> {g['to']} steps {g['nats']:.4f} nats ({100 * g['rel']:.2f}%)"
            for g in lad["gains"]) + "."]
        if "r" in lad:
            pr = lad.get("predicted")
            if pr:
                L[-1] += (f" The power law through the three judges before the {pr['steps']}-step"
                          f" one predicted it at {pr['nll']:.4f} nats; measured "
                          f"{pr['measured']:.4f} ({pr['measured'] - pr['nll']:+.4f}).")
            L[-1] += (f" The gain per doubling shrinks by r = {lad['r']:.2f}: a power law "
                      f"through the last three points levels off at {lad['asymptote']:.3f} nats "
                      f"({lad['asymptote'] - res['ar_judges'][max(res['ar_judges'], key=int)]:+.3f} from "
                      "the longest judge)." if lad.get("asymptote") is not None else
                      f" The gain per doubling does not shrink (r = {lad['r']:.2f}): no "
                      "convergence in sight from these budgets.")
    f = res.get("fine")
    if f:
        L += ["", "## Scheduling, stage fine (TDLM pair, T=64, 25 light steps of 64, 16 seeds x "
              "32 samples)", "",
              "Paired change against heavy-only, same seeds and draws; 95% CI over seeds "
              "(Student t).", "",
              "| schedule | saved block FLOPs | gen PPL | change vs heavy-only | entropy | "
              "entropy change |", "|---|---|---|---|---|---|"]
        for r in f["rows"]:
            nm = f" ({r['name']})" if r["name"] else ""
            if set(r["mask"]) == {"H"}:
                L.append(f"| {r['schedule']}{nm} | 0% | {r['gen_ppl']:.1f} | - | "
                         f"{r['entropy']:.3f} | - |")
                continue
            L.append(f"| {r['schedule']}{nm} | {100 * r['saved_blocks']:.1f}% | {r['gen_ppl']:.1f} | "
                     f"{_pct(r['gen_change'])} | {r['entropy']:.3f} | {_pct(r['entropy_change'])} |")
        L += ["", f"**Target under this judge** (>= {SAVED_MIN:.0%} saved, gen PPL within "
              f"{GEN_TOL:.0%}, entropy within {ENT_TOL:.0%}, 95% CIs): {f['verdict']}"]
    s = res.get("search")
    if s:
        L += ["", "## Scheduling, coarse search (38 schedules x 4 seeds x 32 samples, T=64, 8 "
              "segments)", "",
              f"Spearman rank correlation of the 37 schedules' paired gen-PPL changes under the "
              f"n-gram judge and under the search's own judge ({(s['judge_of_search'] or '?')[:70]}"
              f"...): **{s['spearman']:.2f}**.", "",
              "| schedule | saved | change, n-gram judge | change, AR judge |", "|---|---|---|---|"]
        for r in sorted(s["rows"], key=lambda r: (r["saved_blocks"], r["kn_change"]["mean"])):
            if set(r["mask"]) == {"H"}:
                continue
            L.append(f"| {r['mask']}{' (' + r['name'] + ')' if r['name'] else ''} | "
                     f"{100 * r['saved_blocks']:.1f}% | {_pct(r['kn_change'])} | "
                     f"{_pct(r['ar_change'])} |")
    tw = res.get("two_trainings")
    if tw:
        L += ["", "## Two trainings of the same pair (the search's and stage fine's), seeds "
              f"{', '.join(map(str, tw['seeds']))} in both", "",
              "Same preset, seed and batches (the second training resumed once on 2 threads, so "
              "its numerics differ): how much the light-vs-heavy sample gap itself varies "
              "between trainings.", "",
              "| training | validation NELBO heavy / light | heavy-only gen PPL | light-only gen PPL |"
              " light-only vs heavy-only (paired) |", "|---|---|---|---|---|"]
        for name, v in tw["trainings"].items():
            L.append(f"| {name} | {v['nelbo'][0]:.4f} / {v['nelbo'][1]:.4f} | "
                     f"{v['heavy_gen_ppl']:.1f} | {v['light_gen_ppl']:.1f} | {_pct(v['change'])} |")
    d = res.get("did")
    if d:
        L += did_lines([d, *res.get("did_ar", [])], res.get("did_ar_nll", {}))
    return "\n".join(L) + "\n"


def study_judge() -> str:
    """The judge that scored the DID study's committed samples (``samples/judge.json``): its
    run folder and checkpoint."""
    try:
        j = json.loads((DID / "judge.json").read_text())
        return f"{j['judge']}, {Path(j['checkpoint']).name}"
    except (OSError, ValueError, KeyError, TypeError):
        return "the AR judge"


def did_lines(did: list, own_nll: dict) -> list[str]:
    """Report section: DID vs MDLM under each judge of ``did`` (the n-gram first), pooled and
    position-matched, with the AR judge's committed pooled ratio."""
    from did_study import SIDES
    L = ["", "## DID vs MDLM (seed 0, 32 samples, 128 steps; did_study.md)", "",
         "Token-pooled gen PPL favours longer samples under a judge whose NLL falls with the "
         "context before a token; DID's variable-length samples are about half as long as "
         "MDLM's. The position-matched ratio compares DID's NLL with MDLM's *at the positions "
         "DID's tokens occupy* (`tdlm.eval.genppl.position_matched`; 95% percentile bootstrap "
         "over the samples of each side, 2000 rounds, seed 0); NLL by position: "
         "[judges_did_positions.png](judges_did_positions.png).", "",
         "| judge (own validation NLL) | setting | DID gen PPL [95% CI] | MDLM gen PPL [95% CI] "
         "| mean length DID / MDLM (judge tokens) | DID/MDLM pooled [95% CI] | DID/MDLM "
         "position-matched [95% CI] | DID/MDLM under did_study.md's judge "
         f"({study_judge()}), pooled |",
         "|---|---|---|---|---|---|---|---|"]
    for res in did:
        nll = own_nll.get(res["judge"])
        name = res["judge"] + (f" ({nll:.4f})" if nll is not None else "")
        for setting in ("fixed", "variable"):
            v = res.get(setting)
            if not v or "ratio" not in v:
                continue
            a, b = (v[x] for x in SIDES)
            mt = v.get("matched")
            ci = lambda c: f"[{c[0]:.3f}, {c[1]:.3f}]"           # noqa: E731
            L.append(f"| {name} | {setting} | {a['gen_ppl']:.1f} [{a['ci95'][0]:.1f}, "
                     f"{a['ci95'][1]:.1f}] | {b['gen_ppl']:.1f} [{b['ci95'][0]:.1f}, "
                     f"{b['ci95'][1]:.1f}] | {a.get('mean_length', float('nan')):.1f} / "
                     f"{b.get('mean_length', float('nan')):.1f} | {v['ratio']:.3f} "
                     f"{ci(v['ratio_ci95'])} | "
                     + (f"{mt['matched_ratio']:.3f} {ci(mt['matched_ratio_ci95'])}" if mt
                        else "-")
                     + f" | {v.get('ar_ratio', float('nan')):.3f} |")
    return L


def fine_verdict(rows: list) -> str:
    ok = [r for r in rows if r["saved_blocks"] >= SAVED_MIN
          and r["gen_change"]["ci95"][1] <= GEN_TOL
          and abs(r["entropy_change"]["ci95"][0]) <= ENT_TOL
          and abs(r["entropy_change"]["ci95"][1]) <= ENT_TOL]
    if ok:
        return ("**met** by " + ", ".join(f"{r['schedule']} ({100 * r['saved_blocks']:.1f}% "
                                          f"saved, {_pct(r['gen_change'])})" for r in ok))
    cand = [r for r in rows if r["saved_blocks"] >= SAVED_MIN]
    if not cand:
        return "no schedule saving >= 25% was sampled"
    b = min(cand, key=lambda r: r["gen_change"]["mean"])
    return (f"**missed**: the best >= 25% schedule, {b['schedule']}, costs "
            f"{_pct(b['gen_change'])} (upper bound {100 * b['gen_change']['ci95'][1]:+.2f}% "
            f"against {GEN_TOL:.0%}: gap {100 * (b['gen_change']['ci95'][1] - GEN_TOL):.2f} pts)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/judges")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--ar-judge", action="append", default=[],
                   help="also score the DID study's samples under this AR judge (a finished "
                        "tdlm AR run; repeat for several): pooled and position-matched")
    p.add_argument("--short-context", type=int, action="append", default=[],
                   help="also under each --ar-judge seeing only this many tokens before each "
                        "scored token (3: the 4-gram's context); repeat for several")
    a = p.parse_args(argv)
    t0 = time.time()
    work = Path(a.work)
    ng = fit(work)
    best = min(ng, key=lambda n: ng[n]["nelbo_per_token"])
    from tdlm.eval.genppl import load_judge
    judge = load_judge(work / f"kn{best}")
    res = {"command": "python benchmarks/judges.py" + (f" --work {a.work}"
                                                       if a.work != "runs/judges" else "")
           + "".join(f" --ar-judge {x}" for x in a.ar_judge)
           + "".join(f" --short-context {k}" for k in a.short_context),
           "ngram": {str(n): {k: m[k] for k in ("nelbo_per_token", "tokens", "types",
                                                 "discounts", "fit_seconds")}
                     for n, m in ng.items()},
           "judge_order": best, "judge": judge.info(), "ar_judges": ar_judges()}
    res["ar_ladder"] = ladder(res["ar_judges"])
    if (TREE / "fine").is_dir():
        res["fine"] = score_fine(judge)
        res["fine"]["verdict"] = fine_verdict(res["fine"]["rows"])
        print("[judges] fine:", res["fine"]["verdict"], flush=True)
    if (TREE / "search" / "search.json").exists():
        res["search"] = score_search(judge)
        print(f"[judges] search: spearman {res['search']['spearman']:.3f}", flush=True)
    if "fine" in res and "search" in res:
        res["two_trainings"] = two_trainings(res)
    if DID.is_dir():
        res["did"] = score_did(judge, f"Kneser-Ney {best}-gram")
        res["did_ar"], res["did_ar_nll"] = [], {}
        for path in a.ar_judge:
            aj = load_judge(path)
            lab = f"AR judge {path}"
            res["did_ar"].append(score_did(aj, lab))
            for k in a.short_context:
                res["did_ar"].append(score_did(ShortContext(aj, k), f"{lab}, {k}-token context"))
            ev = Path(path) / "final_eval" / "metrics.json"
            if ev.exists():
                res["did_ar_nll"][lab] = json.loads(ev.read_text())["nelbo_per_token"]
        res["did_ar_nll"][res["did"]["judge"]] = ng[best]["nelbo_per_token"]
    res["seconds"] = time.time() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "judges.json").write_text(json.dumps(res, indent=1))
    (out / "judges.md").write_text(markdown(res))
    if "did" in res:
        plot_did_positions([res["did"], *res["did_ar"]], out / "judges_did_positions.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
