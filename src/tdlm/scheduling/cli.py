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
from pathlib import Path

from ..errors import ConfigError


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
    return bool(getattr(args, "model", None) or getattr(args, "schedule", None)
                or getattr(args, "prefix_from_val", None) is not None
                or getattr(args, "device", "cpu") != "cpu")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "schedule"


def sample_scheduled(paths: dict, num: int, steps: int, seed: int = 0, temperature: float = 1.0,
                     top_p: float = 1.0, seq_len=None, out=None, steps_split=None,
                     schedule=None, light=None, heavy=None, prefix_from_val=None,
                     device: str = "cpu", prompt=None) -> tuple[list, Path, dict]:
    """Sample with named models under a schedule; write JSONL + .meta.json (with the schedule,
    forward calls, FLOPs and savings, wall-clock). Returns (records, path, meta)."""
    from ..eval.genppl import vocab_ids_hash
    from ..train.checkpoint import atomic_write_text
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
    recs = []
    for i, row in enumerate(ids):
        r = {"id": i, "text": tok.decode(row.tolist()), "ids": row.tolist(), "length": len(row)}
        if "prefix" in kw:
            k = kw["prefix"].shape[1]
            r.update(prefix_len=k, prefix_text=tok.decode(row[:k].tolist()))
        if info is not None:
            r.update(prefix_doc=info[i]["doc"],
                     reference_text=tok.decode(info[i]["reference_ids"]))
        recs.append(r)
    first = sampler.primary.checkpoint.path
    from ..cli import _run_dir_of
    if out:
        out_path = Path(out)
    else:
        plain = len(paths) == 1 and info is None
        name = "samples.jsonl" if plain else (
            f"samples-{_slug(sched.spec)}" + (f"-prefix{prefix_from_val}" if info else "")
            + ".jsonl")
        out_path = _run_dir_of(first) / "samples" / name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, "".join(json.dumps(r) + "\n" for r in recs))
    meta = {"checkpoint": str(first),
            "checkpoints": {n: str(p.checkpoint.path) for n, p in sampler.pipes.items()},
            "family": cfg.model.family, "num": num, "steps": steps, "seed": seed,
            "temperature": temperature, "top_p": top_p, "gumbel": "float64",
            "seq_len": int(ids.shape[1]), "steps_split_root_to_leaf": steps_split or "even",
            "tokenizer": {"name": tok.name, "vocab_hash": tok.vocab_hash(),
                          "vocab_ids_hash": vocab_ids_hash(tok.hf)},
            "device": str(sampler.primary.device),
            "prefix_len": int(kw["prefix"].shape[1]) if "prefix" in kw else 0,
            "prefix_source": (f"first {prefix_from_val} tokens of validation documents"
                              if info else ("prompt" if prompt is not None else None)),
            "prompt": prompt,
            **rep}
    from ..cli import _write_json
    _write_json(out_path.with_suffix(".meta.json"), meta)
    return recs, out_path, meta


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

    try:
        from .analysis import add_schedule_parser
    except ImportError:
        return
    add_schedule_parser(sub)
