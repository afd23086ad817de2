"""``tdlm sample``: samples of one checkpoint, or of several named models under a model
schedule (a single model is a one-model plan: one path, ``tdlm.generation``, writes the JSONL,
its meta and the optional trajectory / length histogram)."""
from __future__ import annotations

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


def cmd_sample(args) -> int:
    from ..generation import generate_to_files
    if not args.checkpoint and not args.model:
        raise ConfigError("no model: give a checkpoint folder or --model NAME=PATH")
    paths = parse_model_args(args.model, args.checkpoint)
    recs, path, meta = generate_to_files(
        paths, args.num, args.steps, args.seed, args.temperature, args.top_p, args.seq_len,
        args.out, args.steps_split, args.schedule, args.light, args.heavy, args.prefix_from_val,
        args.device, args.prompt, trajectory=args.trajectory, html=args.html)
    for r in recs[:args.show]:
        print(f"--- sample {r['id']} ---\n{r['text'][:600]}")
    if len(paths) > 1 or args.schedule:
        calls = ", ".join(f"{n} {c}" for n, c in (meta["forward_calls"] or {}).items())
        saved = ("" if meta["saved_blocks"] is None else
                 f"block FLOPs saved {100 * meta['saved_blocks']:.1f}% (full "
                 f"{100 * meta['saved_full']:.1f}%) vs {meta['reference']['model']} alone; ")
        print(f"schedule {meta['schedule']['run_length'][:80]}; forward calls: {calls}; "
              f"{saved}{meta['seconds']:.2f} s")
    print(f"samples: {path}")
    if meta.get("viewer"):
        print(f"viewer: {meta['viewer']}")
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
                   help="also write every step's sequences (<out>.trajectory.jsonl; MDLM, "
                        "TDLM, DID)")
    p.add_argument("--html", action="store_true",
                   help="also write <out>.html, a self-contained page that animates the "
                        "trajectory (step slider, play/pause; implies --trajectory)")
    add_sample_schedule_args(p)      # --model, --schedule, --light/--heavy, --prefix-from-val
    p.set_defaults(fn=cmd_sample)


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
