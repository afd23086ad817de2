"""Model-scheduling studies that write their outputs (layer 5): step-importance analysis and
the segment search (``tdlm schedule analyze`` / ``search`` parse arguments and call these).

``analyze_to_files``: ``step_importance.csv`` (per-t masked-token loss of both models, gap,
KL both ways on the same noised validation input), ``step_importance_trajectory.csv`` (the
same on the heavy model's own trajectories), ``step_importance.png`` and ``analysis.json``.
``search_to_files``: ``search.csv`` / ``search.json`` (every light/heavy assignment of the
segments: saved FLOPs, generative perplexity, entropy per seed) and ``frontier.png``. A
search writes every scored schedule to ``partial.jsonl`` as it goes (first line: the settings);
run again with the same settings, it resumes from there (other settings: it starts over).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..utils.io import atomic_write_json
from .analysis import (analyze_steps, analyze_trajectories, pareto_front, plot_analysis,
                       plot_frontier, segment_search, write_csv)


def analyze_to_files(sampler, light: str, heavy: str, out, grid: int = 20, batches: int = 4,
                     batch_size: int = 16, seed: int = 0, trajectory_samples: int = 8,
                     trajectory_steps: int = 64) -> dict:
    """Run the analysis for ``sampler.pipes[heavy]`` vs ``[light]`` into ``out``; returns
    ``{"rows", "trajectory_rows", "files"}``."""
    H, L = sampler.pipes[heavy], sampler.pipes[light]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = analyze_steps(H, L, grid, batches, batch_size, seed)
    write_csv(out / "step_importance.csv", rows)
    traj = []
    if trajectory_samples > 0:
        traj = analyze_trajectories(H, L, trajectory_samples, trajectory_steps,
                                    seed)
        write_csv(out / "step_importance_trajectory.csv", traj)
    title = (f"heavy {heavy} ({H.cfg.backbone.n_layers} blocks) vs light {light} "
             f"({L.cfg.backbone.n_layers} blocks), {H.cfg.family.name}")
    plot_analysis(rows, traj, out / "step_importance.png", title)
    meta = {"heavy": {"name": heavy, "checkpoint": str(H.checkpoint.path)},
            "light": {"name": light, "checkpoint": str(L.checkpoint.path)},
            "grid": grid, "batches": batches, "batch_size": batch_size,
            "seed": seed, "trajectory_samples": trajectory_samples,
            "trajectory_steps": trajectory_steps, "seconds": time.perf_counter() - t0}
    atomic_write_json(out / "analysis.json", meta)
    files = [out / f for f in ("step_importance.csv", "step_importance_trajectory.csv",
                               "step_importance.png", "analysis.json") if (out / f).exists()]
    return {"rows": rows, "trajectory_rows": traj, "files": files}


def search_to_files(sampler, light: str, heavy: str, judge, out, steps: int, segments: int,
                    light_segments, num: int, seeds: list, batch: int = 0,
                    temperature: float = 1.0, top_p: float = 1.0, masks=(), prefix=None,
                    prefix_from_val=None, progress=None) -> dict:
    """Sample + judge every light/heavy assignment of ``segments`` segments (or those with
    ``light_segments`` light ones, plus ``masks``) into ``out``; returns ``{"rows",
    "frontier", "files"}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"models": {n: str(p.checkpoint.path) for n, p in sampler.pipes.items()},
                "light": light, "heavy": heavy, "steps": steps, "segments": segments,
                "light_segments": light_segments, "num": num, "seeds": list(seeds),
                "batch": batch, "temperature": temperature, "top_p": top_p,
                "masks": list(masks), "prefix_from_val": prefix_from_val,
                "judge": judge.label}
    done = _resume_rows(out / "partial.jsonl", settings)

    def record(i, n, row):
        if row["mask"] not in done:
            with open(out / "partial.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if progress:
            progress(i, n, row)

    rows = segment_search(sampler, judge, steps, segments, light_segments,
                          num, seeds, light, heavy, batch=batch,
                          temperature=temperature, top_p=top_p, progress=record,
                          extra_masks=masks, prefix=prefix, done=done)
    front = pareto_front(rows)
    fm = {r["mask"] for r in front}
    for r in rows:
        r["frontier"] = r["mask"] in fm
    write_csv(out / "search.csv", rows)
    plot_frontier(rows, out / "frontier.png",
                  f"{steps} steps in {segments} segments, {num} samples x "
                  f"{len(seeds)} seeds; judge {judge.label[:60]}")
    atomic_write_json(out / "search.json", {
        "models": {n: str(p.checkpoint.path) for n, p in sampler.pipes.items()},
        "light": light, "heavy": heavy, "steps": steps, "segments": segments,
        "light_segments": light_segments, "num": num, "seeds": seeds,
        "temperature": temperature, "top_p": top_p, "gumbel": "float64",
        "prefix_from_val": prefix_from_val,
        "judge": judge.info(), "rows": rows})
    return {"rows": rows, "frontier": front,
            "files": [out / f for f in ("search.csv", "frontier.png", "search.json")]}


def _resume_rows(path: Path, settings: dict) -> dict:
    """mask -> row of a stopped search with the same settings (``partial.jsonl``); otherwise
    the file is started afresh with the settings as its first line."""
    if path.exists():
        lines = path.read_text().splitlines()
        try:
            head = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            head = None
        if head == {"settings": json.loads(json.dumps(settings))}:
            rows = {}
            for line in lines[1:]:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:      # a line cut by the stop
                    break
                rows[r["mask"]] = r
            path.write_text("".join(json.dumps(x) + "\n"      # without a cut last line
                                    for x in [{"settings": settings}, *rows.values()]))
            return rows
    path.write_text(json.dumps({"settings": settings}) + "\n")
    return {}
