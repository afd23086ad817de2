"""One sampling path from checkpoints to files (layer 5): ``tdlm sample`` with one model or
several under a model schedule, and the main job's samples.

A single model is a one-model plan: :func:`generate_to_files` loads the named models
(:func:`tdlm.scheduling.sampler.load_scheduled`), resolves the schedule (one model: that
model at every step), samples through ``Pipeline.sample`` (``SampleResult``) and writes the
records, the meta (settings, the family's ``describe``, the sampler's stats, forward calls
and FLOPs), the optional trajectory (with ``html``: the viewer page, :mod:`tdlm.viewer`) and,
for variable-length families, the length histogram through :mod:`tdlm.outputs`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .config.sections import BOS_LED_LAYOUTS
from .errors import ConfigError
from .outputs import sample_records, write_samples
from .store.checkpoint import run_dir_of


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "schedule"


def generate_to_files(paths: dict, num: int, steps: int, seed: int = 0,
                      temperature: float = 1.0, top_p: float = 1.0,
                      seq_len: Optional[int] = None, out=None, steps_split=None,
                      schedule=None, light=None, heavy=None, prefix_from_val=None,
                      device: str = "cpu", prompt=None, trajectory: bool = False,
                      html: bool = False) -> tuple[list, Path, dict]:
    """Sample ``num`` sequences from the models ``paths`` (name -> checkpoint; one model, or
    several with a ``schedule``) and write ``<out>.jsonl`` + ``.meta.json`` (default
    ``<run>/samples/samples.jsonl``; a schedule or validation prefixes get their own name);
    ``trajectory``: also every step's state (``<out>.trajectory.jsonl``); ``html``: the
    trajectory and its viewer page ``<out>.html``. Returns (records, path, meta)."""
    from .eval.genppl import vocab_ids_hash
    from .sampling.options import check_sample_args, encode_prompt, parse_steps_split
    from .scheduling.sampler import load_scheduled, prefixes_from_validation
    check_sample_args(steps, num, seq_len, temperature, top_p)
    if prefix_from_val is not None and prefix_from_val < 1:
        raise ConfigError(f"--prefix-from-val must be >= 1, got {prefix_from_val}")
    if prompt is not None and prefix_from_val is not None:
        raise ConfigError("give either --prompt or --prefix-from-val, not both")
    sampler = load_scheduled(paths, device=device)
    cfg, fam, tok = sampler.cfg, sampler.primary.family, sampler.tokenizer
    if seq_len is not None and seq_len > cfg.backbone.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_seq_len "
                          f"{cfg.backbone.max_seq_len}")
    trajectory = trajectory or html
    if trajectory and "trajectory" not in fam.sample_options:
        raise ConfigError(f"--{'html' if html else 'trajectory'}: the {cfg.family.name!r} "
                          "sampler does not record trajectories")
    split = parse_steps_split(steps_split, cfg, fam, steps) if steps_split else None
    if schedule is None and len(paths) > 1:
        raise ConfigError(f"{len(paths)} models given: choose a --schedule, e.g. sandwich:0.25")
    sched = sampler.resolve(schedule or next(iter(paths)), steps, light, heavy, split)
    kw, info = {}, None
    if prompt is not None:
        kw["prefix"] = encode_prompt(tok, prompt, num,
                                     bos=cfg.data.layout in BOS_LED_LAYOUTS)
    if prefix_from_val is not None:
        if seq_len is not None and seq_len != cfg.data.seq_len:
            raise ConfigError("--prefix-from-val samples at the model's seq_len; drop --seq-len")
        kw["prefix"], info = prefixes_from_validation(sampler.primary, num, prefix_from_val)
    if trajectory:
        kw["trajectory"] = True
    res = sampler.sample(num, steps, schedule=sched, seed=seed, temperature=temperature,
                         top_p=top_p, seq_len=seq_len, steps_split=split, **kw)
    rep = sampler.last_report
    prefix_len = int(kw["prefix"].shape[1]) if "prefix" in kw else 0
    recs = sample_records(tok, res.sequences(), prefix_len, info)
    first = sampler.primary.checkpoint.path
    if out:
        out_path = Path(out)
    else:
        plain = len(paths) == 1 and info is None
        name = "samples.jsonl" if plain else (
            f"samples-{_slug(sched.spec)}" + (f"-prefix{prefix_from_val}" if info else "")
            + ".jsonl")
        out_path = run_dir_of(first) / "samples" / name
    meta = {"checkpoint": str(first),
            "checkpoints": {n: str(p.checkpoint.path) for n, p in sampler.pipes.items()},
            "family": cfg.family.name, "num": num, "steps": steps, "seed": seed,
            "temperature": temperature, "top_p": top_p, "gumbel": "float64",
            "seconds_per_sample": rep["seconds"] / num,
            "steps_split_root_to_leaf": steps_split or "even",
            "tokenizer": {"name": tok.name, "vocab_hash": tok.vocab_hash(),
                          "vocab_ids_hash": vocab_ids_hash(tok.hf)},
            "device": str(sampler.primary.device),
            "prefix_len": prefix_len,
            "prefix_source": (f"first {prefix_from_val} tokens of validation documents"
                              if info else ("prompt" if prompt is not None else None)),
            "prompt": prompt, **fam.describe(), **rep, **res.stats}
    traj, labels = res.trajectory, None
    if traj is not None:
        ids = {i for rec in traj for row in rec["ids"] for i in row}
        counts = _token_counts(run_dir_of(first), cfg) if max(ids) >= tok.vocab_size else None
        labels = fam.state_labels(ids, counts, tok.decode)
    meta = write_samples(out_path, recs, meta, tok, traj, fam.variable_length, labels, html)
    return recs, out_path, meta


def _token_counts(run_dir: Path, cfg, limit: int = 20_000_000):
    """Token occurrences in (the first ``limit`` tokens of) the run's training data, from its
    token cache (``data.json`` names it), or None when it is not at hand (e.g. an exported
    model): what ranks a TDLM cluster's members in the viewer."""
    import json

    import numpy as np

    from .data.cache import load_cache
    try:
        prov = json.loads((Path(run_dir) / "data.json").read_text())
    except (OSError, ValueError):
        return None
    V = cfg.backbone.vocab_size
    for key in (prov.get("train_cache"), prov.get("val_cache")):
        cache = load_cache(cfg.data.cache_path, key, verify=False) if key else None
        if cache is not None and cache.n_tokens:
            return np.bincount(np.asarray(cache.tokens[:limit], dtype=np.int64),
                               minlength=V)[:V]
    return None
