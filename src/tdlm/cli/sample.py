"""``tdlm sample``: samples of one checkpoint (or, with ``--model``/``--schedule``, of
several models under a schedule) written as JSONL + meta (``tdlm.outputs``)."""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConfigError, TdlmError
from ..store.checkpoint import run_dir_of


def _sample(ckpt_path: str, num: int, steps: int, seed: int, temperature: float, top_p: float,
            seq_len: int | None, out: str | None,
            steps_split: str | None = None, trajectory: bool = False,
            prompt: str | None = None, device: str = "cpu") -> tuple[list, Path]:
    from ..outputs import sample_records, write_samples
    from ..pipeline import load
    from ..sampling.options import check_sample_args, encode_prompt, parse_steps_split
    check_sample_args(steps, num, seq_len, temperature, top_p)
    pipe = load(ckpt_path, device=device)
    if seq_len and seq_len > pipe.cfg.model.max_seq_len:
        raise TdlmError(f"--seq-len {seq_len} exceeds the model's max_seq_len "
                        f"{pipe.cfg.model.max_seq_len}")
    extra = {}
    if steps_split:
        extra["steps_split"] = parse_steps_split(steps_split, pipe.cfg, pipe.family, steps)
    opts = pipe.family.sample_options
    if trajectory and "trajectory" not in opts:
        raise ConfigError(f"--trajectory applies to insertion models only (not "
                          f"{pipe.cfg.model.family!r})")
    if prompt is not None:
        extra["prefix"] = encode_prompt(pipe.tokenizer, prompt, num)
    traj = [] if trajectory else None
    stats: dict = {}
    if "trajectory" in opts:
        extra["trajectory"] = traj
    if "stats" in opts:
        extra["stats"] = stats
    t0 = time.perf_counter()
    ids = pipe.generate_ids(num, steps, seq_len=seq_len, seed=seed, temperature=temperature,
                            top_p=top_p, **extra)
    dt = time.perf_counter() - t0
    recs = sample_records(pipe.tokenizer, ids)
    out_path = Path(out) if out else run_dir_of(pipe.checkpoint.path) / "samples" / "samples.jsonl"
    meta = {"checkpoint": str(pipe.checkpoint.path), "family": pipe.cfg.model.family,
            "num": num, "steps": steps, "seed": seed,
            "temperature": temperature, "top_p": top_p, "gumbel": "float64",
            "seconds": dt, "seconds_per_sample": dt / num, "prompt": prompt,
            "steps_split_root_to_leaf": steps_split or "even", "device": str(pipe.device),
            **pipe.family.describe(), **stats}
    write_samples(out_path, recs, meta, pipe.tokenizer, traj, pipe.family.variable_length)
    return recs, out_path


def cmd_sample(args) -> int:
    from ..scheduling.cli import cmd_sample_scheduled, wants_scheduled
    if wants_scheduled(args):        # --model/--schedule/--prefix-from-val: scheduled sampler
        return cmd_sample_scheduled(args)
    if not args.checkpoint:
        raise ConfigError("no model: give a checkpoint folder or --model NAME=PATH")
    recs, path = _sample(args.checkpoint, args.num, args.steps, args.seed, args.temperature,
                         args.top_p, args.seq_len, args.out, args.steps_split,
                         trajectory=args.trajectory, prompt=args.prompt, device=args.device)
    for r in recs[:args.show]:
        print(f"--- sample {r['id']} ---\n{r['text'][:600]}")
    print(f"samples: {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate samples (JSONL with text and ids)")
    p.add_argument("checkpoint", nargs="?", help="run or checkpoint folder (or --model NAME=PATH)")
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--show", type=int, default=3)
    p.add_argument("--steps-split", help="TDLM: steps per level, root to leaves, e.g. 32,96 "
                   "(default: even)")
    p.add_argument("--out", help="JSONL path (default: <run>/samples/samples.jsonl)")
    p.add_argument("--prompt", help="text every sample starts with (DID: kept fixed, insertions "
                   "only after it; MDLM/TDLM: clamped prefix)")
    p.add_argument("--trajectory", action="store_true",
                   help="DID: also write every step's sequences (<out>.trajectory.jsonl)")
    from ..scheduling.cli import add_sample_schedule_args
    add_sample_schedule_args(p)      # --model, --schedule, --light/--heavy, --prefix-from-val
    p.set_defaults(fn=cmd_sample)
