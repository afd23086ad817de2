"""Does TDLM match MDLM at equal parameters in the paper's regime? (issue: parity study)

    python benchmarks/parity.py run                 # main pair, seeds 0 1 2 (resumable)
    python benchmarks/parity.py run --ablations     # + AR, tree constructions and H, seed 0
    python benchmarks/parity.py paired              # per-batch re-evaluation (paired errors)
    python benchmarks/parity.py report              # -> benchmarks/results/parity.{json,md,png}
    python benchmarks/parity.py run --regime gpt2   # the same pair at the GPT-2 vocabulary
    python benchmarks/parity.py report --regime gpt2   # -> parity_gpt2.{json,md,png}
    python benchmarks/parity.py run --steps 4 --seeds 0 --work /tmp/p --lanes 1   # smoke

Regimes (``tdlm info --preset P``):
* ``cpu`` (default, work ``runs/parity``): the paper-shaped CPU presets, an 8k BPE of the
  bundled corpus, d=112, L=256: MDLM with 12 blocks whose output layer is 22.7% of its 4.08M
  parameters (mdlm-small: 22.8%), TDLM with 17 blocks (the paper's 17/12) and a K=128, H=2
  corpus tree at +0.42% parameters, and an AR model of the same budget; 1000 steps x 16 x 256
  tokens (4.1M).
* ``gpt2`` (work ``runs/parity-gpt2``): the tiny presets with the GPT-2 vocabulary (d=128,
  L=128), where the output layer is 46% of MDLM's 13.9M parameters and the equal budget turns
  MDLM's 4 blocks into TDLM's 30; 600 steps x 8 x 128 tokens (614k).

Every run is ``tdlm train --preset P --set train.seed=S`` in its own folder of the work
folder: the same seed gives the same batches in the same order for every model. A stopped
study resumes (``benchmarks/study.py``): a run with a checkpoint continues, a finished run is
skipped. Each finished run is evaluated once on the **whole** validation split with
``tdlm eval --repeats 4`` (the same batches and noise seed for every model): its NELBO per
token and the standard error of that estimate across the validation batches. No setting is
tuned on these batches. Runs are subprocesses with one thread each, ``--lanes`` at a time
(main pair first).

The report reads only the run folders: the models' budgets; validation NELBO against training
tokens for every seed (training-time evaluations, ``train.eval_batches`` batches); the final
NELBO per run; the per-seed difference TDLM - MDLM (paired by seed: same data order) with its
mean and a 95% confidence interval across seeds (Student t, n - 1 degrees of freedom), relative
to MDLM's NELBO; how much the seeds of one model differ; the seed-mean difference along
training (what the curves suggest about larger budgets); the per-level split of TDLM's NELBO;
the AR model's exact NLL; and the ablation table. The verdict compares the CI with the +/-2%
band.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import (EVAL_REPEATS, ci95, context_free_level, read_run, run_queue, sd,  # noqa: E402
                   seeds_for_half_width)

#: ablations at one seed (the cpu regime)
# (name, preset, overrides[, run it needs finished first]); "{work}" and "{seed}" are filled in
ABLATIONS = [
    ("tdlm-tree-exchange", "tdlm-cpu", ["family.tree_source=exchange"]),
    ("tdlm-tree-frequency", "tdlm-cpu", ["family.tree_source=frequency"]),
    ("tdlm-tree-random", "tdlm-cpu", ["family.tree_source=random"]),
    ("tdlm-H3", "tdlm-cpu", ["family.K=21", "family.H=3"]),
    # the tree from the trained MDLM's input embeddings (same tokenizer, same data)
    ("tdlm-tree-checkpoint", "tdlm-cpu", ["family.tree_source=checkpoint",
                                          "family.tree_path={work}/mdlm-s{seed}"], "mdlm-s{seed}"),
]
_GPT2_SETS = ["train.max_steps=600", "train.eval_every=100", "train.ckpt_every=100",
              "train.eval_batches=16"]
REGIMES = {
    "cpu": {"title": "paper-shaped CPU presets, 8k BPE", "work": "runs/parity", "stem": "parity",
            "main": {"mdlm": ("mdlm-cpu", []), "tdlm": ("tdlm-cpu", [])},
            "ar": ("ar-cpu", []), "ablations": ABLATIONS,
            # the scheduling study's seed-0 heavy MDLM and heavy TDLM (relative to the work
            # folder): the same presets, seed and data order, 4000 steps
            # (benchmarks/scheduling.py --scale cpu --stage run / run-levels)
            "longer": {"mdlm": "../sched-paper/heavy", "tdlm": "../sched-paper/tdlm-heavy"}},
    "gpt2": {"title": "tiny presets, GPT-2 vocabulary", "work": "runs/parity-gpt2",
             "stem": "parity_gpt2",
             "main": {"mdlm": ("tiny-gpt2", _GPT2_SETS), "tdlm": ("tdlm-tiny", _GPT2_SETS)},
             "ar": None, "ablations": []},
}
BAND = 0.02
#: nats under the context-free level that count as having left it (report only)
CF_MARGIN = 0.2
DEFAULT_MARK = " (preset default)"
#: run-name stems of the main pair (baseline first) and of the same-budget AR model
BASE, TREE, AUTOREG = "mdlm", "tdlm", "ar"
PAIR = (BASE, TREE)


def plan(seeds, ablations: bool, work: Path = Path("{work}"), regime: str = "cpu") -> list[tuple]:
    """(run name, preset, overrides, needs) in start order: the main pair for every seed
    first, then (with ``ablations``) the AR model and the ablations at the first seed;
    ``needs`` names a run that must have finished before this one starts (or None)."""
    R = REGIMES[regime]
    runs = []
    for s in seeds:
        for m, (preset, sets) in R["main"].items():
            runs.append((f"{m}-s{s}", preset, sets + [f"train.seed={s}"], None))
    s0 = seeds[0]
    if R["ar"] is not None and (ablations or regime == "cpu"):
        runs.append((f"ar-s{s0}", R["ar"][0], R["ar"][1] + [f"train.seed={s0}"], None))
    if ablations:
        for n, p, o, *needs in R["ablations"]:
            o = [x.format(work=work, seed=s0) for x in o]
            runs.append((f"{n}-s{s0}", p, o + [f"train.seed={s0}"],
                         needs[0].format(seed=s0) if needs else None))
    return runs


def run_all(a) -> None:
    work = Path(a.work)
    run_queue(plan(a.seeds, a.ablations, work, a.regime), work, a.lanes, a.threads, a.steps,
              tag="parity")


def _per_batch_eval(run: Path) -> dict | None:
    """The run's final evaluation with per-batch values: ``final_eval`` itself when it has
    them, else ``final_eval_paired`` (stage ``paired``)."""
    for sub in ("final_eval", "final_eval_paired"):
        f = run / sub / "metrics.json"
        if f.exists():
            d = json.loads(f.read_text())
            if d.get("per_batch"):
                return d
    return None


def paired_evals(a) -> None:
    """Re-evaluate finished main-pair runs whose final evaluation predates per-batch values
    (same batches, noise seed and repeats) into ``final_eval_paired``; the report then gives
    each seed's TDLM - MDLM difference with its paired standard error."""
    import subprocess
    work = Path(a.work)
    for s in a.seeds:
        for m in PAIR:
            run = work / f"{m}-s{s}"
            if read_run(run) is None or _per_batch_eval(run) is not None:
                continue
            print(f"[parity] paired evaluation of {run.name}", flush=True)
            subprocess.run([sys.executable, "-m", "tdlm.cli", "eval", str(run), "--batches", "0",
                            "--repeats", str(EVAL_REPEATS), "--out", str(run / "final_eval_paired"),
                            "--json"], check=True, stdout=subprocess.DEVNULL)


# ---- report ---------------------------------------------------------------------------------
def _budget(cfg: dict) -> dict:
    """Parameters, output-layer share, blocks and width of a run's model (meta device)."""
    from tdlm.config.run import RunConfig
    from tdlm.families.base import meta_family
    from tdlm.nn.accounting import count_parameters
    c = RunConfig.from_dict(cfg)
    _, model = meta_family(c)
    n = count_parameters(model)
    return {"parameters": n["total"], "head_share": n["head_share"], "blocks": c.backbone.n_layers,
            "d_model": c.backbone.d_model, "vocab": c.backbone.vocab_size,
            "seq_len": c.data.seq_len, "batch": c.train.global_batch,
            "tokenizer": c.data.tokenizer}


def _verdict(mean: float, half) -> str:
    if half is None:
        return f"one seed only: TDLM - MDLM = {100 * mean:+.2f}% (no interval yet)"
    if abs(mean) + half <= BAND:
        return (f"parity reproduced: TDLM - MDLM = {100 * mean:+.2f}% "
                f"(95% CI +/-{100 * half:.2f}%, inside +/-2%)")
    if mean - half > BAND or mean + half < -BAND:
        return (f"parity NOT reproduced: TDLM - MDLM = {100 * mean:+.2f}% "
                f"(95% CI +/-{100 * half:.2f}%, outside +/-2%)")
    return (f"undecided: TDLM - MDLM = {100 * mean:+.2f}% (95% CI +/-{100 * half:.2f}% "
            f"reaches past the +/-2% band)")


def _along_training(runs: dict, seeds: list) -> list[dict]:
    """Seed-mean relative difference TDLM/MDLM - 1 of the training-time validation NELBO at
    every evaluation step all paired seeds share, with its 95% CI across seeds."""
    curves = {n: {s: v for s, _, v in runs[n]["curve"]} for n in runs}
    steps = None
    for s in seeds:
        for m in PAIR:
            st = set(curves[f"{m}-s{s}"])
            steps = st if steps is None else steps & st
    out = []
    for step in sorted(steps or ()):
        rel = [curves[f"tdlm-s{s}"][step] / curves[f"mdlm-s{s}"][step] - 1 for s in seeds]
        mean, half = ci95(rel)
        out.append({"step": step, "tokens": step * runs[f"mdlm-s{seeds[0]}"]["tokens"]
                    // runs[f"mdlm-s{seeds[0]}"]["steps"], "rel_mean": mean, "rel_ci95": half,
                    "per_seed": rel})
    return out


def _trend_line(along: list) -> str:
    """One sentence on how the difference moves over the second half of training."""
    if len(along) < 4:
        return "Too few evaluation points to read a trend."
    half = [r for r in along if r["step"] >= along[-1]["step"] / 2]
    first, last = half[0], half[-1]
    d = last["rel_mean"] - first["rel_mean"]
    word = ("flat" if abs(d) < 0.005 else
            "moving in TDLM's favour" if d < 0 else "moving in MDLM's favour")
    return (f"Over the second half of training the seed-mean difference goes from "
            f"{100 * first['rel_mean']:+.2f}% (step {first['step']}) to "
            f"{100 * last['rel_mean']:+.2f}% (step {last['step']}): {word} "
            f"({100 * d:+.2f} points). This is an extrapolation hint, not a measurement at a "
            "larger budget.")


def report(a) -> dict:
    R = REGIMES[a.regime]
    work, out = Path(a.work), Path(a.out)
    runs = {p.name: r for p in sorted(work.iterdir()) if p.is_dir()
            for r in [read_run(p)] if r is not None}
    seeds = sorted({int(n.rsplit("-s", 1)[1]) for n in runs if n.startswith("mdlm-s")})
    paired = [s for s in seeds if f"mdlm-s{s}" in runs and f"tdlm-s{s}" in runs]
    per_seed = []
    for s in paired:
        m, t = runs[f"mdlm-s{s}"]["final"], runs[f"tdlm-s{s}"]["final"]
        pm, pt = _per_batch_eval(work / f"mdlm-s{s}"), _per_batch_eval(work / f"tdlm-s{s}")
        paired_se = None
        if pm and pt:
            from tdlm.eval.nelbo import paired_difference
            paired_se = paired_difference(pt, pm)["stderr"]
        per_seed.append({"seed": s, "mdlm": m["nelbo_per_token"], "tdlm": t["nelbo_per_token"],
                         "diff_paired_se": paired_se,
                         "mdlm_se": m.get("stderr_per_token"), "tdlm_se": t.get("stderr_per_token"),
                         "diff": t["nelbo_per_token"] - m["nelbo_per_token"],
                         "rel": t["nelbo_per_token"] / m["nelbo_per_token"] - 1,
                         "tdlm_levels": t.get("parts_per_token")})
    cf = next((c for n in sorted(runs) for c in [context_free_level(work / n)] if c), None)
    for r in per_seed:
        if cf:
            r.update({f"{m}_below_cf": cf["nats"] - r[m] for m in PAIR})
            r.update({f"{m}_cf_step": next((st for st, _, v in runs[f"{m}-s{r['seed']}"]["curve"]
                                            if v <= cf["nats"] - CF_MARGIN), None) for m in PAIR})
    if cf and paired:
        fam = runs[f"{BASE}-s{paired[0]}"]["config"]["family"]
        cf["nelbo_short_by"] = context_free_shortfall(cf["nats"], fam)
    summary = {"seeds": paired, "band": BAND, "context_free": cf}
    if per_seed:
        mean, half = ci95([r["rel"] for r in per_seed])
        dmean, dhalf = ci95([r["diff"] for r in per_seed])
        summary.update(rel_mean=mean, rel_ci95=half, diff_mean=dmean, diff_ci95=dhalf,
                       verdict=_verdict(mean, half),
                       seed_sd={m: sd([r[m] for r in per_seed]) for m in PAIR},
                       diff_sd=sd([r["diff"] for r in per_seed]))
    along = _along_training(runs, paired) if paired else []
    budgets = {}
    for n, r in runs.items():
        key = n.rsplit("-s", 1)[0]
        if key not in budgets:
            budgets[key] = _budget(r["config"])
    res = {"command": (f"python benchmarks/parity.py run --regime {a.regime} [--ablations] && "
                       f"python benchmarks/parity.py report --regime {a.regime}"),
           "regime": a.regime, "title": R["title"],
           "runs": {n: {k: v for k, v in r.items() if k != "config"} for n, r in runs.items()},
           "per_seed": per_seed, "summary": summary, "along_training": along,
           "budgets": budgets,
           "presets": {m: p for m, (p, _) in R["main"].items()},
           "ablations": _ablations(runs, paired[0] if paired else 0),
           "longer": _longer({m: work / p for m, p in R.get("longer", {}).items()}, runs, cf)}
    out.mkdir(parents=True, exist_ok=True)
    stem = R["stem"]
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    (out / f"{stem}.md").write_text(_markdown(res, stem))
    _plot(runs, along, out / f"{stem}.png", R["title"], cf["nats"] if cf else None)
    print(summary.get("verdict", "no finished pair yet"))
    return res


def _longer(where: dict | None, runs: dict, cf: dict | None) -> dict | None:
    """The main pair at a longer budget (one seed), when both runs have finished: final
    NELBOs, the difference with its paired SE, the same seed's difference at the study's
    budget, how far each got below the context-free level, and both curves."""
    got = {m: read_run(where[m]) for m in PAIR} if where else {}
    if not got or any(r is None for r in got.values()):
        return None
    m, t = (got[x]["final"]["nelbo_per_token"] for x in PAIR)
    pm, pt = (_per_batch_eval(where[x]) for x in PAIR)
    se = None
    if pm and pt:
        from tdlm.eval.nelbo import paired_difference
        se = paired_difference(pt, pm)["stderr"]
    seed = got[BASE]["config"]["train"]["seed"]
    short = {x: runs.get(f"{x}-s{seed}") for x in PAIR}
    return {"seed": seed, "steps": got[BASE]["steps"], "tokens": got[BASE]["tokens"],
            "runs": {x: os.path.relpath(where[x]) for x in PAIR}, BASE: m, TREE: t, "diff": t - m, "rel": t / m - 1,
            "diff_paired_se": se,
            "short_rel": (short[TREE]["final"]["nelbo_per_token"]
                          / short[BASE]["final"]["nelbo_per_token"] - 1)
            if all(short.values()) else None,
            "below_cf": {x: cf["nats"] - v for x, v in ((BASE, m), (TREE, t))} if cf else None,
            "curves": {x: got[x]["curve"] for x in PAIR}}


def _longer_lines(lg: dict) -> list:
    se = f" ± {lg['diff_paired_se']:.4f}" if lg["diff_paired_se"] is not None else ""
    L = ["", f"## Four times the budget, one seed ({lg['steps']} steps, {lg['tokens']:,} tokens)",
         "", f"The same presets, seed {lg['seed']} and data order trained {lg['steps']} steps "
         f"(cosine schedule over the longer run): the scheduling study's heavy models "
         f"(`{lg['runs'][BASE]}`, `{lg['runs'][TREE]}`). One seed: a reading of where the "
         "difference goes with budget, not a verdict (the verdict above is the pre-registered "
         "study's).", "",
         "| budget | MDLM NELBO | TDLM NELBO | TDLM − MDLM (± paired SE) | relative |",
         "|---|---|---|---|---|",
         f"| {lg['steps']} steps | {lg[BASE]:.4f} | {lg[TREE]:.4f} | {lg['diff']:+.4f}{se} | "
         f"{100 * lg['rel']:+.2f}% |"]
    if lg["short_rel"] is not None:
        L.append(f"| the study's budget, same seed | | | | {100 * lg['short_rel']:+.2f}% |")
    if lg["below_cf"]:
        L += ["", f"Below the context-free level: MDLM {lg['below_cf'][BASE]:.3f} nats, TDLM "
              f"{lg['below_cf'][TREE]:.3f} nats."]
    return L


def _ablations(runs: dict, s0: int) -> list[dict]:
    rows = []
    base_t, base_m = runs.get(f"tdlm-s{s0}"), runs.get(f"mdlm-s{s0}")
    for n, r in runs.items():
        if not n.startswith("tdlm-") or n == f"tdlm-s{s0}" or not n.endswith(f"-s{s0}"):
            continue
        fam = r["config"]["family"]
        v = r["final"]["nelbo_per_token"]
        rows.append({"run": n, "tree_source": fam.get("tree_source"), "K": fam.get("K"),
                     "H": fam.get("H"), "nelbo": v, "se": r["final"].get("stderr_per_token"),
                     "levels": r["final"].get("parts_per_token"),
                     "vs_tdlm": v / base_t["final"]["nelbo_per_token"] - 1 if base_t else None,
                     "vs_mdlm": v / base_m["final"]["nelbo_per_token"] - 1 if base_m else None})
    if base_t:
        fam = base_t["config"]["family"]
        rows.insert(0, {"run": f"tdlm-s{s0}{DEFAULT_MARK}", "tree_source": fam.get("tree_source"),
                        "K": fam.get("K"), "H": fam.get("H"),
                        "nelbo": base_t["final"]["nelbo_per_token"],
                        "se": base_t["final"].get("stderr_per_token"),
                        "levels": base_t["final"].get("parts_per_token"), "vs_tdlm": 0.0,
                        "vs_mdlm": (base_t["final"]["nelbo_per_token"]
                                    / base_m["final"]["nelbo_per_token"] - 1) if base_m else None})
    return rows


def _median_paired(rows: list) -> str:
    v = sorted(r["diff_paired_se"] for r in rows if r.get("diff_paired_se") is not None)
    return f"{v[len(v) // 2]:.3f}" if v else "not measured"


#: seed spreads within this factor of each other count as comparable (report wording only)
SPREAD_COMPARABLE = 2.0


def _spread_line(rows: list, sm: float, st: float) -> str:
    """Which model's seeds spread, in words computed from the numbers."""
    hi, lo = (BASE, TREE) if sm >= st else (TREE, BASE)
    ratio = max(sm, st) / max(min(sm, st), 1e-12)
    if ratio < SPREAD_COMPARABLE:
        return (f"The two models' seeds spread comparably (final NELBO sd {sm:.4f} for MDLM, "
                f"{st:.4f} for TDLM, {ratio:.1f}x apart): the interval's width comes from both. "
                "More seeds narrow it; a different batch or budget would be a new, "
                "pre-registered study.")
    worst, best = max(rows, key=lambda r: r[hi]), min(rows, key=lambda r: r[hi])
    return (f"{hi.upper()}'s seeds spread {ratio:.1f}x as much as {lo.upper()}'s: its worst seed "
            f"({worst['seed']}, {worst[hi]:.3f}) ends {worst[hi] - best[hi]:.3f} above its best "
            f"(seed {best['seed']}; the curves below show where the runs part), so the "
            f"interval's width comes mostly from {hi.upper()}'s seed-to-seed variation. More "
            "seeds narrow it; a different batch or budget would be a new, pre-registered study.")


def _cf_reading(rows: list) -> str:
    """One sentence per model on where its seeds ended against the context-free level, and
    a comparison of the spreads only when every seed of both ended below it."""
    parts, spread = [], {}
    for m in PAIR:
        g = [r[m + "_below_cf"] for r in rows]
        if min(g) > 0:
            worst = min(rows, key=lambda r: r[m + "_below_cf"])
            spread[m] = max(g) / min(g)
            parts.append(f"{m.upper()} ends {min(g):.3f}-{max(g):.3f} nats below it (its "
                         f"weakest seed, {worst['seed']}, {100 * min(g) / max(g):.0f}% of its "
                         "best seed's distance)")
        elif max(g) < 0:
            parts.append(f"{m.upper()} ends {-max(g):.3f}-{-min(g):.3f} nats ABOVE it in every "
                         "seed: its NELBO is still worse than a context-free prediction's")
        else:
            parts.append(f"{m.upper()} ends between {-min(g):.3f} nats above and {max(g):.3f} "
                         "nats below it")
    text = "; ".join(parts) + "."
    if len(spread) == len(PAIR):
        hi, lo = (BASE, TREE) if spread[BASE] >= spread[TREE] else (TREE, BASE)
        if spread[hi] >= SPREAD_COMPARABLE * spread[lo]:
            text += (f" How far {hi.upper()}'s seeds got from the context-free level differs "
                     f"{spread[hi]:.1f}x between its best and weakest seed, {lo.upper()}'s "
                     f"{spread[lo]:.1f}x: at this budget the difference between the models is "
                     f"largely how far {hi.upper()}'s seed happened to get.")
        else:
            text += (f" Both models' seeds got comparably far ({spread[BASE]:.1f}x and "
                     f"{spread[TREE]:.1f}x between best and weakest seed).")
    else:
        text += (" At this budget the comparison is between models that have barely left, or "
                 "not yet left, the context-free level: it says little about the ranking at "
                 "convergence.")
    return text


def _curve_offset_line(rows: list, runs: dict) -> str:
    """How far the training-time evaluations (a subset of the validation batches) read from
    the whole-split final evaluation at the last step, for the 'first step' column."""
    off = []
    for r in rows:
        for m in PAIR:
            run = runs.get(f"{m}-s{r['seed']}")
            if run and run["curve"]:
                off.append(run["final"]["nelbo_per_token"] - run["curve"][-1][2])
    if not off:
        return ""
    return (f"The training-time evaluations score the first `train.eval_batches` validation "
            f"batches, the final one the whole split: at the last step the whole split reads "
            f"{min(off):+.3f} to {max(off):+.3f} nats from the curve, so the 'first step' "
            "columns compare against the context-free level only approximately.")


def _context_free_lines(rows: list, cf: dict, runs: dict | None = None) -> list[str]:
    """The per-seed distance below the context-free level and computed readings."""
    L = ["", "## Against the context-free level", "",
         f"A model that ignores context scores the validation split's cross-entropy under the "
         f"training split's unigram distribution, **{cf['nats']:.4f} nats** "
         f"({cf['val_tokens']:,} validation tokens, add-{cf['prior']} smoothing; "
         "`study.unigram_cross_entropy`): the NELBO of masked diffusion and of TDLM with a "
         "context-free prediction (MDLM's evaluated NELBO, with alpha_1 = eps and t drawn in "
         f"[t_min, 1], is {cf.get('nelbo_short_by', 0):.4f} nats under it, eps H with the "
         "log-linear schedule; TDLM's level windows end differently), and the "
         "AR NLL of one. How far below it a run ends is, mostly, what it has learned from context "
         "(negative: above it); "
         f"'first step {CF_MARGIN} below' is the first training-time evaluation at least "
         f"{CF_MARGIN} nats under it.", "",
         "| seed | MDLM below context-free (nats) | TDLM below context-free (nats) | MDLM first "
         f"step {CF_MARGIN} below | TDLM first step {CF_MARGIN} below |", "|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['seed']} | {r[BASE + '_below_cf']:.3f} | {r[TREE + '_below_cf']:.3f} | "
                 f"{r.get(BASE + '_cf_step') or 'never'} | {r.get(TREE + '_cf_step') or 'never'} |")
    L += ["", _cf_reading(rows)]
    off = _curve_offset_line(rows, runs or {})
    if off:
        L += ["", off]
    return L


def _ablation_reading(rows: list, tree_sd) -> str:
    """Which rows tie with the lowest NELBO and whether the preset default (the row marked
    ``DEFAULT_MARK``) is among them: the evidence for the default tree. Two single-seed runs
    differ by seed noise of standard deviation ``sqrt(2) * sd`` (``sd``: the main pair's
    TDLM seed standard deviation), so rows within ``2 sqrt(2) sd`` (~95%) of the best tie."""
    import math
    best = min(rows, key=lambda r: r["nelbo"])
    if tree_sd is None:
        return (f"Lowest NELBO: {best['run']} ({best['nelbo']:.4f}); no seed spread of TDLM yet "
                "to call ties by.")
    tol = 2 * math.sqrt(2) * tree_sd
    ties = [r["run"] for r in rows if r["nelbo"] - best["nelbo"] <= tol]
    text = (f"Lowest NELBO: {best['run']} ({best['nelbo']:.4f}); within 2·√2 TDLM seed standard "
            f"deviations ({tol:.3f} nats: two single-seed runs' noise, ~95%) of it: "
            f"{', '.join(ties)}. ")
    default = next((r for r in rows if r["run"].endswith(DEFAULT_MARK)), None)
    if default is None:
        return text + "The preset default's run has not finished: no verdict on the default."
    gap = default["nelbo"] - best["nelbo"]
    if default["run"] in ties:
        return text + (f"The preset default ({default['tree_source']}) is among them "
                       f"({gap:+.3f}): this evidence gives no reason to change it.")
    return text + (f"The preset default ({default['tree_source']}) ends {gap:.3f} above the "
                   f"best, beyond the seed noise: the evidence favours {best['run']} (one "
                   "seed each).")


def _seeds_line(rows: list) -> str:
    """How many seeds the band's verdicts would need at the spread measured so far."""
    rel = [r["rel"] for r in rows]
    mean, s = sum(rel) / len(rel), sd(rel)
    if not s:
        return ""
    inside = seeds_for_half_width(s, BAND)
    text = (f"At this spread (per-seed relative difference sd {100 * s:.2f}%), a 95% half-width "
            f"of {100 * BAND:.0f}% needs {inside or 'more than 1000'} seeds")
    if abs(mean) < BAND:
        return text + (f"; 'parity reproduced' needs the half-width under "
                       f"{100 * (BAND - abs(mean)):.2f}% at the current mean ({100 * mean:+.2f}%): "
                       f"{seeds_for_half_width(s, BAND - abs(mean)) or 'more than 1000'} seeds.")
    return text + (f"; at the current mean ({100 * mean:+.2f}%) 'parity reproduced' is out of "
                   f"reach and 'not reproduced' needs a half-width under "
                   f"{100 * (abs(mean) - BAND):.2f}%: "
                   f"{seeds_for_half_width(s, abs(mean) - BAND) or 'more than 1000'} seeds.")


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:+.2f}%"


def context_free_shortfall(h: float, fam: dict, n: int = 100_000) -> float:
    """How far under the context-free level ``h`` the *evaluated* NELBO of a context-free
    prediction lies. Evaluation draws u ~ U(0, 1) and t = truncate(u, t_min) = t_min +
    (1 - t_min) u, and weights each position's cross-entropy (``h`` in expectation for a
    context-free prediction) by w(t) = -alpha'(t) / (1 - alpha(t)), the position being masked
    with probability 1 - alpha(t): the estimate is ``h E_u[w(t) (1 - alpha(t))]``, here by the
    midpoint rule over ``n`` points with the run's schedule. Log-linear: w(t)(1 - alpha(t)) =
    1 - eps at every t, so the shortfall is ``eps h`` whatever t_min (truncate changes the
    variable without its Jacobian)."""
    import torch
    from tdlm.schedules import get_schedule, truncate
    sch = get_schedule(fam.get("schedule", "loglinear"), fam.get("eps", 1e-3))
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t = truncate(u, fam.get("eval_t_min", 0.0))
    return float(h * (1 - (sch.weight(t) * (1 - sch.alpha(t))).mean()))


def _markdown(res: dict, stem: str) -> str:
    s = res["summary"]
    L = [f"# TDLM vs MDLM at equal parameters ({res['title']})", "",
         f"Command: `{res['command']}`", "",
         f"**Verdict:** {s.get('verdict', 'no finished pair yet')}", "",
         "## Models", "",
         "| model | parameters | output layer share | blocks | d | vocabulary | tokens/step "
         "| training tokens/s (median, 1 thread) |", "|---|---|---|---|---|---|---|---|"]
    tps = {}
    for n, r in res["runs"].items():
        tps.setdefault(n.rsplit("-s", 1)[0], []).append(r["tokens_per_s"] or 0)
    for k, b in res["budgets"].items():
        t = sorted(tps.get(k, [0]))
        L.append(f"| {k} | {b['parameters']:,} | {100 * b['head_share']:.2f}% | {b['blocks']} | "
                 f"{b['d_model']} | {b['vocab']:,} ({b['tokenizer']}) | "
                 f"{b['batch']} x {b['seq_len']} | {t[len(t) // 2]:.0f} |")
    L += ["", "Throughput is logged during the study's runs on a shared 2-core CPU (one thread "
          "per run, two runs at a time): compare it within this table only.", "",
          "## Final NELBO per seed", "",
          "Whole validation split, 4 noise draws per batch; ± is the standard error of each "
          "estimate across validation batches (the evaluation's own noise). The difference is "
          "paired by seed (same data order); its paired SE is the evaluation noise of the "
          "difference itself (both models on the same batches: `tdlm.eval.nelbo."
          "paired_difference`), which the batches' shared difficulty makes much smaller than "
          "either model's own.", "",
          "| seed | MDLM NELBO (± SE) | TDLM NELBO (± SE) | TDLM − MDLM (± paired SE) | "
          "relative |", "|---|---|---|---|---|"]
    for r in res["per_seed"]:
        se = lambda v: f" ± {v:.4f}" if v is not None else ""     # noqa: E731
        L.append(f"| {r['seed']} | {r['mdlm']:.4f}{se(r['mdlm_se'])} | "
                 f"{r['tdlm']:.4f}{se(r['tdlm_se'])} | {r['diff']:+.4f}"
                 f"{se(r.get('diff_paired_se'))} | {_pct(r['rel'])} |")
    if s.get("rel_ci95") is not None:
        L.append(f"| **mean (95% CI)** | | | {s['diff_mean']:+.4f} ± {s['diff_ci95']:.4f} | "
                 f"**{_pct(s['rel_mean'])} ± {100 * s['rel_ci95']:.2f}%** |")
        sm, st = s["seed_sd"]["mdlm"], s["seed_sd"]["tdlm"]
        mm = sum(r["mdlm"] for r in res["per_seed"]) / len(res["per_seed"])
        L += ["", "## How much the seeds differ", "",
              f"Across {len(res['per_seed'])} seeds the final NELBO has a standard deviation of "
              f"{sm:.4f} for MDLM ({100 * sm / mm:.1f}% of its mean) and {st:.4f} for TDLM; the "
              f"paired difference has {s['diff_sd']:.4f}; the evaluation's own error of a "
              f"difference (paired SE, ~{_median_paired(res['per_seed'])}) is the smaller part.",
              "", _spread_line(res["per_seed"], sm, st), "", _seeds_line(res["per_seed"])]
    if s.get("context_free") and res["per_seed"]:
        L += _context_free_lines(res["per_seed"], s["context_free"], res["runs"])
    if res["along_training"]:
        al = res["along_training"]
        L += ["", "## Learning curves (training-time validation NELBO per token)", "",
              f"![curves]({stem}.png)", "",
              "| run | " + " | ".join(str(r["step"]) for r in al) + " |",
              "|---|" + "---|" * len(al)]
        for n, r in res["runs"].items():
            if n.rsplit("-s", 1)[0] in PAIR + (AUTOREG,):
                cur = {st: v for st, _, v in r["curve"]}
                L.append(f"| {n} | " + " | ".join(f"{cur[x['step']]:.3f}" if x["step"] in cur
                                                   else "" for x in al) + " |")
        if s.get("context_free"):
            L.append("| context-free level | " + " | ".join(
                f"{s['context_free']['nats']:.3f}" for _ in al) + " |")
        L.append("| TDLM/MDLM − 1, seed mean | " + " | ".join(
            _pct(x["rel_mean"]) + (f" ± {100 * x['rel_ci95']:.1f}" if x["rel_ci95"] else "")
            for x in al) + " |")
        L += ["", "Columns are training steps; the last row is the mean over seeds with its "
              "95% CI half-width in points.", "", _trend_line(al)]
    lv = [r for r in res["per_seed"] if r["tdlm_levels"]]
    if lv:
        keys = sorted(lv[0]["tdlm_levels"])
        L += ["", "## TDLM's NELBO per level (level_0 = leaf: token given its cluster)", "",
              "| seed | " + " | ".join(keys) + " | total |", "|---|" + "---|" * (len(keys) + 1)]
        for r in lv:
            L.append(f"| {r['seed']} | " + " | ".join(f"{r['tdlm_levels'][k]:.3f}" for k in keys)
                     + f" | {r['tdlm']:.3f} |")
    ar = {n: r for n, r in res["runs"].items() if n.startswith("ar-")}
    if ar:
        L += ["", "## AR model of the same budget (exact NLL of the same rows; the first token "
              "of each row, which has no context, is not scored: 255 of 256)", "",
              "| run | NLL/token (± SE) | MDLM NELBO, same seed |", "|---|---|---|"]
        for n, r in ar.items():
            m = res["runs"].get("mdlm-" + n.split("-", 1)[1])
            same = f"{m['final']['nelbo_per_token']:.4f}" if m else "n/a"
            L.append(f"| {n} | {r['final']['nelbo_per_token']:.4f} ± "
                     f"{r['final'].get('stderr_per_token') or 0:.4f} | {same} |")
    if res.get("longer"):
        L += _longer_lines(res["longer"])
    if len(res["ablations"]) > 1:
        L += ["", "## Ablations (one seed): tree construction and branching", "",
              "| run | tree source | K | H | NELBO (± SE) | vs TDLM default | vs MDLM | levels |",
              "|---|---|---|---|---|---|---|---|"]
        for r in res["ablations"]:
            lvl = ", ".join(f"{k} {v:.3f}" for k, v in sorted((r["levels"] or {}).items()))
            L.append(f"| {r['run']} | {r['tree_source']} | {r['K']} | {r['H']} | "
                     f"{r['nelbo']:.4f} ± {r['se'] or 0:.4f} | {_pct(r['vs_tdlm'])} | "
                     f"{_pct(r['vs_mdlm'])} | {lvl} |")
        L += ["", "One seed each: read differences within the seed noise of the main pair's "
              "TDLM (section above) as ties.", "",
              _ablation_reading(res["ablations"], (s.get("seed_sd") or {}).get(TREE))]
    L += ["", "## All runs", "", "| run | steps | tokens | tokens/s | final NELBO/token | ± SE | "
          "levels |", "|---|---|---|---|---|---|---|"]
    for n, r in res["runs"].items():
        f = r["final"]
        lv = ", ".join(f"{k} {v:.3f}" for k, v in sorted((f.get("parts_per_token") or {}).items()))
        se = f.get("stderr_per_token")
        L.append(f"| {n} | {r['steps']} | {r['tokens']:,} | "
                 f"{r['tokens_per_s'] or float('nan'):.0f} | {f['nelbo_per_token']:.4f} | "
                 f"{'' if se is None else round(se, 4)} | {lv} |")
    return "\n".join(L) + "\n"


def _plot(runs: dict, along: list, path: Path, title: str, cf: float | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"mdlm": "tab:blue", "tdlm": "tab:red", "ar": "tab:gray"}
    styles = ["-", "--", ":", "-."]
    for n, r in runs.items():
        if not r["curve"]:
            continue
        fam, seed = n.rsplit("-s", 1)
        _, x, y = zip(*r["curve"])
        main = fam in colors
        ax.plot([v / 1e6 for v in x], y, label=n, lw=1.4 if main else 0.8,
                color=colors.get(fam), alpha=1.0 if main else 0.6,
                ls=styles[int(seed) % 4] if main else (0, (1, 1)))
    if cf is not None:
        ax.axhline(cf, color="k", lw=0.8, ls="--", label=f"context-free (unigram) {cf:.3f}")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation NELBO / token")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    if along:
        x = [r["tokens"] / 1e6 for r in along]
        for i in range(len(along[0]["per_seed"])):
            bx.plot(x, [100 * r["per_seed"][i] for r in along], lw=0.8, ls=styles[i % 4],
                    color="tab:purple", alpha=0.6, label=f"seed {i}")
        m = [100 * r["rel_mean"] for r in along]
        bx.plot(x, m, color="k", lw=1.6, label="seed mean")
        if along[0]["rel_ci95"] is not None:
            h = [100 * r["rel_ci95"] for r in along]
            bx.fill_between(x, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)],
                            color="k", alpha=0.12, label="95% CI")
        bx.axhspan(-100 * BAND, 100 * BAND, color="tab:green", alpha=0.1, label="±2% band")
        bx.axhline(0, color="k", lw=0.5)
        bx.set_xlabel("training tokens (M)")
        bx.set_ylabel("TDLM / MDLM − 1 (%)")
        bx.legend(fontsize=7)
        bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "paired", "report"])
    p.add_argument("--regime", choices=sorted(REGIMES), default="cpu")
    p.add_argument("--work", help="run folders (default: the regime's, e.g. runs/parity)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, help="override max_steps (smoke tests only)")
    a = p.parse_args(argv)
    a.work = a.work or REGIMES[a.regime]["work"]
    if a.what == "run":
        run_all(a)
    elif a.what == "paired":
        paired_evals(a)
    else:
        report(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
