"""Model-scheduling studies that write their outputs (layer 5): step-importance analysis and
the segment search (``tdlm schedule analyze`` / ``search`` parse arguments and call these).

``analyze_to_files``: ``step_importance.csv`` (per-t masked-token loss of both models, gap,
KL both ways on the same noised validation input), ``step_importance_trajectory.csv`` (the
same on the heavy model's own trajectories), ``step_importance.png`` and ``analysis.json``.
``search_to_files``: ``search.csv`` / ``search.json`` (every light/heavy assignment of the
segments: saved FLOPs, generative perplexity, entropy per seed) and ``frontier.png``. A
search writes every scored schedule to ``partial.jsonl`` as it goes (first line: the settings);
run again with the same settings, it resumes from there (other settings: it starts over).
Every sampled schedule's samples go to ``samples/<mask>.jsonl.gz`` (genppl records + ``seed``,
gzip: a search of 38 schedules x 128 samples of 256 tokens is ~12 MB as text), so
``rescore_to_files`` (``tdlm schedule rescore``) scores a finished search again under
another judge without the models or sampling again.
"""
from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

from ..errors import ConfigError
from ..sampling.options import PREFIX_CONVENTION
from ..utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .analysis import (analyze_steps, analyze_trajectories, pareto_front, plot_analysis,
                       plot_frontier, score_samples, segment_search, write_csv)


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
    "frontier", "files"}``. ``judge`` None: sampled and kept, not scored (no gen PPL columns,
    no frontier; search.json's ``judge`` is None; the judge-free entropy columns are there)
    until :func:`rescore_to_files`."""
    from ..eval.genppl import vocab_ids_hash
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"models": {n: str(p.checkpoint.path) for n, p in sampler.pipes.items()},
                "light": light, "heavy": heavy, "steps": steps, "segments": segments,
                "light_segments": light_segments, "num": num, "seeds": list(seeds),
                "batch": batch, "temperature": temperature, "top_p": top_p,
                "masks": list(masks), "prefix_from_val": prefix_from_val,
                "prefix_convention": PREFIX_CONVENTION if prefix_from_val else None,
                "judge": _judge_key(judge)}
    done = _resume_rows(out / "partial.jsonl", settings)

    def record(i, n, row):
        if row["mask"] not in done:
            with open(out / "partial.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if progress:
            progress(i, n, row)

    (out / "samples").mkdir(exist_ok=True)

    def keep(mask, by_seed):
        write_kept(kept_samples(out, mask), by_seed)

    rows = segment_search(sampler, judge, steps, segments, light_segments,
                          num, seeds, light, heavy, batch=batch,
                          temperature=temperature, top_p=top_p, progress=record,
                          extra_masks=masks, prefix=prefix, done=done, keep=keep)
    meta = {"models": settings["models"], "light": light, "heavy": heavy, "steps": steps,
            "segments": segments, "light_segments": light_segments, "num": num, "seeds": seeds,
            "temperature": temperature, "top_p": top_p, "gumbel": "float64",
            "prefix_from_val": prefix_from_val,
            "prefix_convention": settings["prefix_convention"],
            "judge": judge.info() if judge is not None else None,
            "sample_vocab_hash": (vocab_ids_hash(sampler.tokenizer.hf)
                                  if hasattr(sampler.tokenizer, "hf") else None)}
    front = _write_search(out, rows, meta, judge.label if judge is not None else None)
    return {"rows": rows, "frontier": front,
            "files": [out / f for f in ("search.csv", "frontier.png", "search.json")
                      if (out / f).exists()]}


def kept_samples(out, mask: str) -> Path:
    """Where a search in ``out`` keeps schedule ``mask``'s samples."""
    return Path(out) / "samples" / f"{mask}.jsonl.gz"


def write_kept(path: Path, by_seed: dict) -> None:
    """``{seed: [genppl records]}`` as gzipped JSON lines (each record + its ``seed``),
    written atomically; byte-identical for the same samples (no gzip timestamp)."""
    text = "".join(json.dumps({"seed": s, **r}) + "\n" for s, recs in by_seed.items()
                   for r in recs)
    atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), mtime=0))


def read_kept(path: Path) -> dict:
    """:func:`write_kept`'s file back as ``{seed: [records]}`` (seeds in file order)."""
    by_seed: dict = {}
    for line in gzip.decompress(Path(path).read_bytes()).decode("utf-8").splitlines():
        rec = json.loads(line)
        by_seed.setdefault(rec.pop("seed"), []).append(rec)
    return by_seed


def _write_search(out: Path, rows: list, meta: dict, judge_label) -> list:
    """Mark the frontier in ``rows``; write search.csv, frontier.png and search.json (``meta``
    + rows); returns the frontier. Unscored rows (``judge_label`` None): no frontier, no
    plot."""
    front = pareto_front(rows) if judge_label is not None else []
    fm = {r["mask"] for r in front}
    for r in rows:
        r["frontier"] = r["mask"] in fm
    write_csv(out / "search.csv", rows)
    if judge_label is not None:
        plot_frontier(rows, out / "frontier.png",
                      f"{meta['steps']} steps in {meta['segments']} segments, {meta['num']} "
                      f"samples x {len(meta['seeds'])} seeds; judge {judge_label[:60]}")
    atomic_write_json(out / "search.json", {**meta, "rows": rows})
    return front


def rescore_to_files(out, judge, progress=None) -> dict:
    """Score the finished search in ``out`` again under ``judge`` (a loaded
    :class:`tdlm.eval.genppl.Judge`) from its stored samples (:func:`kept_samples`): the
    judged columns of every row (:func:`tdlm.scheduling.analysis.score_samples`) are
    replaced, the saved FLOPs, forward calls and sampling seconds kept; search.csv,
    frontier.png, search.json (``judge`` the new one, ``rescored_from`` the old judge's info)
    and ``partial.jsonl`` (its settings name the new judge, so a search run with it resumes
    rather than samples again) are rewritten. Returns ``{"rows", "frontier", "files"}``."""
    out = Path(out)
    sj = out / "search.json"
    if not sj.exists():
        raise ConfigError(f"{out} holds no finished search (no search.json)")
    meta = json.loads(sj.read_text())
    rows = meta.pop("rows")
    missing = [r["mask"] for r in rows if not kept_samples(out, r["mask"]).exists()]
    if missing:
        raise ConfigError(f"{out} has no stored samples for {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''} (searched before samples were "
                          "kept): run the search again")
    tok_hash = meta.get("sample_vocab_hash")     # None (older searches): retokenise the text
    new = []
    for i, r in enumerate(rows):
        by_seed = read_kept(kept_samples(out, r["mask"]))
        if sorted(by_seed) != sorted(meta["seeds"]):
            raise ConfigError(f"{kept_samples(out, r['mask'])} holds seeds {sorted(by_seed)}, "
                              f"the search {meta['seeds']}")
        judged = score_samples(by_seed, judge, tok_hash)
        keep = {k: v for k, v in r.items() if k not in judged and not k.startswith(
            ("ppl_seed_", "entropy_seed_"))}
        new.append({**keep, **judged})
        if progress:
            progress(i + 1, len(rows), new[-1])
    meta["rescored_from"] = meta["judge"]
    meta["judge"] = judge.info()
    front = _write_search(out, new, meta, judge.label)
    part = out / "partial.jsonl"
    if part.exists():
        head = json.loads(part.read_text().splitlines()[0])["settings"]
        head["judge"] = _judge_key(judge)
        atomic_write_text(part, "".join(json.dumps(x) + "\n" for x in [{"settings": head},
                                                                        *new]))
    return {"rows": new, "frontier": front,
            "files": [out / f for f in ("search.csv", "frontier.png", "search.json")]}


def _judge_key(judge):
    """How ``partial.jsonl`` names the judge its rows were scored by: the label and, where
    known, the weights fingerprint (a judge trained again at the same path, same label, is
    another judge: a stopped search does not resume under it). None: not scored."""
    if judge is None:
        return None
    return judge.label + (f" [weights {judge.weights_id[:16]}]" if judge.weights_id else "")


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
