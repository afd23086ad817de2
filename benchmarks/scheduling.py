"""Model scheduling at CPU scale (issue 5, item 9): heavy and light tiny MDLMs of the same width
(3:1 depth) trained on the bundled corpus, an AR judge trained on the same data, the per-t
loss/KL profile, the segment search frontier, and the sandwich against light-first, light-last
and light-middle at the same saved FLOPs.

    python benchmarks/scheduling.py --work runs/sched-cpu            # all stages (~1-2 h, 1 core)
    python benchmarks/scheduling.py --work runs/sched-cpu --stage report

Stages (each skipped when its outputs exist): ``train`` (tdlm train x 3), ``analyze`` (tdlm
schedule analyze), ``search`` (tdlm schedule search), ``prefix`` (the named placements with
16-token prefixes of held-out documents), ``report`` (benchmarks/results/
scheduling.md + scheduling.json; CSVs and plots in benchmarks/results/scheduling/).
Single-threaded on purpose (the machine is shared).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
OUT = RESULTS / "scheduling"

D, L_SEQ, STEPS_TRAIN, BATCH = 128, 64, 3000, 64
HEAVY, LIGHT = 6, 2                       # 3:1 depth, same width
T, SEGMENTS, NUM, SEEDS = 64, 8, 64, 4

# bpe-512 and 64-sequence batches: with the bpe-8k vocabulary or 16-sequence batches the MDLMs
# stay at the unigram loss for 1000+ steps on CPU (the 1/t-weighted loss is too noisy)
COMMON = [f"backbone.d_model={D}", "backbone.n_heads=4", "backbone.cond_dim=64", "backbone.dropout=0.0",
          "data.tokenizer=bpe-512", f"train.max_steps={STEPS_TRAIN}", "train.warmup_steps=100",
          "train.eval_every=500", "train.ckpt_every=500", "train.eval_batches=8",
          "train.log_every=50"]
MDLM_SETS = [f"backbone.max_seq_len={L_SEQ}", f"data.seq_len={L_SEQ}", f"train.global_batch={BATCH}"]
RUNS = {
    "heavy": ("tiny", COMMON + MDLM_SETS + [f"backbone.n_layers={HEAVY}"]),
    "light": ("tiny", COMMON + MDLM_SETS + [f"backbone.n_layers={LIGHT}"]),
    # the judge sees BOS + 64 tokens: context 128
    "judge": ("ar-tiny", COMMON + ["backbone.n_layers=4", "backbone.max_seq_len=128",
                                   "data.seq_len=128", "train.global_batch=16",
                                   "train.max_steps=1000", "train.eval_every=500"]),
}
# 3 and 4 light segments of 8 (37.5% / 50% light steps) for the named forms
EXTRA_MASKS = ["LLHHHHHL", "LLLHHHHH", "HHHHHLLL", "HHHLLLHH",
               "LLHHHHLL", "LLLLHHHH", "HHHHLLLL", "HHLLLLHH"]


def sh(args: list[str]) -> None:
    from tdlm.cli import main
    print("+ tdlm " + " ".join(args), flush=True)
    rc = main(args)
    if rc != 0:
        raise SystemExit(f"tdlm {args[0]} failed with status {rc}")


def stage_train(work: Path) -> None:
    for name, (preset, sets) in RUNS.items():
        run = work / name
        if (run / "checkpoints" / "latest").exists():
            print(f"[train] {name}: exists", flush=True)
            continue
        t0 = time.time()
        sh(["train", "--preset", preset, "--out", str(run), "--no-progress",
            *[a for s in sets for a in ("--set", s)]])
        (run / "train_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")


def models(work: Path) -> list[str]:
    return ["--model", f"H={work / 'heavy'}", "--model", f"L={work / 'light'}"]


def stage_analyze(work: Path) -> None:
    if (OUT / "analyze" / "step_importance.csv").exists():
        print("[analyze] exists", flush=True)
        return
    sh(["schedule", "analyze", *models(work), "--grid", "20", "--batches", "8",
        "--batch-size", "16", "--trajectory-samples", "16", "--trajectory-steps", str(T),
        "--out", str(OUT / "analyze")])


def stage_search(work: Path) -> None:
    if (OUT / "search" / "search.csv").exists():
        print("[search] exists", flush=True)
        return
    sh(["schedule", "search", *models(work), "--judge", str(work / "judge"), "--steps", str(T),
        "--segments", str(SEGMENTS), "--light-segments", "2", "--masks", ",".join(EXTRA_MASKS),
        "--num", str(NUM), "--seeds", str(SEEDS), "--out", str(OUT / "search")])


PREFIX = 16
NUM_PREFIX = 48      # the bpe-512 validation split has 59 documents longer than 16 tokens
PREFIX_MASKS = ["LHHHHHHL", "LLHHHHHH", "HHHHHHLL", "HHHLLHHH"]


def stage_prefix(work: Path) -> None:
    if (OUT / "prefix" / "search.csv").exists():
        print("[prefix] exists", flush=True)
        return
    sh(["schedule", "search", *models(work), "--judge", str(work / "judge"), "--steps", str(T),
        "--segments", str(SEGMENTS), "--light-segments", "-1", "--masks", ",".join(PREFIX_MASKS),
        "--num", str(NUM_PREFIX), "--seeds", str(SEEDS), "--prefix-from-val", str(PREFIX),
        "--out", str(OUT / "prefix")])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(x) -> float:
    return float(x)


def verdict_lines(sr, href, seeds, peak, gpeak, evals) -> list[str]:
    """The reading of the results, computed from them: the paper's two claims (middle steps
    most sensitive; the sandwich best at equal saved FLOPs) and the issue's target (>= 25% block
    FLOPs saved at <= 3% gen-PPL cost, entropy within 2%)."""
    def paired(r):
        d = [_f(r[f"ppl_seed_{s}"]) / _f(href[f"ppl_seed_{s}"]) - 1 for s in seeds]
        m = sum(d) / len(d)
        se = (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5 if len(d) > 1 else 0.
        return m, se
    out = ["", "## Verdict (computed from the tables above)", ""]
    gap = evals["light"]["nelbo_per_token"] - evals["heavy"]["nelbo_per_token"]
    out.append(f"* The light model is close to the heavy one at this scale: validation NELBO gap "
               f"{gap:+.3f} nats/token, so every schedule is within a few percent of heavy-only "
               f"and the experiment has little power; read differences against the +- s.e.")
    mid = 0.25 <= _f(peak["step_fraction"]) <= 0.75
    out.append(f"* Step sensitivity: KL(heavy||light) on the same noised input peaks at progress "
               f"{_f(peak['step_fraction']):.2f} (t = {_f(peak['t']):.3f}), the loss gap at "
               f"progress {_f(gpeak['step_fraction']):.2f}; the paper's 'middle steps most "
               f"sensitive' is {'supported' if mid else 'not supported'} by the KL profile here" +
               (" (KL grows towards the last steps, where few positions remain noised and the "
                "predictions are sharp)." if _f(peak["step_fraction"]) > 0.75 else "."))
    for k in (2, 3, 4):
        named = {r["name"]: r for r in sr if r["mask"].count("L") == k and r["name"] in
                 ("sandwich", "light-first", "light-middle", "light-last")}
        if len(named) < 2:
            continue
        ranked = sorted(named.values(), key=lambda r: paired(r)[0])
        sw = named.get("sandwich")
        best = ranked[0]
        m_sw, se_sw = paired(sw) if sw else (float("nan"), 0.)
        m_b, se_b = paired(best)
        out.append(f"* {k} light segments ({100 * _f(best['saved_blocks']):.1f}% block FLOPs "
                   f"saved): best named placement **{best['name']}** ({100 * m_b:+.1f}% +- "
                   f"{100 * se_b:.1f}%); sandwich {100 * m_sw:+.1f}% +- {100 * se_sw:.1f}%, rank "
                   f"{ranked.index(sw) + 1 if sw else '-'} of {len(ranked)}.")
    ok = []
    for r in sr:
        if _f(r["saved_blocks"]) >= 0.25 - 1e-9:
            m, se = paired(r)
            dh = abs(_f(r["entropy"]) / _f(href["entropy"]) - 1)
            ok.append((m, se, dh, r))
    ok.sort(key=lambda x: x[0])
    if ok:
        m, se, dh, r = ok[0]
        hit = m <= 0.03 and dh <= 0.02
        out.append(f"* Target (>= 25% block FLOPs saved at <= 3% gen-PPL cost, entropy within "
                   f"2%): best schedule with >= 25% saved is {r['mask']} ({r['name'] or 'unnamed'}"
                   f", {100 * _f(r['saved_blocks']):.1f}% saved): {100 * m:+.1f}% +- "
                   f"{100 * se:.1f}% gen PPL, entropy {100 * dh:.2f}% off; target "
                   f"{'met' if hit else 'missed'} (mean over {len(seeds)} seeds; the s.e. is "
                   f"of the same order as the effect).")
    return out


def model_facts(cfg) -> dict:
    """The config fields this script reads: the family and the number of blocks."""
    return {"family": cfg.family.name, "blocks": cfg.backbone.n_layers}


def stage_report(work: Path) -> None:
    from tdlm.api import load
    from tdlm.eval.nelbo import evaluate_nelbo
    from tdlm.data import build_data
    an = _rows(OUT / "analyze" / "step_importance.csv")
    traj = _rows(OUT / "analyze" / "step_importance_trajectory.csv")
    sr = _rows(OUT / "search" / "search.csv")
    meta = json.loads((OUT / "search" / "search.json").read_text())
    evals = {}
    for name in ("heavy", "light", "judge"):
        p = load(work / name)
        data = build_data(p.cfg.data, None, tokenizer=p.tokenizer, need_train=False)
        ev = evaluate_nelbo(p.family, p.model, data.val, batch_size=16, max_batches=16, seed=0)
        secs = (work / name / "train_seconds.txt")
        evals[name] = {**model_facts(p.cfg),
                       "params": sum(q.numel() for q in p.model.parameters()),
                       "nelbo_per_token": ev["nelbo_per_token"], "bound": ev["bound"],
                       "train_seconds": float(secs.read_text()) if secs.exists() else None}
    by = {r["mask"]: r for r in sr}
    seeds = meta["seeds"]

    def ppl_line(r):
        per = [_f(r[f"ppl_seed_{s}"]) for s in seeds]
        return (f"{_f(r['gen_ppl']):.2f} | {' / '.join(f'{v:.2f}' for v in per)} | "
                f"{_f(r['entropy']):.3f}")

    href = by["H" * SEGMENTS]

    def delta(r):
        """Paired (same seed) relative gen-PPL change vs heavy-only: mean +- s.e. over seeds."""
        d = [_f(r[f"ppl_seed_{s}"]) / _f(href[f"ppl_seed_{s}"]) - 1 for s in seeds]
        m = sum(d) / len(d)
        se = (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5 if len(d) > 1 else 0
        return f"{100 * m:+.1f}% +- {100 * se:.1f}%"

    lines = [
        "# Model scheduling at CPU scale (heavy 6 blocks vs light 2 blocks, tiny MDLMs)", "",
        f"Command: `python benchmarks/scheduling.py --work runs/sched-cpu` (stages train, analyze, "
        f"search, report). Machine: {os.cpu_count()} shared CPU cores, no GPU, torch "
        f"{torch.__version__}, 1 thread, python {platform.python_version()}.", "",
        "## Setup", "",
        f"* Heavy and light MDLM: the `tiny` preset (here with the bpe-512 vocabulary, d={D}, "
        f"4 heads, time-conditioned) at sequence length {L_SEQ}, {HEAVY} vs {LIGHT} blocks (3:1, "
        f"same width), {STEPS_TRAIN} steps x {BATCH} sequences each on the bundled corpus "
        f"(same batches).",
        "* Judge: this library's AR model (`ar-tiny` with bpe-512, 4 blocks, context 128, "
        "1000 steps x 16 x 128 tokens) trained on the same "
        "data, **not GPT-2 Large**; gen PPL values are only comparable within this report.",
        f"* Sampling: T={T} ancestral steps, float64 Gumbel, temperature 1, no nucleus; "
        f"{NUM} samples x {len(seeds)} seeds per schedule, the same seeds for every schedule "
        f"(common random numbers). Gen PPL: token-pooled, first-EOS counting; entropy: mean "
        f"per-sample unigram entropy (nats).",
        f"* Segments: T cut into {SEGMENTS} segments of {T // SEGMENTS} steps; all "
        f"C({SEGMENTS},2) = 28 assignments of 2 light segments, plus the named forms at 3 and 4 "
        f"light segments, plus heavy-only and light-only. Saved FLOPs are counted from the "
        f"forward calls made (no cache hits: time-conditioned models).", "",
        "| model | blocks | parameters | val NELBO/token (or NLL) | train time |",
        "|---|---|---|---|---|"]
    for n, e in evals.items():
        lines.append(f"| {n} ({e['family']}) | {e['blocks']} | {e['params']:,} | "
                     f"{e['nelbo_per_token']:.3f} ({e['bound']}) | "
                     f"{(e['train_seconds'] or 0) / 60:.1f} min |")
    # KL profile
    ok = [r for r in an if r.get("noised") and int(r["noised"]) > 0]
    peak = max(ok, key=lambda r: _f(r["kl_heavy_light"]))
    gpeak = max(ok, key=lambda r: _f(r["gap"]))
    lines += ["", "## Where the light model differs (same noised validation input)", "",
              "![profile](scheduling/analyze/step_importance.png)", "",
              "| progress 1-t | t | loss heavy | loss light | gap (+- 2 s.e.) | KL(H||L) | KL(L||H) |",
              "|---|---|---|---|---|---|---|"]
    for r in ok[::-1][::2]:
        lines.append(f"| {_f(r['step_fraction']):.3f} | {_f(r['t']):.3f} | "
                     f"{_f(r['loss_heavy']):.3f} | {_f(r['loss_light']):.3f} | "
                     f"{_f(r['gap']):.3f} +- {2 * _f(r['gap_se']):.3f} | "
                     f"{_f(r['kl_heavy_light']):.3f} | {_f(r['kl_light_heavy']):.3f} |")
    tr_ok = [r for r in traj if r.get("noised") and int(r["noised"]) > 0]
    tpeak = max(tr_ok, key=lambda r: _f(r["kl_heavy_light"])) if tr_ok else None
    lines += ["", f"Largest KL(heavy||light) on validation input at t = {_f(peak['t']):.3f} "
              f"(progress {_f(peak['step_fraction']):.2f}); largest loss gap at t = "
              f"{_f(gpeak['t']):.3f}." + (f" On the heavy model's own trajectories the KL peaks "
                                           f"at step {tpeak['step']} of {T}." if tpeak else "")]
    # named comparison
    lines += ["", "## Sandwich vs the other placements at equal saved FLOPs", "",
              "Paired change: per seed, PPL(schedule) / PPL(heavy-only) - 1 with the same random "
              "draws; mean +- standard error over the seeds.", "",
              "| light segments | schedule | mask | block FLOPs saved | full saved | gen PPL (pooled) "
              "| per seed | entropy | paired change vs heavy-only |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| 0 | heavy-only | {href['mask']} | 0.0% | 0.0% | {ppl_line(href)} | - |")
    for k in (2, 3, 4):
        for name in ("sandwich", "light-first", "light-middle", "light-last"):
            cand = [r for r in sr if r["name"] == name and r["mask"].count("L") == k]
            for r in cand:
                lines.append(f"| {k} | {name} | {r['mask']} | {100 * _f(r['saved_blocks']):.1f}% | "
                             f"{100 * _f(r['saved_full']):.1f}% | {ppl_line(r)} | {delta(r)} |")
    lo = by.get("L" * SEGMENTS)
    if lo:
        lines.append(f"| 8 | light-only | {lo['mask']} | {100 * _f(lo['saved_blocks']):.1f}% | "
                     f"{100 * _f(lo['saved_full']):.1f}% | {ppl_line(lo)} | {delta(lo)} |")
    two = sorted([r for r in sr if r["mask"].count("L") == 2], key=lambda r: _f(r["gen_ppl"]))
    lines += ["", "## All 28 placements of 2 light segments (25% light steps), best first", "",
              "![frontier](scheduling/search/frontier.png)", "",
              "| rank | mask | name | gen PPL | per seed | entropy | paired change vs heavy-only |",
              "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(two, 1):
        lines.append(f"| {i} | {r['mask']} | {r['name']} | {ppl_line(r)} | {delta(r)} |")
    front = [r for r in sr if r["frontier"] == "True"]
    lines += ["", "Frontier (not dominated in saved block FLOPs and gen PPL): " +
              ", ".join(f"{r['mask']} ({100 * _f(r['saved_blocks']):.1f}%, {_f(r['gen_ppl']):.2f})"
                        for r in sorted(front, key=lambda r: _f(r['saved_blocks']))), ""]
    if len(seeds) > 1:
        cv = []
        for r in sr:
            v = [_f(r[f"ppl_seed_{s}"]) for s in seeds]
            m = sum(v) / len(v)
            cv.append((sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 / m)
        cv.sort()
        lines.append(f"Seed spread: the standard deviation of the per-seed gen PPL ({NUM} samples "
                     f"each) is a median {100 * cv[len(cv) // 2]:.1f}% (max {100 * cv[-1]:.1f}%) of "
                     f"its mean over the {len(sr)} schedules; the paired changes above remove "
                     f"most of that (same random draws).")
    lines += verdict_lines(sr, href, seeds, peak, gpeak, evals)
    if (OUT / "prefix" / "search.csv").exists():
        pr = sorted(_rows(OUT / "prefix" / "search.csv"), key=lambda r: r["mask"].count("L"))
        href = next(r for r in pr if r["mask"] == "H" * SEGMENTS)
        lines += ["", f"## Prefix-conditional generation (first {PREFIX} tokens of held-out "
                  f"documents clamped, {L_SEQ - PREFIX} generated and scored)", "",
                  "| schedule | mask | block FLOPs saved | gen PPL (pooled) | per seed | entropy | "
                  "paired change vs heavy-only |", "|---|---|---|---|---|---|---|"]
        for r in pr:
            lines.append(f"| {r['name'] or '-'} | {r['mask']} | "
                         f"{100 * _f(r['saved_blocks']):.1f}% | {ppl_line(r)} | "
                         f"{delta(r) if r is not href else '-'} |")
    lines += ["", "Files: `benchmarks/results/scheduling/analyze/` (step_importance.csv, "
              "step_importance_trajectory.csv, step_importance.png), "
              "`benchmarks/results/scheduling/search/` (search.csv, search.json, frontier.png).", ""]
    (RESULTS / "scheduling.md").write_text("\n".join(lines))
    (RESULTS / "scheduling.json").write_text(json.dumps(
        {"models": evals, "analysis_peak_t": _f(peak["t"]), "search": sr, "settings": {
            "T": T, "segments": SEGMENTS, "num": NUM, "seeds": seeds, "d": D, "heavy": HEAVY,
            "light": LIGHT, "seq_len": L_SEQ, "train_steps": STEPS_TRAIN}}, indent=2))
    print(f"wrote {RESULTS / 'scheduling.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/sched-cpu", help="folder for the trained runs")
    ap.add_argument("--stage", default="all", choices=["all", "train", "analyze", "search",
                                                        "prefix", "report"])
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    for st, fn in (("train", stage_train), ("analyze", stage_analyze), ("search", stage_search),
                   ("prefix", stage_prefix), ("report", stage_report)):
        if a.stage in ("all", st):
            t0 = time.time()
            fn(work)
            print(f"[{st}] {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
