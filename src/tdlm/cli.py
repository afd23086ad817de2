"""``tdlm`` command line: a thin layer over the library.

    tdlm run                         main job: train a tiny model on the bundled corpus, evaluate, sample
    tdlm train --preset tiny --out runs/x [--set train.max_steps=100 ...]
    tdlm train --out runs/x --resume     continue a run exactly, with its saved config
    tdlm eval CKPT [--json] [--batches N] [--seed S]
    tdlm sample CKPT --num N --steps T
    tdlm sample --model H=runs/heavy --model L=runs/light --schedule sandwich:0.25
    tdlm genppl SAMPLES.jsonl --judge runs/ar      generative perplexity + entropy
    tdlm info --preset mdlm-small [--preset ...] [--json]
    tdlm export RUN_OR_CKPT --out DIR    shareable folder (tdlm.load / tdlm.from_pretrained)

User errors (bad config, data, checkpoints, paths, usage) print ``error: <one line>`` on
stderr and exit with status 2 (no traceback); nothing existing is overwritten.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import ConfigError, TdlmError
from .store.checkpoint import run_dir_of
from .utils.io import atomic_write_json


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one ``error:`` line, exit status 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(2)


def _config_from_args(args):
    from .config import get_preset, load_config
    if args.config and args.preset:
        raise ConfigError("give either --preset or --config, not both")
    cfg = load_config(args.config) if args.config else get_preset(args.preset or "tiny")
    if args.set:
        preset = cfg.preset
        cfg = cfg.override(args.set)
        cfg.preset = preset
    return cfg


def _add_config_args(p):
    p.add_argument("--preset", help="named preset (default: tiny; see `tdlm info --list`)")
    p.add_argument("--config", help="a JSON config file (instead of --preset)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set train.max_steps=200")


def cmd_train(args) -> int:
    from .train.loop import train
    if args.resume:
        if args.preset or args.config or args.set:
            raise ConfigError("--resume continues the run with its saved config; do not pass "
                              "--preset, --config or --set with it")
        from .config import RunConfig
        cfg = RunConfig()          # ignored: train() uses the checkpoint's config
    else:
        cfg = _config_from_args(args)
    res = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    import os
    if os.environ.get("RANK", "0") == "0":   # under torchrun only rank 0 reports
        print(f"trained to step {res.step}; run folder: {res.run_dir}")
        if res.final_checkpoint:
            print(f"checkpoint: {res.final_checkpoint}")
    return 0


def _eval(ckpt_path: str, batches: int, seed: int, repeats: int, out: str | None,
          use_ema: bool = True) -> tuple[dict, Path]:
    from .pipeline import load
    from .data import build_data
    from .eval.nelbo import evaluate_nelbo
    if batches < 0:
        raise ConfigError(f"--batches must be >= 0 (0: the whole validation split), got {batches}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    pipe = load(ckpt_path, use_ema=use_ema)
    cfg = pipe.cfg
    data = build_data(cfg.data, None, tokenizer=pipe.tokenizer, need_train=False)
    res = evaluate_nelbo(pipe.family, pipe.model, data.val,
                         batch_size=cfg.train.micro_batch or cfg.train.global_batch,
                         max_batches=batches, seed=seed, repeats=repeats)
    res.update({"checkpoint": str(pipe.checkpoint.path), "family": cfg.model.family,
                "step": pipe.checkpoint.trainer.get("step"), "weights": pipe.weights,
                "data_layout": cfg.data.layout, "seq_len": cfg.data.seq_len,
                "data_source": cfg.data.source, "tokenizer": cfg.data.tokenizer,
                "schedule": cfg.diffusion.schedule, "num_timesteps": cfg.diffusion.num_timesteps})
    out_dir = Path(out) if out else run_dir_of(pipe.checkpoint.path) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", res)
    return res, out_dir


def cmd_eval(args) -> int:
    res, out_dir = _eval(args.checkpoint, args.batches, args.seed, args.repeats, args.out,
                         not args.no_ema)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        print(f"NELBO/token {res['nelbo_per_token']:.4f}  ppl <= {res['ppl_bound']:.2f}  "
              f"bits/token {res['bits_per_token']:.4f}  ({res['tokens']} tokens)")
    print(f"metrics: {out_dir / 'metrics.json'}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _sample(ckpt_path: str, num: int, steps: int, seed: int, temperature: float, top_p: float,
            seq_len: int | None, out: str | None,
            steps_split: str | None = None, trajectory: bool = False,
            prompt: str | None = None, device: str = "cpu") -> tuple[list, Path]:
    from .outputs import sample_records, write_samples
    from .pipeline import load
    from .sampling.options import check_sample_args, encode_prompt, parse_steps_split
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
    from .scheduling.cli import cmd_sample_scheduled, wants_scheduled
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


def cmd_export(args) -> int:
    from .pipeline import save_pretrained
    from .pipeline import load
    pipe = load(args.checkpoint, use_ema=not args.no_ema)
    out = save_pretrained(pipe, args.out)
    print(f"exported {pipe.cfg.model.family} model ({pipe.weights} weights, step "
          f"{pipe.checkpoint.trainer.get('step')}) to {out}")
    return 0


def cmd_info(args) -> int:
    from .config import get_preset, preset_names
    import torch

    from .families import get_family_class
    from .nn.dit import count_parameters
    if args.list:
        print("\n".join(preset_names()))
        return 0
    rows = {}
    for name in args.preset or ["tiny"]:
        cfg = get_preset(name)
        cls = get_family_class(cfg.model.family)
        fam = cls(cfg, **cls.shape_resources(cfg))
        with torch.device("meta"):
            model = fam.build_model()
        c = count_parameters(model)
        m = cfg.model
        rows[name] = {"family": m.family, "d_model": m.d_model, "n_layers": m.n_layers,
                      "n_heads": m.n_heads, "vocab_size": m.vocab_size, "seq_len": cfg.data.seq_len,
                      "parameters": c}
        rows[name].update(fam.describe())
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else next(iter(rows.values())), indent=2))
    else:
        hdr = f"{'preset':<14}{'family':<7}{'d':>6}{'layers':>8}{'total':>14}{'embedding':>13}{'head':>13}{'blocks':>14}{'head %':>8}"
        print(hdr)
        for n, r in rows.items():
            c = r["parameters"]
            print(f"{n:<14}{r['family']:<7}{r['d_model']:>6}{r['n_layers']:>8}{c['total']:>14,}"
                  f"{c['embedding']:>13,}{c['head']:>13,}{c['blocks']:>14,}{100 * c['head_share']:>7.2f}%")
    return 0


def cmd_run(args) -> int:
    """Main job: train each preset on the bundled corpus on the same tokens and seed,
    evaluate all on the same validation batches, print NELBOs side by side and samples."""
    from .config import get_preset
    from .train.loop import train
    presets = args.preset or ["tdlm-tiny", "tiny-gpt2"]
    out = Path(args.out or f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    cfgs = {}
    for name in presets:       # validate everything before any work
        cfg = get_preset(name)
        if args.set:
            cfg = cfg.override(args.set)
            cfg.preset = name
        cfgs[name] = cfg
    rows, outputs = {}, []
    for name, cfg in cfgs.items():
        run_dir = out / name
        where = "the bundled corpus" if cfg.data.source == "bundled" else cfg.data.source
        print(f"[tdlm] training {name!r} ({cfg.model.family}, {cfg.model.n_layers} blocks, "
              f"d={cfg.model.d_model}) on {where} for {cfg.train.max_steps} steps -> {run_dir}")
        res = train(cfg, run_dir, progress=not args.no_progress)
        ck = res.final_checkpoint
        ev, ev_dir = _eval(str(ck), 0 if args.full_eval else 32, 0, 1, None)
        recs, spath = _sample(str(ck), args.num_samples, args.steps, 0, 1.0, 1.0, None, None)
        rows[name] = (cfg, ev, recs)
        outputs += [(f"{name} run folder", run_dir), (f"{name} checkpoint", ck),
                    (f"{name} eval metrics", ev_dir / "metrics.json"), (f"{name} samples", spath),
                    (f"{name} loss curve", run_dir / "loss_curve.png")]
    print("\n[tdlm] validation (same batches, same noise seed):")
    print(f"  {'preset':<12}{'family':<7}{'params':>12}{'NELBO/token':>13}{'ppl <=':>11}{'bits/token':>12}")
    from .nn.dit import count_parameters
    from .pipeline import load
    summary = {}
    for name, (cfg, ev, recs) in rows.items():
        n_params = count_parameters(load(ev["checkpoint"]).model)["total"]
        summary[name] = {"family": cfg.model.family, "parameters": n_params, **ev}
        print(f"  {name:<12}{cfg.model.family:<7}{n_params:>12,}{ev['nelbo_per_token']:>13.4f}"
              f"{ev['ppl_bound']:>11.1f}{ev['bits_per_token']:>12.3f}")
        if "parts_per_token" in ev:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(ev["parts_per_token"].items()))
            print(f"  {'':<19}per level: {parts}")
    atomic_write_json(out / "summary.json", summary)
    for name, (cfg, ev, recs) in rows.items():
        for r in recs[:2]:
            print(f"--- {name} sample {r['id']} ({args.steps} steps) ---\n{r['text'][:300]}")
    print("[tdlm] outputs:")
    for label, p in outputs + [("summary", out / "summary.json")]:
        print(f"  {label:<26} {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="tdlm", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="main job: train + evaluate + sample tiny TDLM and MDLM side by side")
    p.add_argument("--preset", action="append",
                   help="preset(s) to train side by side (default: tdlm-tiny and tiny-gpt2)")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=128, help="sampling steps")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--full-eval", action="store_true", help="evaluate the whole validation split")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("train", help="train a model")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="NELBO / perplexity bound of a checkpoint on validation data")
    p.add_argument("checkpoint")
    p.add_argument("--batches", type=int, default=0, help="0: the whole validation split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="noise draws per batch")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", help="folder for metrics.json (default: <run>/eval)")
    p.set_defaults(fn=cmd_eval)

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
    from .scheduling.cli import add_sample_schedule_args
    add_sample_schedule_args(p)      # --model, --schedule, --light/--heavy, --prefix-from-val
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("export", help="export a trained model to a shareable folder "
                       "(config.json, model.safetensors, tokenizer, tree, README.md)")
    p.add_argument("checkpoint", help="run, checkpoint or exported folder")
    p.add_argument("--out", required=True, help="new folder (an existing non-empty one is refused)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("info", help="parameter counts of presets")
    p.add_argument("--preset", action="append")
    p.add_argument("--json", action="store_true")
    p.add_argument("--list", action="store_true")
    p.set_defaults(fn=cmd_info)

    # `tdlm tree ...` is registered by the tree package when it is installed
    try:
        from .tree.cli import add_tree_parser
    except ImportError:
        pass
    else:
        add_tree_parser(sub)
    # `tdlm genppl` and `tdlm schedule ...` (model scheduling, generative evaluation)
    try:
        from .scheduling.cli import add_scheduling_parsers
    except ImportError:
        pass
    else:
        add_scheduling_parsers(sub)
    from .bench_cli import add_bench_parser
    add_bench_parser(sub)      # `tdlm bench {params,memory,speed,quality}`
    return ap


def _os_error_line(e: OSError) -> str:
    what = e.strerror or (str(e).strip().splitlines() or [type(e).__name__])[0]
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{what}{where}"


def _one_line(msg: str) -> str:
    return " ".join(msg.split()) or "unknown error"


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:          # usage errors (one line, see _Parser) and --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    from .train.preemption import EXIT_PREEMPTED, Preempted
    try:
        return args.fn(args)
    except Preempted as e:           # checkpoint written: a scheduler should requeue the job
        import os
        if os.environ.get("RANK", "0") == "0":       # under torchrun only rank 0 reports
            print(f"preempted: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_PREEMPTED
    except TdlmError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:             # unwritable/unreadable paths, disk full, ...
        print(f"error: {_one_line(_os_error_line(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
