"""The AR judge of generative perplexity at the paper-shaped CPU scale, trained until its
validation NLL stops improving (issue: DID's speed and model scheduling's savings: "an AR
judge trained to convergence on the same data (report its own NLL)").

    python benchmarks/judge.py run                  # runs/judge/ar-judge (resumable)
    python benchmarks/judge.py report               # -> benchmarks/results/judge.{json,md}
    python benchmarks/judge.py run --steps 4 --work /tmp/j   # smoke

The judge is ``ar-cpu`` (the parity study's same-budget AR model: 8k BPE of the bundled corpus,
d=112, L=256, 16 sequences per step) trained ``STEPS`` steps instead of 1000 (8x the tokens,
about 4.9 epochs of the training split; 4000 steps left the last quarter 1.7% better), cosine schedule, seed 0, evaluated like every study
run (whole validation split). Its samples' scores are ``tdlm genppl --judge runs/judge/ar-judge``
(``did_study.py sample``, ``scheduling.py --scale cpu``).

Convergence is read from the numbers, not assumed: the report gives the training-time
validation NLL curve, the relative change over the last quarter of the run and the gap to the
1000-step model (``runs/parity/ar-s0``) when that run exists. The judge counts as converged
when the last quarter changed it by less than ``CONVERGED_REL`` either way (a rise means it is
past its best: overfitting, reported as such) and it ends at least 1 nat under the
context-free level. A cosine schedule's decay flattens the last quarter by itself, so the rule
alone does not prove that more steps would not help: the gap to the 1000-step model is the
second reading.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import context_free_level, read_run, run_queue  # noqa: E402

STEPS = 8000
CONVERGED_REL = 0.01
NAME = "ar-judge"
SETS = [f"train.max_steps={STEPS}", "train.seed=0", "train.ckpt_every=100",
        "train.eval_every=200"]


def run(a) -> None:
    run_queue([(NAME, "ar-cpu", SETS, None)], Path(a.work), lanes=1, threads=a.threads,
              steps=a.steps, tag="judge")


def convergence(curve: list, final: float, rel: float = CONVERGED_REL,
                context_free: float | None = None) -> dict:
    """From the training-time curve [(step, tokens, NLL)]: the NLL at the start of the last
    quarter (the evaluation nearest 3/4 of the last step), the relative improvement from it to
    the last evaluation, and whether that is below ``rel`` -- and, when ``context_free`` (the
    unigram level, ``study.context_free_level``) is given, the final NLL at least 1 nat below
    it (a flat curve at the start of training is not convergence). A rising last quarter
    (``overfitting``) and a curve of fewer than 4 evaluations are not converged."""
    if len(curve) < 4:
        return {"converged": False, "why": f"{len(curve)} evaluations (at least 4 needed)",
                "final_nll": final, "context_free": context_free}
    last = curve[-1][0]
    q = min(curve, key=lambda c: abs(c[0] - 0.75 * last))
    gain = (q[2] - curve[-1][2]) / q[2]
    return {"quarter_step": q[0], "quarter_nll": q[2], "last_step": last,
            "last_nll": curve[-1][2], "final_nll": final, "last_quarter_rel_gain": gain,
            "threshold": rel, "context_free": context_free, "overfitting": gain <= -rel,
            "converged": abs(gain) < rel and (context_free is None
                                              or final < context_free - 1.0)}


def report(a) -> dict:
    work, out = Path(a.work), Path(a.out)
    r = read_run(work / NAME)
    if r is None:
        raise SystemExit(f"judge: {work / NAME} has not finished (run `judge.py run` first)")
    f = r["final"]
    res = {"command": "python benchmarks/judge.py run && python benchmarks/judge.py report",
           "run": str(work / NAME), "steps": r["steps"], "tokens": r["tokens"],
           "final": {k: f.get(k) for k in ("nelbo_per_token", "stderr_per_token", "tokens")},
           "curve": r["curve"],
           "convergence": convergence(r["curve"], f["nelbo_per_token"], context_free=(
               (context_free_level(work / NAME) or {}).get("nats")))}
    short = read_run(Path(a.short)) if a.short else None
    if short:
        res["short"] = {"run": a.short, "steps": short["steps"],
                        "nll": short["final"]["nelbo_per_token"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "judge.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    c = res["convergence"]
    L = [f"# The AR judge of generative perplexity (ar-cpu, {r['steps']} steps)", "", f"Command: `{res['command']}`", "",
         f"Final validation NLL/token (whole split, ± SE across batches): "
         f"**{f['nelbo_per_token']:.4f} ± {f.get('stderr_per_token') or 0:.4f}** after "
         f"{r['steps']} steps ({r['tokens']:,} tokens).", ""]
    verdict = "**converged**" if c["converged"] else "**not converged**"
    if "why" in c:
        L.append(f"{verdict}: {c['why']}.")
    else:
        moved = c["last_quarter_rel_gain"]
        L.append(f"Last quarter (step {c['quarter_step']} -> {c['last_step']}): "
                 f"{c['quarter_nll']:.4f} -> {c['last_nll']:.4f} ("
                 + (f"{100 * moved:.2f}% better" if moved >= 0 else
                    f"{-100 * moved:.2f}% worse: past its best, overfitting")
                 + f"); {verdict} by the rule (under {100 * CONVERGED_REL:.0f}% either way"
                 + (f", and 1 nat under the context-free level {c['context_free']:.4f}"
                    if c["context_free"] else "") + "). A cosine schedule's decay flattens the "
                 "last quarter by itself" + (": read the gap to the shorter run below as well."
                                             if short else "."))
    if short:
        L += ["", f"The same model after {short['steps']} steps ({a.short}): "
              f"{short['final']['nelbo_per_token']:.4f}: the longer run is "
              f"{short['final']['nelbo_per_token'] - f['nelbo_per_token']:.3f} nats better."]
    L += ["", "| step | validation NLL/token (training-time, 16 batches) |", "|---|---|"]
    L += [f"| {s} | {v:.4f} |" for s, _, v in r["curve"]]
    (out / "judge.md").write_text("\n".join(L) + "\n")
    print(L[4])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "report"])
    p.add_argument("--work", default="runs/judge")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--short", default="runs/parity/ar-s0",
                   help="the same model at the study budget, for comparison ('' for none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, help="override max_steps (smoke tests only)")
    a = p.parse_args(argv)
    run(a) if a.what == "run" else report(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
