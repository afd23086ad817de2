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
validation NLL curve, the relative change over the last quarter of the run and, when the same
model trained half as long has finished (``--short``: the archived 4000-step judge,
``results/runs/judge-4000``; its weights were lost with a machine change, its evaluation is
kept), the change from doubling the budget. Two rules, each under ``CONVERGED_REL`` either way
(a rise means it is past its best: overfitting, reported as such) and the judge ending at
least 1 nat under the context-free level: the last quarter of the run (a cosine schedule's
decay makes the last quarter move by itself, even for a model that more steps would not
help), and doubling (final NLL of this run against the run half as long, both evaluated on the
whole validation split after their own full schedules). The judge counts as converged when the
doubling rule holds, or, without the shorter run, the last-quarter rule.

``results/judge.md`` is the 8000-step run's report (archived in ``results/runs/judge``):
5.1% better than the 4000-step run, so **not converged** by the doubling rule; the next
doubling is ``judge.py run --budget 16000 --work runs/judge-16000`` (about 7 h of one core,
resumable) and ``judge.py report --budget 16000 --work runs/judge-16000 --short
benchmarks/results/runs/judge/ar-judge``.
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
DEFAULT_WORK, DEFAULT_OUT = "runs/judge", "benchmarks/results"
SETS = ["train.seed=0", "train.ckpt_every=100", "train.eval_every=200"]


def run(a) -> None:
    """Train (or continue) ``a.work/ar-judge`` for ``a.budget`` steps (its cosine schedule
    spans them: a longer budget is a new run in another ``--work``, not a continuation)."""
    run_queue([(NAME, "ar-cpu", [f"train.max_steps={a.budget}", *SETS], None)], Path(a.work),
              lanes=1, threads=a.threads, steps=a.steps, tag="judge")


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


def doubling(final: float, steps: int, short: dict | None, rel: float = CONVERGED_REL,
             context_free: float | None = None) -> dict | None:
    """The doubling reading: ``short`` (``read_run`` of the same model trained at most half
    as many steps) against this run's final NLL: relative improvement, and converged when it
    is under ``rel`` either way and the final NLL is at least 1 nat under ``context_free``.
    None without a shorter run (or one longer than half)."""
    if not short or 2 * short["steps"] > steps:
        return None
    s = short["final"]["nelbo_per_token"]
    gain = (s - final) / s
    return {"short_steps": short["steps"], "short_nll": s, "final_nll": final,
            "rel_gain": gain, "threshold": rel, "overfitting": gain <= -rel,
            "converged": abs(gain) < rel and (context_free is None
                                              or final < context_free - 1.0)}


def report(a) -> dict:
    work, out = Path(a.work), Path(a.out)
    r = read_run(work / NAME)
    if r is None:
        raise SystemExit(f"judge: {work / NAME} has not finished (run `judge.py run` first)")
    f = r["final"]
    cf = (context_free_level(work / NAME) or {}).get("nats")
    short = read_run(Path(a.short)) if a.short else None
    extra = ((f" --budget {r['steps']}" if r["steps"] != STEPS else "")
             + (f" --work {a.work}" if a.work != DEFAULT_WORK else ""))
    res = {"command": f"python benchmarks/judge.py run{extra} && python benchmarks/judge.py "
                      f"report{extra}"
                      + (f" --out {a.out}" if a.out != DEFAULT_OUT else "")
                      + (f" --short {a.short}" if r["steps"] != STEPS and a.short else ""),
           "run": str(work / NAME), "steps": r["steps"], "tokens": r["tokens"],
           "final": {k: f.get(k) for k in ("nelbo_per_token", "stderr_per_token", "tokens")},
           "curve": r["curve"],
           "convergence": convergence(r["curve"], f["nelbo_per_token"], context_free=cf),
           "doubling": doubling(f["nelbo_per_token"], r["steps"], short, context_free=cf)}
    if short:
        res["short"] = {"run": a.short, "steps": short["steps"],
                        "nll": short["final"]["nelbo_per_token"]}
    c, d = res["convergence"], res["doubling"]
    res["converged"] = d["converged"] if d else c["converged"]
    res["converged_by"] = "doubling" if d else "last quarter"
    out.mkdir(parents=True, exist_ok=True)
    (out / "judge.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    word = lambda ok: "**converged**" if ok else "**not converged**"  # noqa: E731

    def moved(g):
        return (f"{100 * g:.2f}% better" if g >= 0 else
                f"{-100 * g:.2f}% worse: past its best, overfitting")
    L = [f"# The AR judge of generative perplexity (ar-cpu, {r['steps']} steps)", "",
         f"Command: `{res['command']}`", "",
         f"Final validation NLL/token (whole split, ± SE across batches): "
         f"**{f['nelbo_per_token']:.4f} ± {f.get('stderr_per_token') or 0:.4f}** after "
         f"{r['steps']} steps ({r['tokens']:,} tokens); verdict ({res['converged_by']} rule): "
         f"{word(res['converged'])}.", ""]
    floor = (f", and 1 nat under the context-free level {cf:.4f}" if cf else "")
    if "why" in c:
        L.append(f"Last quarter: {word(c['converged'])}: {c['why']}.")
    else:
        L.append(f"Last quarter (step {c['quarter_step']} -> {c['last_step']}): "
                 f"{c['quarter_nll']:.4f} -> {c['last_nll']:.4f} "
                 f"({moved(c['last_quarter_rel_gain'])}); {word(c['converged'])} by this rule "
                 f"(under {100 * CONVERGED_REL:.0f}% either way{floor}). A cosine schedule's "
                 "decay moves the last quarter by itself.")
    if d:
        L += ["", f"Doubling: the same model trained {d['short_steps']} steps ({a.short}) "
              f"ended at {d['short_nll']:.4f}; twice the steps: {d['final_nll']:.4f} "
              f"({moved(d['rel_gain'])}); {word(d['converged'])} by this rule (under "
              f"{100 * CONVERGED_REL:.0f}% either way{floor})."]
    elif short:
        L += ["", f"The same model after {short['steps']} steps ({a.short}): "
              f"{short['final']['nelbo_per_token']:.4f}: the longer run is "
              f"{short['final']['nelbo_per_token'] - f['nelbo_per_token']:.3f} nats better "
              "(more than half the steps: no doubling reading)."]
    L += ["", "| step | validation NLL/token (training-time, 16 batches) |", "|---|---|"]
    L += [f"| {s} | {v:.4f} |" for s, _, v in r["curve"]]
    (out / "judge.md").write_text("\n".join(L) + "\n")
    print(L[4])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "report"])
    p.add_argument("--work", default=DEFAULT_WORK)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--short", default="benchmarks/results/runs/judge-4000/ar-judge",
                   help="the same model trained half as long, for the doubling rule ('' for "
                        "none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=int, default=STEPS,
                   help="training steps (the next doubling: --budget 16000 --work "
                        "runs/judge-16000 --short <the 8000-step run>)")
    p.add_argument("--steps", type=int, help="override max_steps (smoke tests only)")
    a = p.parse_args(argv)
    run(a) if a.what == "run" else report(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
