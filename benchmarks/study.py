"""Shared machinery of the multi-run studies (``parity.py``, ``did_study.py``, the CPU-scale
scheduling models): a resumable queue of ``tdlm train`` runs, their final evaluation, reading a
finished run folder back, and confidence intervals across seeds.

A run is ``(name, preset, overrides, needs)``: ``tdlm train --preset P --set ...`` in
``work/name``; ``needs`` names a run whose final evaluation must exist before this one starts
(or None). :func:`commands` gives what is still to do for a run: nothing when
``final_eval/metrics.json`` exists; else train (``--resume`` when a checkpoint exists, fresh
otherwise) and then ``tdlm eval`` on the **whole** validation split with ``EVAL_REPEATS`` noise
draws (same batches and noise seed for every model). :func:`run_queue` runs the commands as
subprocesses with ``threads`` threads each, ``lanes`` at a time, in the given order, and logs
starts and exits to ``work/study.log``. SIGTERM to a training process writes a checkpoint, so
a study stopped anywhere resumes with the same command. Several queues may share a work
folder (one per core, say, each ``--lanes 1``): a run is claimed with an ``flock`` on
``work/<run>.lock`` before it starts (:func:`claim`), held by the queue and the run's own
processes, and a run another queue (or a run left by a killed queue) holds is left to it.

Confidence intervals (:func:`ci95`): mean and half-width ``t_{0.975, n-1} * s / sqrt(n)``
(Student t, n - 1 degrees of freedom), the half-width None for n < 2.
"""
from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

EVAL_REPEATS = 4
POLL_S = 5.0            # seconds between the queue's looks at its subprocesses
#: t_{0.975, df} for df = 1..30; larger df use 1.96 (a slight under-coverage)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
       17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
       25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def latest_step(run: Path) -> int:
    """The last step ``metrics.jsonl`` records (0 when there is none)."""
    m = run / "metrics.jsonl"
    if not m.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in m.read_text().splitlines() if line]
    return max(steps, default=0)


def commands(name: str, preset: str, sets: Sequence[str], work: Path,
             steps: Optional[int] = None, repeats: int = EVAL_REPEATS,
             clean: bool = True) -> list[list]:
    """The shell commands still needed for a run: train (fresh or --resume), then eval.
    ``steps`` overrides max_steps (smoke tests only; then 2 evaluation batches, 1 draw).
    ``clean`` removes the folder of a run stopped before its first checkpoint (so that the
    fresh start may write there); only the queue that holds the run's claim passes it."""
    run = work / name
    if (run / "final_eval" / "metrics.json").exists():
        return []
    cli = [sys.executable, "-m", "tdlm.cli"]
    extra = [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 2)}",
             f"train.ckpt_every={max(1, steps // 2)}"] if steps else []
    out = []
    cfg = run / "config.json"
    latest = run / "checkpoints" / "latest"
    finished = (cfg.exists() and latest.exists()
                and latest_step(run) >= json.loads(cfg.read_text())["train"]["max_steps"])
    if not finished:
        if latest.exists():
            out.append(cli + ["train", "--out", str(run), "--resume", "--no-progress"])
        else:
            if run.exists() and clean:
                shutil.rmtree(run)              # a run stopped before its first checkpoint
            sets_all = [a for s in list(sets) + extra for a in ("--set", s)]
            out.append(cli + ["train", "--preset", preset, *sets_all, "--out", str(run),
                              "--no-progress"])
    # a smoke run (``steps``) is evaluated on 2 batches, once
    out.append(cli + ["eval", str(run), "--batches", "2" if steps else "0",
                      "--repeats", "1" if steps else str(repeats),
                      "--out", str(run / "final_eval"), "--json"])
    return out


def claim(work: Path, name: str) -> Optional[int]:
    """An exclusive ``flock`` on ``work/name.lock`` for this run, or None while another open
    file (another queue, or a training process still running from one) holds it. The lock
    lives as long as any process holds the returned descriptor: the queue passes it to the
    run's processes, so a run whose queue was killed stays claimed until it ends, and the
    kernel drops the lock of processes that are gone (no pids to go stale). Lock files are
    left in place (removing them would race with a queue opening one)."""
    import fcntl
    import os
    fd = os.open(work / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def held(work: Path, name: str) -> bool:
    """Whether some process holds ``work/name.lock`` (:func:`claim`)."""
    import fcntl
    import os
    try:
        fd = os.open(work / f"{name}.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def run_queue(runs: Sequence[tuple], work: Path, lanes: int = 2, threads: int = 1,
              steps: Optional[int] = None, tag: str = "study") -> None:
    """Run every unfinished run of ``runs`` (``(name, preset, sets, needs)``), ``lanes`` at
    a time in order, each a subprocess with ``threads`` threads; see the module docstring.
    A run is claimed (:func:`claim`) before it starts and its commands are computed then, so
    two queues over the same folder (e.g. one per core) share the work: a run another queue
    holds is left to it, and a run that needs it waits for its final evaluation."""
    import os
    work.mkdir(parents=True, exist_ok=True)
    todo = [(n, p, s, need) for n, p, s, need in runs
            if commands(n, p, s, work, steps, clean=False)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    running: list = []
    with open(work / "study.log", "a") as log:
        def note(msg: str) -> None:
            print(f"[{tag}] {msg}", flush=True)
            log.write(f"{time.strftime('%F %T')} {msg}\n")
            log.flush()

        def ready_now() -> list:
            return [t for t in todo if t[3] is None
                    or (work / t[3] / "final_eval" / "metrics.json").exists()]

        while todo or running:
            ready = ready_now()
            if not ready and not running and not any(held(work, t[3]) for t in todo if t[3]):
                ready = ready_now()         # a needed run may have finished just now
                if not ready:
                    raise SystemExit(f"[{tag}] cannot start {[t[0] for t in todo]}: the runs "
                                     "they need did not finish")
            while ready and len(running) < lanes:
                item = ready.pop(0)
                todo.remove(item)
                name, preset, sets, _ = item
                fd = claim(work, name)
                if fd is None:
                    note(f"{name}: another queue holds it")
                    continue
                cmds = commands(name, preset, sets, work, steps)
                if not cmds:
                    os.close(fd)
                    continue
                note(f"start {name}")
                out = open(work / f"{name}.log", "a")
                script = " && ".join(shlex.join(c) for c in cmds)
                proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=out,
                                        stderr=subprocess.STDOUT, pass_fds=(fd,))
                running.append((name, proc, out, fd))
            time.sleep(POLL_S if todo or running else 0)
            for item in list(running):
                name, proc, out, fd = item
                if proc.poll() is not None:
                    running.remove(item)
                    out.close()
                    os.close(fd)
                    note(f"{name} exit {proc.returncode}")


def finished(run: Path) -> bool:
    """A run is finished when its final evaluation exists (what ``read_run`` reads)."""
    return (run / "final_eval" / "metrics.json").exists()


def read_run(run: Path) -> Optional[dict]:
    """A finished run folder (its final evaluation exists) as a dict: ``curve`` [(step,
    training tokens, val NELBO/token)] of the training-time evaluations, ``final`` (the final
    evaluation's metrics.json), ``steps``, ``tokens`` (data tokens seen), ``tokens_per_s``
    (median of the logged training throughput), ``train_flops`` {step: cumulative training
    FLOPs} where the trainer logged them (``curve_flops`` [(step, FLOPs, val NELBO/token)]),
    ``config``; None when unfinished."""
    if not finished(run):
        return None
    cfg = json.loads((run / "config.json").read_text())
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    tr = cfg["train"]
    tokens_per_step = tr["global_batch"] * cfg["data"]["seq_len"]
    val, flops = {}, {}
    for r in recs:          # a resumed run may log a step twice: the later record wins
        if r.get("split") == "val" and "nelbo_per_token" in r:
            val[r["step"]] = r["nelbo_per_token"]
        if r.get("train_flops") is not None:
            flops[r["step"]] = r["train_flops"]
    tps = [r["tokens_per_s"] for r in recs if r.get("split") == "train" and "tokens_per_s" in r]
    return {"curve": [(s, s * tokens_per_step, v) for s, v in sorted(val.items())],
            "train_flops": flops,
            "curve_flops": [(s, flops[s], v) for s, v in sorted(val.items()) if s in flops],
            "final": json.loads((run / "final_eval" / "metrics.json").read_text()),
            "steps": tr["max_steps"], "tokens": tr["max_steps"] * tokens_per_step,
            "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None, "config": cfg}


#: what :func:`archive` leaves out: the weights and what a run rebuilds (tokenizers, caches)
ARCHIVE_SKIP = ("checkpoints", "tokenizer.json", "tokenizer_meta.json")
ARCHIVE_MAX_BYTES = 2 << 20


def archive(work: Path, dest: Path, too_big: Optional[list] = None) -> list[Path]:
    """Copy a study folder's small outputs into ``dest`` (committed beside the results), with
    the same layout: every file under ``work`` but the checkpoints, the tokenizers, lock
    files and files over ``ARCHIVE_MAX_BYTES``. A finished run's folder then reads back
    (:func:`read_run`, :func:`finished`) from ``dest`` as from ``work``, so a study's report
    regenerates from the committed copy on a machine that lost (or never had) ``runs/``;
    stages that need weights (sampling, new evaluations) still need ``work``. Returns the
    files copied (those whose content changed); the files left out for their size are
    appended to ``too_big`` (the command line names them)."""
    copied = []
    for f in sorted(work.rglob("*")):
        rel = f.relative_to(work)
        if not f.is_file() or f.suffix == ".lock" or any(p in ARCHIVE_SKIP for p in rel.parts):
            continue
        if f.stat().st_size > ARCHIVE_MAX_BYTES:
            if too_big is not None:
                too_big.append(f)
            continue
        out = dest / rel
        if out.exists() and out.read_bytes() == f.read_bytes():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        shutil.copyfile(f, tmp)
        tmp.replace(out)
        copied.append(out)
    return copied


def unigram_cross_entropy(train_counts, val_tokens, prior: float = 0.5) -> float:
    """``H = -(1/N) sum_i log p(x_i)`` over the validation tokens ``x_1..x_N`` under the
    training split's unigram ``p_v = (c_v + prior) / (sum_u c_u + prior V)`` (add-``prior``
    smoothing; ``train_counts`` has one count per vocabulary id): the loss of a model that
    ignores context. It is the *context-free level* of every family here: the AR NLL of that
    model; its masked-diffusion NELBO too, since with the same prediction ``p`` at every masked
    position the NELBO ``int alpha'_t / (1 - alpha_t) E[sum_masked log p] dt`` integrates the
    expected masked fraction's rate to ``H`` for any schedule (exactly over t in [0, 1] with
    alpha_1 = 0; the evaluated NELBO, t = t_min + (1 - t_min) u with u ~ U(0, 1) and
    alpha_1 = eps, is ``(1 - eps) H`` with the log-linear schedule: ``eps H`` short, 0.0067 nats
    at eps = 1e-3; ``parity.context_free_shortfall``); and TDLM's, whose tree factorisation
    of ``p`` telescopes to the same sum."""
    import numpy as np
    c = np.asarray(train_counts, dtype=np.float64) + prior
    logp = np.log(c) - np.log(c.sum())
    v = np.asarray(val_tokens, dtype=np.int64)
    return float(-logp[v].mean())


def context_free_level(run: Path) -> Optional[dict]:
    """:func:`unigram_cross_entropy` of a run's validation split under its training split,
    read from the token caches its ``data.json`` names (None when they are not on this
    machine): ``{"nats", "val_tokens", "train_tokens", "prior"}``."""
    try:
        data = json.loads((run / "data.json").read_text())
        cache_dir = json.loads((run / "config.json").read_text())["data"]["cache_dir"]
        keys = data["train_cache"], data["val_cache"]
    except (OSError, ValueError, KeyError):
        return None
    import os
    from tdlm.data.cache import load_cache
    tr, va = (load_cache(os.path.expanduser(cache_dir), k, verify=False) for k in keys)
    if tr is None or va is None:
        return None
    counts = tr.token_counts(int(data["vocab_size"]))
    return {"nats": unigram_cross_entropy(counts, va.tokens), "val_tokens": va.n_tokens,
            "train_tokens": tr.n_tokens, "prior": 0.5}


def ci95(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """(mean, 95% half-width across the values; None for fewer than 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def seeds_for_half_width(sd_value: float, half: float, most: int = 1000) -> Optional[int]:
    """The smallest n whose 95% half-width ``t_{0.975, n-1} * sd / sqrt(n)`` is at most
    ``half`` at the given spread (None beyond ``most``): how many seeds a target needs."""
    for n in range(2, most + 1):
        if T95.get(n - 1, 1.96) * sd_value / math.sqrt(n) <= half:
            return n
    return None


def sd(values: Sequence[float]) -> Optional[float]:
    """Sample standard deviation (n - 1); None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def progress(work: Path) -> list[dict]:
    """Every run folder under ``work`` (symlinks included) with its progress: ``step`` of
    ``max_steps``, ``evaluated`` (final evaluation done), the median logged training
    throughput and the hours the remaining steps take at it (None when not measured)."""
    rows = []
    for run in sorted(p for p in work.iterdir() if p.is_dir()):
        cfg_f = run / "config.json"
        if not cfg_f.exists():
            continue
        cfg = json.loads(cfg_f.read_text())
        tr = cfg["train"]
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
                if x] if (run / "metrics.jsonl").exists() else []
        step = max((r.get("step", 0) for r in recs), default=0)      # as latest_step
        tps = sorted(r["tokens_per_s"] for r in recs if r.get("split") == "train"
                     and r.get("tokens_per_s"))
        rate = tps[len(tps) // 2] if tps else None
        left = max(tr["max_steps"] - step, 0) * tr["global_batch"] * cfg["data"]["seq_len"]
        rows.append({"run": run.name, "step": step, "max_steps": tr["max_steps"],
                     "evaluated": (run / "final_eval" / "metrics.json").exists(),
                     "tokens_per_s": rate, "hours_left": left / rate / 3600 if rate else None})
    return rows


def main(argv=None) -> int:
    """``python benchmarks/study.py status [WORK ...]``: the progress of every study's runs
    (default: the study folders under runs/). ``python benchmarks/study.py finished RUN ...``:
    exit status 0 when every run folder is finished (its final evaluation exists), else 1
    (what a queue checks before a stage that needs those runs). ``python benchmarks/study.py
    archive WORK DEST``: :func:`archive`."""
    import argparse
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description="progress of the studies' runs")
    p.add_argument("what", choices=["status", "finished", "archive"])
    p.add_argument("work", nargs="*", default=["runs/parity", "runs/parity-gpt2", "runs/judge",
                                               "runs/sched-paper", "runs/did-study"])
    a = p.parse_args(argv)
    if a.what == "archive":                 # archive WORK DEST
        if len(a.work) != 2:
            p.error("archive takes WORK DEST")
        work, dest = map(Path, a.work)
        if not work.is_dir():
            p.error(f"{work}: no such study folder")
        big: list = []
        print(f"archived {len(archive(work, dest, big))} changed files of {work} into {dest}")
        for f in big:
            print(f"  left out (over {ARCHIVE_MAX_BYTES >> 20} MiB): {f} "
                  f"({f.stat().st_size / 2**20:.1f} MiB)")
        return 0
    if a.what == "finished":
        given = argv[1:]                       # no default folders here: runs must be named
        return 0 if given and all(finished(Path(w)) for w in given) else 1
    total = 0.0
    for w in map(Path, a.work):
        if not w.is_dir():
            print(f"{w}: not started")
            continue
        for r in progress(w):
            h = r["hours_left"]
            total += h or 0.0
            state = "done" if r["evaluated"] else ("trained, not evaluated"
                                                   if r["step"] >= r["max_steps"] else "")
            print(f"{w}/{r['run']:<24} {r['step']:>5}/{r['max_steps']:<5} "
                  f"{'' if r['tokens_per_s'] is None else format(r['tokens_per_s'], '.0f'):>6} "
                  f"tok/s  {'' if h is None else format(h, '.2f') + ' h left':<12} {state}")
    print(f"training hours left at the logged rates (one thread per run; runs not started "
          f"are not counted): {total:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
