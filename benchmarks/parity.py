"""Does TDLM match MDLM at equal parameters in the paper's regime? (issue: parity study)

    python benchmarks/parity.py run                 # main pair, seeds 0 1 2 (resumable)
    python benchmarks/parity.py run --ablations     # + tree constructions and H, one seed
    python benchmarks/parity.py report              # -> benchmarks/results/parity.{json,md,png}
    python benchmarks/parity.py run --steps 4 --seeds 0 --work /tmp/p --lanes 1   # smoke

Models (``tdlm info --preset mdlm-cpu --preset tdlm-cpu --preset ar-cpu``): the paper-shaped
CPU presets, an 8k BPE of the bundled corpus, d=112, L=256: MDLM with 12 blocks whose output
layer is 22.7% of its 4.08M parameters (mdlm-small: 22.8%), TDLM with 17 blocks (the paper's
17/12) and a K=128, H=2 corpus tree at +0.42% parameters, and an AR model of the same budget.

Every run is ``tdlm train --preset P --set train.seed=S`` in its own folder of ``--work``: the
same seed gives the same batches in the same order for every model. A stopped study resumes:
a run with a checkpoint continues (``--resume``), a finished run is skipped. Each finished run
is then evaluated once on the **whole** validation split with ``tdlm eval --repeats R`` (the
same batches and noise seed for every model), which gives its NELBO per token and the
standard error of that estimate across the validation batches. No setting is tuned on these
batches. Runs are subprocesses with one thread each, ``--lanes`` at a time (main pair first).

The report (``report``) reads only the run folders: validation NELBO against training tokens
(the training-time evaluations, 16 batches), the final NELBO per run, the per-seed difference
TDLM - MDLM (paired by seed: same data order) with its mean and a 95% confidence interval
across seeds (Student t, n - 1 degrees of freedom), relative to MDLM's NELBO, the per-level
split of TDLM's NELBO, tokens/s, and the ablation table. The verdict line compares the CI
with the +/-2% parity band.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

MAIN = {"mdlm": "mdlm-cpu", "tdlm": "tdlm-cpu"}
AR = ("ar", "ar-cpu")
#: ablations at one seed
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
EVAL_REPEATS = 4
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262}


def plan(seeds, ablations: bool, work: Path = Path("{work}")) -> list[tuple]:
    """(run name, preset, overrides, needs) in start order: the main pair for every seed
    first; ``needs`` names a run that must have finished before this one starts (or None)."""
    runs = []
    for s in seeds:
        for m, preset in MAIN.items():
            runs.append((f"{m}-s{s}", preset, [f"train.seed={s}"], None))
    runs.append((f"{AR[0]}-s{seeds[0]}", AR[1], [f"train.seed={seeds[0]}"], None))
    if ablations:
        s0 = seeds[0]
        for n, p, o, *needs in ABLATIONS:
            o = [x.format(work=work, seed=s0) for x in o]
            runs.append((f"{n}-s{s0}", p, o + [f"train.seed={s0}"],
                         needs[0].format(seed=s0) if needs else None))
    return runs


def _latest_step(run: Path) -> int:
    m = run / "metrics.jsonl"
    if not m.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in m.read_text().splitlines() if line]
    return max(steps, default=0)


def commands(name: str, preset: str, sets: list, work: Path, steps: int | None) -> list[list]:
    """The shell commands still needed for a run: train (fresh or --resume), then eval."""
    run = work / name
    done = run / "final_eval" / "metrics.json"
    if done.exists():
        return []
    cli = [sys.executable, "-m", "tdlm.cli"]
    extra = [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 2)}",
             f"train.ckpt_every={max(1, steps // 2)}"] if steps else []
    out = []
    cfg = run / "config.json"
    finished = cfg.exists() and _latest_step(run) >= json.loads(cfg.read_text())["train"]["max_steps"] \
        and (run / "checkpoints" / "latest").exists()
    if not finished:
        if (run / "checkpoints" / "latest").exists():
            out.append(cli + ["train", "--out", str(run), "--resume", "--no-progress"])
        else:
            if run.exists():
                import shutil
                shutil.rmtree(run)              # a run stopped before its first checkpoint
            sets_all = [a for s in sets + extra for a in ("--set", s)]
            out.append(cli + ["train", "--preset", preset, *sets_all, "--out", str(run),
                              "--no-progress"])
    out.append(cli + ["eval", str(run), "--batches", "0", "--repeats", str(EVAL_REPEATS),
                      "--out", str(run / "final_eval"), "--json"])
    return out


def run_all(a) -> None:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    todo = [(n, commands(n, p, s, work, a.steps), need)
            for n, p, s, need in plan(a.seeds, a.ablations, work)]
    todo = [(n, c, need) for n, c, need in todo if c]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    running: list = []
    log = open(work / "study.log", "a")
    while todo or running:
        ready = [t for t in todo if t[2] is None
                 or (work / t[2] / "final_eval" / "metrics.json").exists()]
        if not ready and not running:
            raise SystemExit(f"[parity] cannot start {[t[0] for t in todo]}: the runs they need "
                             "did not finish")
        while ready and len(running) < a.lanes:
            item = ready.pop(0)
            todo.remove(item)
            name, cmds, _ = item
            script = " && ".join(shlex.join(c) for c in cmds)
            print(f"[parity] start {name}: {script}", flush=True)
            log.write(f"{time.strftime('%F %T')} start {name}\n")
            log.flush()
            out = open(work / f"{name}.log", "a")
            running.append((name, subprocess.Popen(["bash", "-c", script], env=env, stdout=out,
                                                   stderr=subprocess.STDOUT), out))
        time.sleep(5)
        for item in list(running):
            name, proc, out = item
            if proc.poll() is not None:
                running.remove(item)
                out.close()
                msg = f"{time.strftime('%F %T')} {name} exit {proc.returncode}"
                print(f"[parity] {msg}", flush=True)
                log.write(msg + "\n")
                log.flush()


# ---- report ---------------------------------------------------------------------------------
def _read_run(run: Path) -> dict | None:
    if not (run / "final_eval" / "metrics.json").exists():
        return None
    cfg = json.loads((run / "config.json").read_text())
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    tr = cfg["train"]
    tokens_per_step = tr["global_batch"] * cfg["data"]["seq_len"]
    val = [(r["step"] * tokens_per_step, r["nelbo_per_token"]) for r in recs
           if r.get("split") == "val"]
    tps = [r["tokens_per_s"] for r in recs if r.get("split") == "train" and "tokens_per_s" in r]
    ev = json.loads((run / "final_eval" / "metrics.json").read_text())
    return {"curve": val, "final": ev, "steps": tr["max_steps"],
            "tokens": tr["max_steps"] * tokens_per_step,
            "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None}


def _ci(diffs: list) -> tuple[float, float | None]:
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def report(a) -> dict:
    work, out = Path(a.work), Path(a.out)
    runs = {p.name: r for p in sorted(work.iterdir()) if p.is_dir()
            for r in [_read_run(p)] if r is not None}
    seeds = sorted({int(n.rsplit("-s", 1)[1]) for n in runs if n.startswith("mdlm-s")})
    paired = [s for s in seeds if f"mdlm-s{s}" in runs and f"tdlm-s{s}" in runs]
    per_seed = []
    for s in paired:
        m, t = runs[f"mdlm-s{s}"]["final"], runs[f"tdlm-s{s}"]["final"]
        per_seed.append({"seed": s, "mdlm": m["nelbo_per_token"], "tdlm": t["nelbo_per_token"],
                         "mdlm_se": m.get("stderr_per_token"), "tdlm_se": t.get("stderr_per_token"),
                         "diff": t["nelbo_per_token"] - m["nelbo_per_token"],
                         "rel": t["nelbo_per_token"] / m["nelbo_per_token"] - 1,
                         "tdlm_levels": t.get("parts_per_token")})
    summary = {"seeds": paired}
    if per_seed:
        mean, half = _ci([r["rel"] for r in per_seed])
        dmean, dhalf = _ci([r["diff"] for r in per_seed])
        summary.update(rel_mean=mean, rel_ci95=half, diff_mean=dmean, diff_ci95=dhalf)
        if half is None:
            verdict = f"one seed only: TDLM - MDLM = {100 * mean:+.2f}% (no interval yet)"
        elif abs(mean) + half <= 0.02:
            verdict = (f"parity reproduced: TDLM - MDLM = {100 * mean:+.2f}% "
                       f"(95% CI +/-{100 * half:.2f}%, inside +/-2%)")
        elif mean - half > 0.02 or mean + half < -0.02:
            verdict = (f"parity NOT reproduced: TDLM - MDLM = {100 * mean:+.2f}% "
                       f"(95% CI +/-{100 * half:.2f}%, outside +/-2%)")
        else:
            verdict = (f"undecided: TDLM - MDLM = {100 * mean:+.2f}% (95% CI +/-{100 * half:.2f}% "
                       f"overlaps the +/-2% band's edge)")
        summary["verdict"] = verdict
    res = {"command": "python benchmarks/parity.py run [--ablations] && python benchmarks/parity.py report",
           "runs": runs, "per_seed": per_seed, "summary": summary,
           "presets": {m: p for m, p in MAIN.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    (out / "parity.md").write_text(_markdown(res))
    _plot(runs, out / "parity.png")
    print(summary.get("verdict", "no finished pair yet"))
    return res


def _markdown(res: dict) -> str:
    s = res["summary"]
    lines = ["# TDLM vs MDLM at equal parameters (paper-shaped CPU presets)", "",
             f"Command: `{res['command']}`", "",
             f"**Verdict:** {s.get('verdict', 'no finished pair yet')}", "",
             "| seed | MDLM NELBO (± SE) | TDLM NELBO (± SE) | TDLM − MDLM | relative |",
             "|---|---|---|---|---|"]
    for r in res["per_seed"]:
        se = lambda v: f" ± {v:.4f}" if v is not None else ""     # noqa: E731
        lines.append(f"| {r['seed']} | {r['mdlm']:.4f}{se(r['mdlm_se'])} | "
                     f"{r['tdlm']:.4f}{se(r['tdlm_se'])} | {r['diff']:+.4f} | "
                     f"{100 * r['rel']:+.2f}% |")
    lines += ["", "| run | steps | tokens | tokens/s | final NELBO/token | ± SE | levels |",
              "|---|---|---|---|---|---|---|"]
    for n, r in res["runs"].items():
        f = r["final"]
        lv = ", ".join(f"{k} {v:.3f}" for k, v in sorted((f.get("parts_per_token") or {}).items()))
        se = f.get("stderr_per_token")
        lines.append(f"| {n} | {r['steps']} | {r['tokens']:,} | "
                     f"{r['tokens_per_s'] or float('nan'):.0f} | {f['nelbo_per_token']:.4f} | "
                     f"{se if se is None else round(se, 4)} | {lv} |")
    return "\n".join(lines) + "\n"


def _plot(runs: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, r in runs.items():
        if r["curve"]:
            x, y = zip(*r["curve"])
            ax.plot([v / 1e6 for v in x], y, label=n, lw=1.2,
                    ls="-" if n.startswith("tdlm") else "--" if n.startswith("mdlm") else ":")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation NELBO / token (16 batches)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "report"])
    p.add_argument("--work", default="runs/parity")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, help="override max_steps (smoke tests only)")
    a = p.parse_args(argv)
    if a.what == "run":
        run_all(a)
    else:
        report(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
