"""DID vs MDLM at the backbone-dominated CPU size, trained to the presets' budget with seeds
(issue: DID's speed and model scheduling's savings, item 1).

    python benchmarks/did_study.py run              # the training runs (resumable, 2 lanes)
    python benchmarks/did_study.py equal            # MDLM evaluated at DID's training FLOPs
    python benchmarks/did_study.py memory           # peak training memory, one process each
    python benchmarks/did_study.py sample --judge runs/judge/ar-judge   # s/sample, gen PPL
    python benchmarks/did_study.py report           # -> benchmarks/results/did_study.{json,md,png}
    python benchmarks/did_study.py run --steps 4 --seeds 0 --work /tmp/d --lanes 1   # smoke

Models: the paper-shaped CPU backbone (d=112, 12 blocks, 8k BPE of the bundled corpus, L=256,
16 sequences per step, 1000 steps): ``did-cpu`` (fixed length, packed [BOS]+255 tokens) against
``mdlm-cpu`` on the same packed [BOS] rows with the BOS never masked (``keep_first``), and
``did-cpu-var`` (variable length, bundled paragraphs, ragged) against ``mdlm-cpu`` on the same
paragraphs cropped/padded to 256. The same seed gives the same batches in the same order on
both sides of a pair. Main pair (fixed length): ``--seeds`` (default 0 1 2); variable length:
``--variable-seeds`` (default 0-7: seeds 3-5 were added in session 17 and 6-7 in sessions
19-20, each time because the interval still held 0: a sequential look, so an interval edge
near 0 is weaker evidence than it reads). MDLM runs keep every 100th checkpoint
(``train.keep_every``).

Stages (each skips what exists; runs are ``benchmarks/study.py`` queues, one thread each):
* ``run``: train, then evaluate each run on the whole validation split (4 noise draws).
* ``equal``: the trainer logs cumulative training FLOPs (``train_flops``: 3 x the forward
  FLOPs of what the backbone forwarded). For each seed, MDLM's two kept checkpoints that
  bracket DID's final training FLOPs F_D are evaluated the same way, and MDLM's NELBO at F_D is
  interpolated linearly in FLOPs between them: the equal-compute comparison.
* ``memory``: peak resident memory of ``MEMORY_STEPS`` (10) training steps per setting on
  the run's 10 largest batches (``largest_batches``; the first 3 batches, measured until
  session 22, held half the tokens of the variable-length run's largest), each in a fresh
  process with the system allocator (``train.cpu_allocator=system``), minus the resident
  memory after the model was built.
* ``sample``: ``tdlm sample`` at equal steps (``--sample-steps``) from seed 0's final
  checkpoints (``--samples`` sequences, one batch; both fixed-length sides start from their
  BOS: DID inserts into [BOS], and the ``keep_first`` MDLM samples from [BOS] + masks, the
  BOS it was trained with at position 0 -- until session 22 its position 0 was masked and
  drawn from a prediction never trained there) and ``tdlm genppl`` under ``--judge`` (an
  AR model of the same tokenizer trained on the same corpus: ``benchmarks/judge.py``'s
  ``runs/judge/ar-judge``, 8000 steps, whose convergence judge.md reads; its own validation
  NLL is reported beside); the wall-clock per sample is timed apart, round-robin in one
  process (``sample_timing``: DID's batch then MDLM's, ``--timing-rounds`` times, one
  thread), so load from other jobs hits both alike; the ratio is the median of the per-round
  ratios.
* ``report``: NELBO against training FLOPs per seed (plot), the equal-FLOPs differences DID -
  MDLM with a 95% CI across seeds, equal-steps finals. The verdict compares NELBO *per
  sequence* (each side's bound on -log p of the same validation item): at fixed length both
  score the same 255 tokens per row, so it equals the per-token ratio; at variable length
  MDLM's crop_pad items score BOS + document + EOS and DID's varlen items the document only
  (its length is part of the insertion process), so per-token figures divide by different
  counts and are shown beside, not used for the verdict (``equal_lines``). Then the
  round-robin step ratio of ``did_step_cpu.json`` (``did_race.py --scale cpu
  --timing-only``), memory, sampling and generative perplexity.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import ci95, read_run, run_queue  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: setting -> (run-name stem, preset, overrides) of the DID side and the MDLM side
SETTINGS = {
    "fixed": {"did": ("did", "did-cpu", []),
              "mdlm": ("mdlm", "mdlm-cpu", ['data.layout="packed_bos"', "family.keep_first=true",
                                            "train.keep_every=100"])},
    "variable": {"did": ("did-var", "did-cpu-var", []),
                 "mdlm": ("mdlm-var", "mdlm-cpu", ['data.layout="crop_pad"',
                                                   'data.source="bundled:paragraphs"',
                                                   "train.keep_every=100"])},
}
SIDES = ("did", "mdlm")
MEMORY_STEPS = 10   # steps (on the run's largest batches) of the memory measurement
TARGETS = {"step": {"fixed": 0.55, "variable": 0.35}, "sample": {"fixed": 0.6, "variable": 0.3}}


def plan(seeds, var_seeds) -> list[tuple]:
    """(name, preset, overrides, needs): seed by seed, the fixed pair first; the variable
    pairs after the first fixed pair."""
    runs = []
    order = [("fixed", s) for s in seeds[:1]] + [("variable", s) for s in var_seeds] + \
        [("fixed", s) for s in seeds[1:]]
    for setting, s in order:
        for side in SIDES:
            stem, preset, sets = SETTINGS[setting][side]
            runs.append((f"{stem}-s{s}", preset, sets + [f"train.seed={s}"], None))
    return runs


# ---- equal FLOPs ------------------------------------------------------------------------------
def per_sequence(ev: dict) -> float:
    """NELBO per validation sequence (nats): the bound on -log p of the whole item."""
    return ev["nelbo_per_token"] * ev["tokens"] / ev["sequences"]


def _eval_ckpt(ckpt: Path, out: Path, run_missing: bool) -> dict | None:
    if not (out / "metrics.json").exists():
        if not run_missing:
            return None
        subprocess.run([sys.executable, "-m", "tdlm.cli", "eval", str(ckpt), "--batches", "0",
                        "--repeats", "4", "--out", str(out), "--json"], check=True,
                       stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def equal_flops(work: Path, setting: str, seed: int, run_missing: bool = True) -> dict | None:
    """MDLM's whole-split NELBO interpolated at DID's final training FLOPs (module
    docstring), or None while either run is unfinished (or, without ``run_missing``, while
    the bracketing evaluations are missing)."""
    d_stem, m_stem = (SETTINGS[setting][s][0] for s in SIDES)
    d_run, m_run = work / f"{d_stem}-s{seed}", work / f"{m_stem}-s{seed}"
    d, m = read_run(d_run), read_run(m_run)
    if d is None or m is None:
        return None
    f_d = max(d["train_flops"].items())[1]
    m_fl = m["train_flops"]
    kept = {int(p.name.split("_")[1]) for p in (m_run / "checkpoints").glob("step_*")}
    # an archived study (study.py archive) has no weights, only the evaluations made
    kept = sorted(kept | {int(p.parent.name.rsplit("-", 1)[1])
                          for p in (work / "equal").glob(f"{m_stem}-s{seed}-*/metrics.json")})
    below = [s for s in kept if m_fl.get(s, float("inf")) <= f_d]
    above = [s for s in kept if m_fl.get(s, -1) >= f_d]
    if not below or not above:
        print(f"[did_study] {m_run}: no kept checkpoints bracket DID's {f_d:.3e} training "
              f"FLOPs (kept: {kept})", flush=True)
        return None
    lo, hi = below[-1], above[0]
    ev = {s: _eval_ckpt(m_run / "checkpoints" / f"step_{s:07d}",
                        work / "equal" / f"{m_stem}-s{seed}-{s}", run_missing) for s in {lo, hi}}
    if any(v is None for v in ev.values()):
        return None
    w = 0.0 if lo == hi else (f_d - m_fl[lo]) / (m_fl[hi] - m_fl[lo])
    v = (1 - w) * ev[lo]["nelbo_per_token"] + w * ev[hi]["nelbo_per_token"]
    vs = (1 - w) * per_sequence(ev[lo]) + w * per_sequence(ev[hi])
    se = max(ev[lo].get("stderr_per_token") or 0, ev[hi].get("stderr_per_token") or 0)
    return {"did_flops": f_d, "mdlm_steps": [lo, hi], "mdlm_flops": [m_fl[lo], m_fl[hi]],
            "weight_hi": w, "mdlm_nelbo_at_did_flops": v, "mdlm_se": se,
            "mdlm_per_seq_at_did_flops": vs}


def stage_equal(a) -> None:
    work = Path(a.work)
    for setting, seeds in (("fixed", a.seeds), ("variable", a.variable_seeds)):
        for s in seeds:
            r = equal_flops(work, setting, s)
            print(f"[did_study] {setting} seed {s}: {r}")


# ---- memory -----------------------------------------------------------------------------------
def largest_batches(batches, total: int, k: int) -> list[int]:
    """Indices of the ``k`` largest of the first ``total`` batches of ``batches`` (by the
    positions the model is given, ``input_ids.numel()``: padding included, ragged batches by
    their packed length), in the order they come; ties go to the earlier batch."""
    sizes = [next(batches)["input_ids"].numel() for _ in range(total)]
    return sorted(sorted(range(total), key=lambda i: (-sizes[i], i))[:k])


def memory_worker(setting: str, side: str, steps: int) -> None:
    """Peak RSS increment of ``steps`` training steps on the run's ``steps`` largest batches
    (a run's peak is set by its largest batches: length-bucketed ragged batches range from
    about 800 to 4096 tokens; for fixed-size batches these are the first ones, DID's deleted
    count still varying with each step's t)."""
    import torch
    from tdlm.config import get_preset
    from tdlm.data import BatchIterator
    from tdlm.train.step import train_step
    from tdlm.train.throughput import build_step_context
    torch.set_num_threads(1)
    _, preset, sets = SETTINGS[setting][side]
    cfg = get_preset(preset).override([s for s in sets if "keep_every" not in s]
                                      + ["train.cpu_allocator=system"])
    data, _, _, ctx, it = build_step_context(cfg, "cpu")
    bucket = cfg.data.bucket_factor if getattr(data.train, "ragged", False) else 0
    pick = largest_batches(BatchIterator(data.train, cfg.train.global_batch, cfg.train.seed,
                                         bucket_factor=bucket), cfg.train.max_steps, steps)
    batches = [b for i, b in zip(range(pick[-1] + 1), it) if i in set(pick)]
    sizes = [b["input_ids"].numel() for b in batches]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i, b in enumerate(batches):
        train_step(ctx, b, i)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": peak / 1024, "after_build_mib": base / 1024,
                      "step_increment_mib": (peak - base) / 1024, "steps": steps,
                      "batches": pick, "batch_positions": sizes}))


def stage_memory(a) -> None:
    out = Path(a.work) / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(out.read_text()) if out.exists() else {}
    for setting in SETTINGS:
        for side in SIDES:
            key = f"{setting}/{side}"
            if key in res:
                continue
            p = subprocess.run([sys.executable, __file__, "memory-worker", "--setting", setting,
                                "--side", side], capture_output=True, text=True, check=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
            res[key] = json.loads(p.stdout.strip().splitlines()[-1])
            out.write_text(json.dumps(res, indent=1))
            print(f"[did_study] memory {key}: {res[key]}")


# ---- sampling and generative perplexity -------------------------------------------------------
def sample_timing(pipes: dict, num: int, steps: int, rounds: int) -> dict:
    """Seconds per sample of each side's ``Pipeline.sample(num, steps)``, one side after the
    other in each round (the first, untimed call of each warms up), with the per-round ratio
    DID/MDLM: ``{side: {"seconds_per_sample": median, "per_round": [...], "mean_length",
    "lead_eos": mean leading EOS/BOS tokens of the timed samples (a clamped BOS)},
    "ratio": median per-round ratio, "ratio_range": [min, max], "rounds", "num", "steps"}``."""
    import statistics
    import torch
    from tdlm.eval.genppl import leading_eos
    torch.set_num_threads(1)
    per = {side: [] for side in pipes}
    lengths = {side: [] for side in pipes}
    lead = {side: [] for side in pipes}
    eos = {side: getattr(getattr(p, "tokenizer", None), "eos_id", None)
           for side, p in pipes.items()}
    for r in range(rounds + 1):
        for side, pipe in pipes.items():
            t0 = time.perf_counter()
            res = pipe.sample(num, steps, seed=1000 + r)
            if r:
                per[side].append((time.perf_counter() - t0) / num)
                seqs = [list(map(int, x)) for x in res.sequences()]
                lengths[side] += [len(x) for x in seqs]
                lead[side] += [0 if eos[side] is None else
                               leading_eos({"ids": x}, eos[side]) for x in seqs]
    ratios = [d / m for d, m in zip(per["did"], per["mdlm"])]
    return {**{side: {"seconds_per_sample": statistics.median(v), "per_round": v,
                      "mean_length": sum(lengths[side]) / len(lengths[side]),
                      "lead_eos": sum(lead[side]) / len(lead[side])}
               for side, v in per.items()},
            "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
            "rounds": rounds, "num": num, "steps": steps}


def judged_by(genppl: Path) -> str | None:
    """The checkpoint a genppl.json was scored with (its ``judge.path``); None if unreadable."""
    try:
        return json.loads(genppl.read_text())["judge"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def judged_weights(genppl: Path) -> str | None:
    """The weights fingerprint of the judge a genppl.json was scored with (``judge.weights_id``;
    None for scores made before judges carried one, or unreadable)."""
    try:
        return json.loads(genppl.read_text())["judge"].get("weights_id")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def checkpoint_weights(ckpt: str) -> str | None:
    """The weights fingerprint of a judge checkpoint folder (from its manifest; None when the
    folder or manifest is not there, e.g. an archived judge without weights)."""
    from tdlm.eval.genppl import folder_weights_id
    return folder_weights_id(ckpt)


def judge_checkpoint(judge: str) -> str | None:
    """The checkpoint a finished judge run was evaluated at (its final evaluation's
    ``checkpoint``); None while the run is unfinished (it is not scored with: a judge part-way
    through its schedule is not the one the report names)."""
    f = Path(judge) / "final_eval" / "metrics.json"
    return json.loads(f.read_text()).get("checkpoint") if f.exists() else None


def needs_scoring(genppl: Path, judge_ckpt: str | None) -> bool:
    """Score (again) when the judge has finished and ``genppl`` is missing or was scored by
    another checkpoint (an earlier judge: its numbers must not pass for the new one's), or by
    the same path with other weights (a judge trained again there; told apart where both
    fingerprints are known)."""
    if not judge_ckpt:
        return False
    by = judged_by(genppl)
    if by is None or Path(by).resolve() != Path(judge_ckpt).resolve():   # any spelling
        return True
    was, now = judged_weights(genppl), checkpoint_weights(judge_ckpt)
    return bool(was and now and was != now)


EARLIER = "earlier-judges"


def keep_earlier(genppl: Path, samples: Path) -> None:
    """Before ``genppl`` is scored again by another judge, move the old score (and a copy of the
    judge.json it was reported with) to ``samples/earlier-judges/<run>-<checkpoint>/``: the
    report shows the gen PPL ratio under every judge, so a reader sees whether the verdict moves
    with the judge's training."""
    by = judged_by(genppl)
    if by is None:
        return
    was = judged_weights(genppl)        # a judge trained again at the same path: its own folder
    dest = samples / EARLIER / (f"{Path(by).parent.parent.name}-{Path(by).name}"
                                + (f"-{was[:8]}" if was else ""))
    dest.mkdir(parents=True, exist_ok=True)
    j = samples / "judge.json"
    if j.exists() and not (dest / "judge.json").exists() and judged_by_json(j) == by:
        (dest / "judge.json").write_text(j.read_text())
    genppl.replace(dest / genppl.name)


def judged_by_json(judge_json: Path) -> str | None:
    """The checkpoint a samples/judge.json describes (its ``checkpoint``)."""
    try:
        return json.loads(judge_json.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stage_sample(a) -> None:
    work = Path(a.work)
    out = work / "samples"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    judge_ckpt = judge_checkpoint(a.judge) if a.judge else None
    if a.judge and judge_ckpt is None:
        print(f"[did_study] judge {a.judge} unfinished: samples not scored", flush=True)
    for setting in SETTINGS:
        seed = (a.seeds if setting == "fixed" else a.variable_seeds)[0]
        for side in SIDES:
            name = f"{SETTINGS[setting][side][0]}-s{seed}"
            if read_run(work / name) is None:
                print(f"[did_study] {name} unfinished: no samples")
                continue
            f = out / f"{name}-T{a.sample_steps}.jsonl"
            if not f.exists():
                subprocess.run([sys.executable, "-m", "tdlm.cli", "sample", str(work / name),
                                "--num", str(a.samples), "--steps", str(a.sample_steps),
                                "--seed", "1", "--show", "0", "--out", str(f)], check=True,
                               env=env, stdout=subprocess.DEVNULL)
            g = f.with_suffix(".genppl.json")
            if needs_scoring(g, judge_ckpt):
                keep_earlier(g, out)
                subprocess.run([sys.executable, "-m", "tdlm.cli", "genppl", str(f), "--judge",
                                a.judge, "--out", str(g)], check=True, env=env,
                               stdout=subprocess.DEVNULL)
        f = out / f"timing-{setting}-s{seed}-T{a.sample_steps}.json"
        names = {side: work / f"{SETTINGS[setting][side][0]}-s{seed}" for side in SIDES}
        if not f.exists() and all(read_run(n) is not None for n in names.values()):
            from tdlm.api import load
            t = sample_timing({side: load(n) for side, n in names.items()}, a.samples,
                              a.sample_steps, a.timing_rounds)
            f.write_text(json.dumps(t, indent=1))
            print(f"[did_study] sampling {setting}: DID/MDLM {t['ratio']:.3f}", flush=True)
    if judge_ckpt:                  # the judge's final evaluation exists (judge_checkpoint)
        j = Path(a.judge) / "final_eval" / "metrics.json"
        (out / "judge.json").write_text(json.dumps({"judge": a.judge,
                                                     **json.loads(j.read_text())}, indent=1))


# ---- report -----------------------------------------------------------------------------------
def collect(a) -> dict:
    work = Path(a.work)
    jj = work / "samples" / "judge.json"
    judge = json.loads(jj.read_text())["judge"] if jj.exists() else "runs/judge/ar-judge"
    res = {"settings": {}, "command": "python benchmarks/did_study.py run && ... equal && ... "
           f"memory && ... sample --judge {judge} && ... report"}
    mem = json.loads((work / "memory.json").read_text()) if (work / "memory.json").exists() else {}
    step = RESULTS / "did_step_cpu.json"
    step = json.loads(step.read_text())["summary"] if step.exists() else {}
    for setting, seeds in (("fixed", a.seeds), ("variable", a.variable_seeds)):
        rows = []
        for s in seeds:
            d_stem, m_stem = (SETTINGS[setting][x][0] for x in SIDES)
            d, m = read_run(work / f"{d_stem}-s{s}"), read_run(work / f"{m_stem}-s{s}")
            if d is None or m is None:
                continue
            eq = equal_flops(work, setting, s, run_missing=a.evaluate_equal)
            fd, fm = d["final"], m["final"]
            row = {"seed": s, "did": fd["nelbo_per_token"], "mdlm": fm["nelbo_per_token"],
                   "did_se": fd.get("stderr_per_token"), "mdlm_se": fm.get("stderr_per_token"),
                   "did_per_seq": per_sequence(fd), "mdlm_per_seq": per_sequence(fm),
                   "did_tokens": fd["tokens"], "mdlm_tokens": fm["tokens"],
                   "sequences": fd["sequences"],
                   "did_tokens_per_s": d["tokens_per_s"], "mdlm_tokens_per_s": m["tokens_per_s"],
                   "curves": {"did": d["curve_flops"], "mdlm": m["curve_flops"]},
                   "run_flops_ratio": (max(d["train_flops"].items())[1]
                                       / max(m["train_flops"].items())[1]),
                   "equal": eq}
            if fd["sequences"] != fm["sequences"]:
                raise SystemExit(f"[did_study] {setting} seed {s}: DID evaluated "
                                 f"{fd['sequences']} sequences, MDLM {fm['sequences']}")
            if eq:
                row["equal_rel"] = row["did"] / eq["mdlm_nelbo_at_did_flops"] - 1
                row["equal_seq_rel"] = row["did_per_seq"] / eq["mdlm_per_seq_at_did_flops"] - 1
            row["steps_rel"] = row["did"] / row["mdlm"] - 1
            row["steps_seq_rel"] = row["did_per_seq"] / row["mdlm_per_seq"] - 1
            rows.append(row)
        eqr = [r["equal_rel"] for r in rows if "equal_rel" in r]
        eqs = [r["equal_seq_rel"] for r in rows if "equal_seq_rel" in r]
        st = step.get(setting, {})
        samp = _samples(work, setting, (seeds or [0])[0], a)
        res["settings"][setting] = {
            "seeds": [r["seed"] for r in rows], "rows": rows,
            "equal_rel": ci95(eqr) if eqr else None,
            "steps_rel": ci95([r["steps_rel"] for r in rows]) if rows else None,
            "equal_seq_rel": ci95(eqs) if eqs else None,
            "steps_seq_rel": ci95([r["steps_seq_rel"] for r in rows]) if rows else None,
            "step_ratio": st.get("ratio"), "flops_ratio": st.get("flops_ratio"),
            "tokens_ratio": st.get("tokens_ratio"), "dp_share": st.get("dp_share"),
            "memory": {x: mem.get(f"{setting}/{x}") for x in SIDES}, "sampling": samp}
    return res


def _generated(work: Path, name: str, steps: int):
    """The generated ids of every sample in ``samples/<name>-T<steps>.jsonl``
    (:func:`tdlm.eval.genppl.generated_ids`: past the clamped prefix and the sampler's BOS,
    the tokens the judge scores); None when the file is missing."""
    from tdlm.eval.genppl import generated_ids
    f = work / "samples" / f"{name}-T{steps}.jsonl"
    if not f.exists():
        return None
    return [generated_ids(json.loads(x)) for x in f.read_text().splitlines() if x.strip()]


def length_matched_entropy(work: Path, setting: str, seed: int, steps: int) -> dict:
    """Where the two sides' samples differ in mean length (variable length: DID's end, MDLM's
    fill the window), entropies at equal lengths: a unigram entropy grows with the number of
    tokens it is taken over, so the full-sample figures mix length into it. The shorter side's
    samples at their own generated lengths n_i, against the longer side's samples cut to each
    n_i: ``mean_i mean_j H(long_j[:n_i])`` (past the sampler's BOS, when it clamps one), i.e.
    the longer side read at the shorter side's length distribution. ``{}`` when the samples
    are missing or the means are within 5%."""
    from tdlm.eval.genppl import unigram_entropy
    ids = {}
    for side in SIDES:
        g = _generated(work, f"{SETTINGS[setting][side][0]}-s{seed}", steps)
        if g is None:
            return {}
        ids[side] = g
    mean = {x: sum(map(len, v)) / len(v) for x, v in ids.items()}
    if max(mean.values()) <= 1.05 * min(mean.values()):
        return {}
    short = min(mean, key=mean.get)
    long_ = next(x for x in SIDES if x != short)
    ns = [len(r) for r in ids[short]]
    ent = {short: sum(map(unigram_entropy, ids[short])) / len(ns),
           long_: sum(unigram_entropy(r[:n]) for n in ns for r in ids[long_])
           / (len(ns) * len(ids[long_]))}
    return {"entropy_length_paired": {"shorter": short, "mean_length": mean[short],
                                      "cut_short": sum(1 for n in ns for r in ids[long_]
                                                       if len(r) < n), **ent}}


def _samples(work: Path, setting: str, seed: int, a) -> dict:
    out = {}
    for side in SIDES:
        name = f"{SETTINGS[setting][side][0]}-s{seed}"
        f = work / "samples" / f"{name}-T{a.sample_steps}.jsonl"
        meta = f.with_suffix(".meta.json")
        if not meta.exists():
            continue
        m = json.loads(meta.read_text())
        rec = {"seconds_per_sample": m["seconds"] / m.get("num", a.samples),
               "num": m.get("num", a.samples), "steps": a.sample_steps}
        ck = Path(m.get("checkpoint") or "")
        if len(ck.parts) > 2 and ck.parts[:3] != ("runs", work.name, name):
            # sampled from another training of this run's config (kept in results/runs/)
            ev = RESULTS / "runs" / ck.parts[1] / ck.parts[2] / "final_eval" / "metrics.json"
            rec["sampled_from"] = {"run": str(Path(*ck.parts[:3])), "nelbo": json.loads(
                ev.read_text())["nelbo_per_token"] if ev.exists() else None}
        eff = work / "samples" / f"{name}-masked-position-0" / "bos_effect.json"
        if eff.exists():
            rec["bos_effect"] = json.loads(eff.read_text())
        g = f.with_suffix(".genppl.json")
        if g.exists():
            gp = json.loads(g.read_text())
            rec.update(gen_ppl=gp["gen_ppl"], gen_ppl_ci95=gp.get("gen_ppl_ci95"),
                       judged_tokens=gp.get("tokens"))
        gen = _generated(work, name, a.sample_steps)
        if gen is not None:
            # the entropy of the samples' own generated tokens (judge-free, so every judge's
            # rows share it, and one scored under an earlier rule does not stand for it)
            from tdlm.eval.genppl import unigram_entropy
            rec["entropy"] = sum(map(unigram_entropy, gen)) / len(gen)
        out[side] = rec
    t = work / "samples" / f"timing-{setting}-s{seed}-T{a.sample_steps}.json"
    if t.exists():
        tm = json.loads(t.read_text())
        for side in SIDES:
            out.setdefault(side, {"num": tm["num"], "steps": tm["steps"]})
            out[side].update(seconds_per_sample=tm[side]["seconds_per_sample"],
                             mean_length=tm[side]["mean_length"])
            if "lead_eos" in tm[side]:
                # generated tokens: a timed sample's length counts the BOS its sampler clamps
                # (DID's always, MDLM's when it keeps position 0), which is not generated
                out[side]["generated_length"] = tm[side]["mean_length"] - tm[side]["lead_eos"]
        out["timing"] = {k: tm[k] for k in ("ratio", "ratio_range", "rounds", "num")}
        # the ratio of the time both take over the same rounds (as the step ratio is read)
        out["timing"]["mean_ratio"] = sum(tm["did"]["per_round"]) / sum(tm["mdlm"]["per_round"])
        if all("mean_length" in out.get(x, {}) for x in SIDES):
            gen = all("generated_length" in out[x] for x in SIDES)
            key = "generated_length" if gen else "mean_length"
            per_tok = {x: out[x]["seconds_per_sample"] / out[x][key] for x in SIDES}
            out["timing"]["per_token_ratio"] = per_tok["did"] / per_tok["mdlm"]
            out["timing"]["per_token_of"] = ("generated token" if gen else
                                             "sequence token, with any BOS its sampler clamped")
    out.update(length_matched_entropy(work, setting, seed, a.sample_steps))
    j = work / "samples" / "judge.json"
    if j.exists():
        out["judge"] = json.loads(j.read_text())
    out["earlier_judges"] = []
    for d in sorted((work / "samples" / EARLIER).glob("*")):
        gp = {side: d / f"{SETTINGS[setting][side][0]}-s{seed}-T{a.sample_steps}.genppl.json"
              for side in SIDES}
        if all(g.exists() for g in gp.values()):
            jj = json.loads((d / "judge.json").read_text()) if (d / "judge.json").exists() else {}
            out["earlier_judges"].append(
                {"judge": d.name, "nll": jj.get("nelbo_per_token"),
                 **{side: json.loads(g.read_text())["gen_ppl"] for side, g in gp.items()}})
    return out


def _ci(rec: dict) -> str:
    ci = rec.get("gen_ppl_ci95")
    return f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""


def _fmt(v, f="{:.4f}") -> str:
    return "" if v is None else f.format(v)


def equal_verdict(mean: float, half) -> str:
    """The equal-FLOPs target read from the mean relative difference DID/MDLM - 1 and its 95%
    half-width across seeds: met when the whole interval lies at or below 0 (DID no worse at
    95%), missed when it lies above 0; otherwise not decided by these seeds."""
    if half is None:
        return "one seed, not decided"
    if mean + half <= 0:
        return "met, the 95% CI lies below 0"
    if mean - half > 0:
        return f"missed, DID worse by {100 * (mean - half):.2f}% at least"
    return (f"not decided: the 95% CI includes 0 (no difference shown either way; DID worse by "
            f"more than {100 * (mean + half):.2f}% is excluded at 95%)")


def _rel_ci(mh, n: int) -> str:
    m, h = mh
    if h is None:
        return f"{100 * m:+.2f}% (one seed, no interval)"
    return (f"{100 * m:+.2f}% +/- {100 * h:.2f}% (95% CI [{100 * (m - h):+.2f}%, "
            f"{100 * (m + h):+.2f}%], {n} seeds)")


def equal_lines(S: dict) -> list[str]:
    """The equal-FLOPs verdict, read from NELBO *per sequence*: both sides bound -log p of the
    same validation items, whereas NELBO per token divides by what each side counts. With
    fixed length both count the same tokens (the two ratios are equal); with variable length
    MDLM's crop_pad items hold BOS + document + EOS, all scored, and DID's varlen items the
    document after an unscored BOS, so a per-token ratio would compare different
    denominators."""
    rows = [r for r in S["rows"] if "equal_seq_rel" in r]
    n = len(rows)
    m, h = S["equal_seq_rel"]
    same = all(r.get("did_tokens") == r.get("mdlm_tokens") for r in rows)
    out = [f"**NELBO per sequence at equal training FLOPs, DID/MDLM - 1: "
           f"{_rel_ci(S['equal_seq_rel'], n)}** (target: no worse than MDLM: "
           f"{equal_verdict(m, h)}); at equal steps {_rel_ci(S['steps_seq_rel'], len(S['rows']))}.",
           ""]
    if same:
        out += [f"Both sides score {rows[0]['did_tokens']} tokens over "
                f"{rows[0]['sequences']} validation sequences, so per token it is the same "
                f"ratio.", ""]
        return out
    r0 = rows[0]
    dd, dm, nseq = r0["did_tokens"], r0["mdlm_tokens"], r0["sequences"]
    cropped = 2 * nseq - (dm - dd)
    adj = [r["did_per_seq"] / (r["equal"]["mdlm_per_seq_at_did_flops"] - cropped / nseq
                               * r["equal"]["mdlm_nelbo_at_did_flops"]) - 1 for r in rows]
    shift = sum(adj) / n - m
    out += [f"Per token each side divides by what it scores: DID {dd} document tokens over "
            f"{nseq} sequences, MDLM {dm} ({100 * (dm / dd - 1):+.2f}%: BOS + document + EOS "
            f"per item; DID's varlen item has an unscored BOS and no EOS, its length being "
            f"part of the insertion process). So the per-token ratio, "
            f"{_rel_ci(S['equal_rel'], n)} at equal FLOPs and "
            f"{_rel_ci(S['steps_rel'], len(S['rows']))} at equal steps, sets DID's nats over "
            f"fewer tokens against MDLM's over more; it is not the verdict. "
            f"Per sequence differs from like-for-like in one way: the {cropped} documents "
            f"longer than the window are cropped to 256 tokens of BOS + document + EOS on "
            f"MDLM's side and 255 document tokens on DID's (one token more for MDLM); one token "
            f"at MDLM's mean per-token NELBO off each of those would move the per-sequence "
            f"ratio by {100 * shift:+.2f} points.", ""]
    return out


def markdown(res: dict) -> str:
    L = ["# DID vs MDLM at the backbone-dominated CPU size (d=112, 12 blocks, 8k BPE, L=256)", "",
         f"Command: `{res['command']}`", "",
         "Blocks hold 55% of the parameters and ~76% of the forward FLOPs here (tiny: 7%). "
         "Every run: 1000 steps x 16 sequences, one thread, seeds paired (same batches).", "",
         *(["![curves](did_study.png)", ""] if any(S["rows"] for S in res["settings"].values())
           else [])]
    for setting, S in res["settings"].items():
        L += [f"## {setting} length", ""]
        if not S["rows"]:
            L += ["No finished pair yet (`python benchmarks/did_study.py run`): the NELBO rows, "
                  "equal-FLOPs comparison, sampling and judge appear when runs finish; the "
                  "measurements below need no training.", ""]
        if S.get("equal_seq_rel"):
            L += equal_lines(S)
        L += ["| seed | DID NELBO/token (± SE) | MDLM at DID's FLOPs (interp. steps) | DID/MDLM - 1 at "
              "equal FLOPs | MDLM at equal steps (± SE) | DID/MDLM - 1 at equal steps | "
              "per sequence DID / MDLM at equal steps (nats) | per sequence DID/MDLM - 1 at "
              "equal FLOPs |", "|---|---|---|---|---|---|---|---|"] if S["rows"] else []
        for r in S["rows"]:
            eq = r["equal"] or {}
            L.append(f"| {r['seed']} | {r['did']:.4f} ± {_fmt(r['did_se'], '{:.3f}')} | "
                     f"{_fmt(eq.get('mdlm_nelbo_at_did_flops'))} "
                     f"({'-'.join(str(x) for x in eq.get('mdlm_steps', []))}) | "
                     f"{_fmt(r.get('equal_rel'), '{:+.2%}')} | {r['mdlm']:.4f} ± "
                     f"{_fmt(r['mdlm_se'], '{:.3f}')} | {r['steps_rel']:+.2%} | "
                     f"{r['did_per_seq']:.1f} / {r['mdlm_per_seq']:.1f} | "
                     f"{_fmt(r.get('equal_seq_rel'), '{:+.2%}')} |")
        L += ["", "| measure | DID/MDLM | target |", "|---|---|---|"]
        if S["step_ratio"]:
            t = TARGETS["step"][setting]
            L.append(f"| training step wall-clock (round-robin, did_step_cpu.md; ratio of mean "
                     f"step times) | "
                     f"{S['step_ratio']:.3f} | <= {t} ({'met' if S['step_ratio'] <= t else 'missed'}) |")
            runs = [r["run_flops_ratio"] for r in S["rows"] if "run_flops_ratio" in r]
            whole = (f" (the timed steps; over the whole 1000-step runs: FLOPs "
                     f"{min(runs):.3f}-{max(runs):.3f})" if runs and
                     abs(sum(runs) / len(runs) - S["flops_ratio"]) > 0.005 else "")
            L.append(f"| tokens forwarded / FLOPs per step{whole} | {S['tokens_ratio']:.3f} / "
                     f"{S['flops_ratio']:.3f} | |")
            L.append(f"| DP share of DID's step | {100 * S['dp_share']:.1f}% | |")
        mem = S["memory"]
        if mem.get("did") and mem.get("mdlm"):
            how = (f"{mem['did']['steps']} training steps on the run's {mem['did']['steps']} "
                   "largest batches" if "batches" in mem["did"] else
                   "3 training steps (the run's first 3 batches)")
            L.append(f"| peak RSS increment of {how} over the built model (MiB; "
                     f"system allocator, fresh process each) | {mem['did']['step_increment_mib']:.0f}"
                     f" / {mem['mdlm']['step_increment_mib']:.0f} = "
                     f"{mem['did']['step_increment_mib'] / mem['mdlm']['step_increment_mib']:.3f} | |")
        sp = S["sampling"]
        if sp.get("did") and sp.get("mdlm"):
            t = TARGETS["sample"][setting]
            tm = sp.get("timing")
            ratio = tm["ratio"] if tm else (sp["did"]["seconds_per_sample"]
                                            / sp["mdlm"]["seconds_per_sample"])
            how = (f"round-robin, {tm['rounds']} rounds of {tm['num']}: median s/sample of each "
                   f"side, and the ratio as the median of the per-round ratios (range "
                   f"{tm['ratio_range'][0]:.3f}-{tm['ratio_range'][1]:.3f}"
                   + (f"; ratio of the mean times {tm['mean_ratio']:.3f}" if "mean_ratio" in tm
                      else "") + ")" if tm else "one batch each, timed apart")
            L.append(f"| sampling s/sample at {sp['did']['steps']} steps ({how}) | "
                     f"{sp['did']['seconds_per_sample']:.2f} / {sp['mdlm']['seconds_per_sample']:.2f}"
                     f"; ratio {ratio:.3f} | <= {t} ({'met' if ratio <= t else 'missed'}) |")
            if "generated_length" in sp["did"] and "generated_length" in sp["mdlm"]:
                L.append(f"| mean generated tokens per timed sample (past a clamped BOS) | "
                         f"{sp['did']['generated_length']:.1f} / "
                         f"{sp['mdlm']['generated_length']:.1f} | |")
            elif "mean_length" in sp["did"]:
                L.append(f"| mean sample length of the timed samples (tokens, with any BOS "
                         f"the sampler clamped) | {sp['did']['mean_length']:.1f} / "
                         f"{sp['mdlm']['mean_length']:.1f} | |")
            if tm and "per_token_ratio" in tm and abs(tm["per_token_ratio"] - ratio) > 0.02:
                L.append(f"| sampling time per token (the target is per sample; per "
                         f"{tm.get('per_token_of', 'sequence token')}) | "
                         f"{tm['per_token_ratio']:.3f} | |")
            if "gen_ppl" in sp["did"] and "gen_ppl" in sp["mdlm"]:
                L.append(f"| generative perplexity (95% CI over samples) | "
                         f"{sp['did']['gen_ppl']:.1f}{_ci(sp['did'])} / "
                         f"{sp['mdlm']['gen_ppl']:.1f}{_ci(sp['mdlm'])} = "
                         f"{sp['did']['gen_ppl'] / sp['mdlm']['gen_ppl']:.3f} | |")
                L.append(f"| unigram entropy of the generated tokens (nats) | "
                         f"{sp['did']['entropy']:.3f} / "
                         f"{sp['mdlm']['entropy']:.3f} | |")
            for side in SIDES:
                sf, be = sp[side].get("sampled_from"), sp[side].get("bos_effect")
                if sf:
                    L.append(f"| {side.upper()}'s samples are from {sf['run']}, another training "
                             f"of seed 0's config (the code changed since; its NELBO/token "
                             f"{_fmt(sf['nelbo'], '{:.4f}')}, the table's "
                             f"{_fmt(S['rows'][0][side] if S['rows'] else None, '{:.4f}')}) | | |")
                if be:
                    b, o = be["bos"], be["masked-position-0"]
                    L.append(f"| {side.upper()} from [BOS] + masks (as trained, since session 22) "
                             f"vs from all masks (position 0 drawn from an untrained "
                             f"prediction, as before), same model and seed: gen PPL | "
                             f"{b['gen_ppl']:.1f} / {o['gen_ppl']:.1f} = "
                             f"{b['gen_ppl'] / o['gen_ppl']:.3f} | |")
            if sp.get("entropy_length_paired"):
                e = sp["entropy_length_paired"]
                lo = e["shorter"].upper()
                hi = next(x for x in SIDES if x != e["shorter"]).upper()
                L.append(f"| entropy at equal lengths ({lo}'s samples at their own lengths, "
                         f"mean {e['mean_length']:.1f} tokens; {hi}'s samples each cut to every "
                         f"one of those lengths; nats) | {e['did']:.3f} / {e['mdlm']:.3f} | |")
            if sp.get("judge"):
                L.append(f"| judge's own validation NLL/token | {sp['judge']['nelbo_per_token']:.3f}"
                         f" ({sp['judge']['judge']}, {Path(sp['judge']['checkpoint']).name}) | |")
            for e in sp.get("earlier_judges", []):
                L.append(f"| the same samples under an earlier judge ({e['judge']}, own NLL "
                         f"{_fmt(e['nll'], '{:.3f}')}): gen PPL | {e['did']:.1f} / "
                         f"{e['mdlm']:.1f} = {e['did'] / e['mdlm']:.3f} | |")
        L.append("")
    return "\n".join(L) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res["settings"]), figsize=(6 * len(res["settings"]), 4.3))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, (setting, S) in zip(axes, res["settings"].items()):
        for r in S["rows"]:
            for side, col in (("did", "tab:orange"), ("mdlm", "tab:blue")):
                c = r["curves"][side]
                if c:
                    ax.plot([x[1] / 1e12 for x in c], [x[2] for x in c], color=col, lw=1,
                            ls=["-", "--", ":"][r["seed"] % 3], label=f"{side} s{r['seed']}")
        ax.set_xlabel("training FLOPs (TFLOP)")
        ax.set_ylabel("validation NELBO / token" + ("" if setting == "fixed" else
                                                      " (each side's own token count)"))
        ax.set_title(f"{setting} length")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stage_report(a) -> None:
    res = collect(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "did_study.json").write_text(json.dumps(res, indent=1))
    (out / "did_study.md").write_text(markdown(res))
    if any(S["rows"] for S in res["settings"].values()):
        plot(res, out / "did_study.png")
    print(markdown(res))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["run", "equal", "memory", "sample", "report", "memory-worker"])
    p.add_argument("--work", default="runs/did-study")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--variable-seeds", type=int, nargs="*", default=list(range(8)))
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--steps", type=int, help="override max_steps (smoke tests only)")
    p.add_argument("--judge", default="", help="AR run folder for generative perplexity")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--sample-steps", type=int, default=128)
    p.add_argument("--timing-rounds", type=int, default=3,
                   help="sample: round-robin timing rounds of --samples sequences per side")
    p.add_argument("--evaluate-equal", action="store_true",
                   help="report: run the equal-FLOPs evaluations that are missing")
    p.add_argument("--setting", choices=sorted(SETTINGS))
    p.add_argument("--side", choices=SIDES)
    a = p.parse_args(argv)
    if a.stage == "run":
        t0 = time.time()
        run_queue(plan(a.seeds, a.variable_seeds), Path(a.work), a.lanes, 1, a.steps, tag="did")
        print(f"[did_study] queue done in {(time.time() - t0) / 60:.1f} min")
    elif a.stage == "equal":
        stage_equal(a)
    elif a.stage == "memory":
        stage_memory(a)
    elif a.stage == "memory-worker":
        memory_worker(a.setting, a.side, MEMORY_STEPS)
    elif a.stage == "sample":
        stage_sample(a)
    else:
        stage_report(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
