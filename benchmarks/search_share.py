"""The segment search with and without shared plan prefixes, on trained models, in one process.

    python benchmarks/search_share.py            # -> benchmarks/results/search_share.{json,md}

``tdlm.scheduling.analysis.segment_search`` samples every schedule with the same random draws
per seed, so schedules that agree on their first segments reach the same state there; with
``share_prefixes`` a ``PrefixMemo`` keeps the state at every segment end and a schedule resumes
from the longest prefix already sampled. This script runs the search over the same candidates
twice -- sharing off, then on -- and reports the wall-clock of each, the forward passes really
made (counted by a forward hook on each model), and whether every row's samples' scores agree exactly
(gen PPL, entropy, forward calls and saved FLOPs reported per schedule).

Models: the paper-shaped CPU MDLMs of the 1000-step scheduling pair (``--heavy``, ``--light``:
12 and 4 blocks, d=112, 8k BPE, L=256) and the same-budget AR model as the judge (``--judge``);
their quality does not matter here, only that they are real trained models of the study's size.
All 2-light-segment placements of 8 segments at T=64 plus heavy-only and light-only, ``--num``
samples x ``--seeds`` seeds, one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("mask", "gen_ppl", "entropy", "forward_calls", "saved_blocks", "saved_full")


def count_forwards(model: torch.nn.Module) -> list:
    """A one-element list that a forward pre-hook on ``model``'s DiT increments per real call
    (the sampler calls the model's features and output layer, not its ``forward``)."""
    from tdlm.nn.dit import backbone_of
    n = [0]
    (backbone_of(model) or model).register_forward_pre_hook(
        lambda *_: n.__setitem__(0, n[0] + 1))
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heavy", default="runs/sched-paper-1k/heavy")
    p.add_argument("--light", default="runs/sched-paper-1k/light")
    p.add_argument("--judge", default="runs/parity/ar-s0")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from tdlm.api import load_scheduled
    from tdlm.eval.genppl import load_judge
    from tdlm.scheduling.analysis import segment_search
    sampler = load_scheduled({"H": a.heavy, "L": a.light})
    made = {n: count_forwards(p.model) for n, p in sampler.pipes.items()}
    judge = load_judge(a.judge)
    res = {"command": "python benchmarks/search_share.py " + " ".join(argv or sys.argv[1:]),
           "settings": vars(a), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version()}
    rows = {}
    for share in (False, True):
        for c in made.values():
            c[0] = 0
        t0 = time.perf_counter()
        out = segment_search(sampler, judge, a.steps, a.segments, 2, a.num,
                             list(range(a.seeds)), share_prefixes=share)
        res[f"share_{share}"] = {"seconds": time.perf_counter() - t0,
                                 "forwards_made": {n: c[0] for n, c in made.items()},
                                 "schedules": len(out)}
        rows[share] = [{k: r[k] for k in KEYS} for r in out]
        print(f"share_prefixes={share}: {res[f'share_{share}']}", flush=True)
    res["rows_identical"] = rows[False] == rows[True]
    res["rows"] = rows[True]
    off, on = res["share_False"], res["share_True"]
    res["time_ratio"] = on["seconds"] / off["seconds"]
    res["forward_ratio"] = {n: on["forwards_made"][n] / off["forwards_made"][n]
                            for n in off["forwards_made"]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_share.json").write_text(json.dumps(res, indent=1))
    md = ["# Segment search: shared plan prefixes on vs off (trained CPU-scale MDLMs)", "",
          f"Command: `{res['command']}`; one thread, torch {res['torch']}, shared 2-core "
          "machine (both searches in one process, one after the other).", "",
          f"{off['schedules']} schedules (every placement of 2 light segments of "
          f"{a.segments}, plus heavy-only and light-only), T={a.steps}, {a.num} samples x "
          f"{a.seeds} seed(s); heavy `{a.heavy}`, light `{a.light}`, judge `{a.judge}`.", "",
          "| | sharing off | sharing on | on/off |", "|---|---|---|---|",
          f"| wall-clock (s, sampling + judging) | {off['seconds']:.1f} | {on['seconds']:.1f} | "
          f"{res['time_ratio']:.3f} |"]
    for n in off["forwards_made"]:
        md.append(f"| forward passes made by {n} | {off['forwards_made'][n]} | "
                  f"{on['forwards_made'][n]} | {res['forward_ratio'][n]:.3f} |")
    md += ["", f"Every schedule's row (gen PPL, entropy, forward calls, saved FLOPs) identical: "
           f"**{res['rows_identical']}**.", ""]
    (out / "search_share.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0 if res["rows_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
