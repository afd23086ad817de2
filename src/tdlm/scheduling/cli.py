"""Command-line parts of model scheduling and generative evaluation::

    tdlm sample --model H=runs/heavy --model L=runs/light --schedule sandwich:0.25 --steps 1000
    tdlm sample runs/x --prefix-from-val 32          # clamp 32 tokens of held-out documents
    tdlm genppl runs/x/samples/samples.jsonl --judge runs/ar   # or a local HF GPT-2 folder
    tdlm schedule analyze --model H=... --model L=...          # per-t loss gap and KL
    tdlm schedule search --model H=... --model L=... --judge runs/ar --segments 8

Registered by ``tdlm.cli.build_parser``; errors are one-line ConfigError/CheckpointError.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from ..store.checkpoint import run_dir_of
from ..utils.io import atomic_write_json
from .analysis import (analyze_steps, analyze_trajectories, pareto_front, plot_analysis,
                       plot_frontier, segment_search, write_csv)


def parse_model_args(items, positional=None) -> dict:
    """``NAME=PATH`` pairs -> {name: path} (order kept); a positional checkpoint alone is
    the model ``model``."""
    out: dict = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError(f"--model {it!r}: expected NAME=PATH, e.g. --model H=runs/heavy")
        n, p = it.split("=", 1)
        n = n.strip()
        if not n or not p:
            raise ConfigError(f"--model {it!r}: expected NAME=PATH, e.g. --model H=runs/heavy")
        if n in out:
            raise ConfigError(f"--model: the name {n!r} is given twice")
        out[n] = p
    if positional:
        if out:
            raise ConfigError("give either a checkpoint or --model NAME=PATH options, not both")
        out = {"model": positional}
    if not out:
        raise ConfigError("no model: give a checkpoint folder or --model NAME=PATH")
    return out


def add_sample_schedule_args(p) -> None:
    """Options of ``tdlm sample`` for model scheduling and prefixes."""
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a named checkpoint for scheduled sampling (repeat: H=runs/heavy "
                        "L=runs/light)")
    p.add_argument("--schedule", help="which model predicts at each step: L125,H750,L125 or "
                   "sandwich:0.25, light-first:0.25, light-last:0.25, light-middle:0.25, "
                   "random:0.25[:seed], interleave:4, levels:L,H (TDLM)")
    p.add_argument("--light", help="name of the light model for named schedules (default L)")
    p.add_argument("--heavy", help="name of the heavy model for named schedules (default H)")
    p.add_argument("--prefix-from-val", type=int, metavar="K",
                   help="clamp the first K tokens of held-out (validation) documents and "
                        "generate the rest")
    p.add_argument("--device", default="cpu")


def wants_scheduled(args) -> bool:
    """Named models, a schedule or validation prefixes; one checkpoint otherwise samples
    plainly (on any --device)."""
    return bool(getattr(args, "model", None) or getattr(args, "schedule", None)
                or getattr(args, "prefix_from_val", None) is not None)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "schedule"


def sample_scheduled(paths: dict, num: int, steps: int, seed: int = 0, temperature: float = 1.0,
                     top_p: float = 1.0, seq_len=None, out=None, steps_split=None,
                     schedule=None, light=None, heavy=None, prefix_from_val=None,
                     device: str = "cpu", prompt=None) -> tuple[list, Path, dict]:
    """Sample with named models under a schedule; write JSONL + .meta.json (with the schedule,
    forward calls, FLOPs and savings, wall-clock). Returns (records, path, meta)."""
    from ..eval.genppl import vocab_ids_hash
    from ..outputs import sample_records, write_samples
    from ..sampling.options import check_sample_args, encode_prompt, parse_steps_split
    from .sampler import load_scheduled, prefixes_from_validation
    check_sample_args(steps, num, seq_len, temperature, top_p)
    if prefix_from_val is not None and prefix_from_val < 1:
        raise ConfigError(f"--prefix-from-val must be >= 1, got {prefix_from_val}")
    sampler = load_scheduled(paths, device=device)
    cfg = sampler.cfg
    split = None
    if steps_split:
        split = parse_steps_split(steps_split, cfg, sampler.primary.family, steps)
    if schedule is None and len(paths) > 1:
        raise ConfigError(f"{len(paths)} models given: choose a --schedule, e.g. sandwich:0.25")
    if schedule is None:
        schedule = next(iter(paths))
    sched = sampler.resolve(schedule, steps, light, heavy, split)
    kw = {}
    info = None
    if prompt is not None and prefix_from_val is not None:
        raise ConfigError("give either --prompt or --prefix-from-val, not both")
    if prompt is not None:
        kw["prefix"] = encode_prompt(sampler.tokenizer, prompt, num)
    if prefix_from_val is not None:
        if seq_len is not None and seq_len != cfg.data.seq_len:
            raise ConfigError("--prefix-from-val samples at the model's seq_len; drop --seq-len")
        kw["prefix"], info = prefixes_from_validation(sampler.primary, num, prefix_from_val)
    ids = sampler.generate_ids(num, steps, schedule=sched, seed=seed, temperature=temperature,
                               top_p=top_p, seq_len=seq_len, steps_split=split, **kw)
    rep = sampler.last_report
    tok = sampler.tokenizer
    recs = sample_records(tok, ids, int(kw["prefix"].shape[1]) if "prefix" in kw else 0, info)
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
            "family": cfg.model.family, "num": num, "steps": steps, "seed": seed,
            "temperature": temperature, "top_p": top_p, "gumbel": "float64",
            "steps_split_root_to_leaf": steps_split or "even",
            "tokenizer": {"name": tok.name, "vocab_hash": tok.vocab_hash(),
                          "vocab_ids_hash": vocab_ids_hash(tok.hf)},
            "device": str(sampler.primary.device),
            "prefix_len": int(kw["prefix"].shape[1]) if "prefix" in kw else 0,
            "prefix_source": (f"first {prefix_from_val} tokens of validation documents"
                              if info else ("prompt" if prompt is not None else None)),
            "prompt": prompt,
            **rep}
    return recs, out_path, write_samples(out_path, recs, meta)


def cmd_sample_scheduled(args) -> int:
    if getattr(args, "trajectory", False):
        raise ConfigError("--trajectory applies to did models, which are not scheduled")
    paths = parse_model_args(args.model, args.checkpoint)
    recs, path, meta = sample_scheduled(
        paths, args.num, args.steps, args.seed, args.temperature, args.top_p, args.seq_len,
        args.out, args.steps_split, args.schedule, args.light, args.heavy, args.prefix_from_val,
        args.device, getattr(args, "prompt", None))
    for r in recs[:args.show]:
        print(f"--- sample {r['id']} ---\n{r['text'][:600]}")
    calls = ", ".join(f"{n} {c}" for n, c in meta["forward_calls"].items())
    saved = ("" if meta["saved_blocks"] is None else
             f"block FLOPs saved {100 * meta['saved_blocks']:.1f}% (full "
             f"{100 * meta['saved_full']:.1f}%) vs {meta['reference']['model']} alone; ")
    print(f"schedule {meta['schedule']['run_length'][:80]}; forward calls: {calls}; "
          f"{saved}{meta['seconds']:.2f} s")
    print(f"samples: {path}")
    return 0


# ---- genppl ------------------------------------------------------------------------------
def cmd_genppl(args) -> int:
    from ..eval.genppl import genppl_file
    res, dest = genppl_file(args.samples, args.judge, args.out, args.eos, args.batch_size,
                            args.device, args.precision)
    res.pop("per_sample", None)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        print(f"gen PPL {res['gen_ppl']:.2f}  entropy {res['entropy']:.3f}  "
              f"({res['num_samples']} samples, {res['tokens']} tokens scored, eos={res['eos']}, "
              f"{'retokenised' if res['retokenised'] else 'same tokenizer'})")
        print(f"judge: {res['judge']['label']}")
    print(f"metrics: {dest}", file=sys.stderr if args.json else sys.stdout)
    return 0


def add_scheduling_parsers(sub) -> None:
    """Register ``tdlm genppl`` and ``tdlm schedule {analyze,search}``."""
    p = sub.add_parser("genppl", help="generative perplexity (+ unigram entropy) of samples "
                       "under a judge LM")
    p.add_argument("samples", help="samples JSONL written by tdlm sample")
    p.add_argument("--judge", required=True, help="a tdlm AR run/checkpoint folder or a local "
                   "Hugging Face causal LM folder (e.g. GPT-2 Large)")
    p.add_argument("--out", help="metrics .json path or folder (default: next to the samples)")
    p.add_argument("--eos", default="first", choices=["first", "mdlm", "none"],
                   help="tokens counted: up to the first EOS (default), MDLM's mask, or all")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_genppl)
    add_schedule_parser(sub)


# ---- tdlm schedule analyze / search (step importance, segment search) -------------------------
def _pipes(args):
    from .sampler import load_scheduled
    paths = parse_model_args(args.model)
    sampler = load_scheduled(paths, device=args.device)
    light = args.light or ("L" if "L" in paths else None)
    heavy = args.heavy or ("H" if "H" in paths else None)
    if len(paths) != 2:
        raise ConfigError(f"give exactly two models (--model H=... --model L=...), got {len(paths)}")
    if light is None or heavy is None:
        cost = sampler.block_cost()
        a, b = list(paths)
        if cost[a] == cost[b]:
            raise ConfigError("cannot tell the light from the heavy model; name them L and H "
                              "or pass --light/--heavy")
        light, heavy = (a, b) if cost[a] < cost[b] else (b, a)
    for role, n in (("light", light), ("heavy", heavy)):
        if n not in paths:
            raise ConfigError(f"--{role} {n!r} is not one of the models ({', '.join(paths)})")
    if light == heavy:
        raise ConfigError("the light and the heavy model must differ")
    return sampler, light, heavy


def cmd_analyze(args) -> int:
    sampler, light, heavy = _pipes(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    H, L = sampler.pipes[heavy], sampler.pipes[light]
    t0 = time.perf_counter()
    rows = analyze_steps(H, L, args.grid, args.batches, args.batch_size, args.seed)
    write_csv(out / "step_importance.csv", rows)
    traj = []
    if args.trajectory_samples > 0:
        traj = analyze_trajectories(H, L, args.trajectory_samples, args.trajectory_steps,
                                    args.seed)
        write_csv(out / "step_importance_trajectory.csv", traj)
    title = (f"heavy {heavy} ({H.cfg.model.n_layers} blocks) vs light {light} "
             f"({L.cfg.model.n_layers} blocks), {H.cfg.model.family}")
    plot_analysis(rows, traj, out / "step_importance.png", title)
    meta = {"heavy": {"name": heavy, "checkpoint": str(H.checkpoint.path)},
            "light": {"name": light, "checkpoint": str(L.checkpoint.path)},
            "grid": args.grid, "batches": args.batches, "batch_size": args.batch_size,
            "seed": args.seed, "trajectory_samples": args.trajectory_samples,
            "trajectory_steps": args.trajectory_steps, "seconds": time.perf_counter() - t0}
    atomic_write_json(out / "analysis.json", meta)
    ok = [r for r in rows if r.get("noised")]
    if ok:
        worst = max(ok, key=lambda r: r["kl_heavy_light"])
        print(f"largest KL(heavy||light) {worst['kl_heavy_light']:.3f} at t={worst['t']:.3f} "
              f"(progress {worst['step_fraction']:.2f}); loss gap there {worst['gap']:.3f} nats")
    for f in ("step_importance.csv", "step_importance_trajectory.csv", "step_importance.png",
              "analysis.json"):
        if (out / f).exists():
            print(f"  {out / f}")
    return 0


def cmd_search(args) -> int:
    sampler, light, heavy = _pipes(args)
    if args.steps < args.segments:
        raise ConfigError(f"--steps {args.steps} is fewer than --segments {args.segments}")
    if args.light_segments is not None and args.light_segments < -1:
        raise ConfigError(f"--light-segments must be >= -1, got {args.light_segments}")
    if args.segments > 12 and args.light_segments is None:
        raise ConfigError("all 2^S schedules for S > 12 is too many; give --light-segments")
    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    seeds = [args.seed + i for i in range(args.seeds)]
    masks = [m.strip() for m in (args.masks or "").split(",") if m.strip()]
    if not seeds:
        raise ConfigError("--seeds must be >= 1")
    prefix = None
    if args.prefix_from_val is not None:
        from .sampler import prefixes_from_validation
        prefix, _ = prefixes_from_validation(sampler.pipes[heavy], args.num, args.prefix_from_val)
    from ..eval.genppl import load_judge
    judge = load_judge(args.judge, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def progress(i, n, r):
        print(f"[{i}/{n}] {r['mask']:<12} saved {100 * r['saved_blocks']:5.1f}%  gen PPL "
              f"{r['gen_ppl']:8.2f}  entropy {r['entropy']:.3f}  ({r['seconds']:.0f} s)",
              flush=True)

    rows = segment_search(sampler, judge, args.steps, args.segments, args.light_segments,
                          args.num, seeds, light, heavy, batch=args.batch,
                          temperature=args.temperature, top_p=args.top_p, progress=progress,
                          extra_masks=masks, prefix=prefix)
    front = pareto_front(rows)
    fm = {r["mask"] for r in front}
    for r in rows:
        r["frontier"] = r["mask"] in fm
    write_csv(out / "search.csv", rows)
    plot_frontier(rows, out / "frontier.png",
                  f"{args.steps} steps in {args.segments} segments, {args.num} samples x "
                  f"{args.seeds} seeds; judge {judge.label[:60]}")
    atomic_write_json(out / "search.json", {
        "models": {n: str(p.checkpoint.path) for n, p in sampler.pipes.items()},
        "light": light, "heavy": heavy, "steps": args.steps, "segments": args.segments,
        "light_segments": args.light_segments, "num": args.num, "seeds": seeds,
        "temperature": args.temperature, "top_p": args.top_p, "gumbel": "float64",
        "prefix_from_val": args.prefix_from_val,
        "judge": judge.info(), "rows": rows})
    print(f"frontier: {', '.join(r['mask'] for r in front)}")
    for f in ("search.csv", "frontier.png", "search.json"):
        print(f"  {out / f}")
    return 0


def add_schedule_parser(sub) -> None:
    p = sub.add_parser("schedule", help="model scheduling: step-importance analysis, segment "
                       "search")
    ss = p.add_subparsers(dest="schedule_cmd", required=True)

    def common(q):
        q.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                       help="the two models, e.g. --model H=runs/heavy --model L=runs/light")
        q.add_argument("--light")
        q.add_argument("--heavy")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="cpu")
        q.add_argument("--out", required=True, help="output folder")

    a = ss.add_parser("analyze", help="per-t masked-token loss of both models, gap, KL both "
                      "ways on the same noised validation input (+ on heavy trajectories)")
    common(a)
    a.add_argument("--grid", type=int, default=20, help="number of t values")
    a.add_argument("--batches", type=int, default=4)
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--trajectory-samples", type=int, default=8,
                   help="heavy-model samples for the trajectory variant (0: skip)")
    a.add_argument("--trajectory-steps", type=int, default=64)
    a.set_defaults(fn=cmd_analyze)

    s = ss.add_parser("search", help="sample + judge every light/heavy assignment of S "
                      "segments; saved-FLOPs vs gen PPL frontier")
    common(s)
    s.add_argument("--judge", required=True, help="AR judge: tdlm ar run or HF folder")
    s.add_argument("--steps", type=int, default=128)
    s.add_argument("--segments", type=int, default=8)
    s.add_argument("--light-segments", type=int,
                   help="number of light segments (default: all 2^S assignments; -1: only "
                        "--masks)")
    s.add_argument("--masks", help="more assignments to evaluate, e.g. LLHHHHHL,HHLLLHHH")
    s.add_argument("--prefix-from-val", type=int, metavar="K",
                   help="prefix-conditional: clamp the first K tokens of held-out documents "
                        "(the same prefixes for every schedule and seed)")
    s.add_argument("--num", type=int, default=16, help="samples per seed")
    s.add_argument("--seeds", type=int, default=2, help="number of sampling seeds (--seed, "
                   "--seed + 1, ...; the same for every schedule)")
    s.add_argument("--batch", type=int, default=0, help="samples per sampler call (0: all)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.set_defaults(fn=cmd_search)
