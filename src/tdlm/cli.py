"""``tdlm`` command line: a thin layer over the library.

    tdlm run                         main job: train a tiny model on the bundled corpus, evaluate, sample
    tdlm train --preset tiny --out runs/x [--set train.max_steps=100 ...] [--resume]
    tdlm eval CKPT [--json] [--batches N] [--seed S]
    tdlm sample CKPT --num N --steps T
    tdlm info --preset mdlm-small [--preset ...] [--json]

User errors print ``error: <one line>`` and exit with status 2 (no traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import TdlmError


def _config_from_args(args):
    from .config import get_preset, load_config
    cfg = load_config(args.config) if args.config else get_preset(args.preset)
    if args.set:
        preset = cfg.preset
        cfg = cfg.override(args.set)
        cfg.preset = preset
    return cfg


def _add_config_args(p):
    p.add_argument("--preset", default="tiny", help="named preset (see `tdlm info --list`)")
    p.add_argument("--config", help="a JSON config file (instead of --preset)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set train.max_steps=200")


def cmd_train(args) -> int:
    from .train.loop import train
    cfg = _config_from_args(args) if not args.resume else None
    if args.resume:
        from .config import get_preset
        cfg = get_preset("tiny")   # replaced by the checkpoint's config
    res = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"trained to step {res.step}; run folder: {res.run_dir}")
    if res.final_checkpoint:
        print(f"checkpoint: {res.final_checkpoint}")
    return 0


def _eval(ckpt_path: str, batches: int, seed: int, repeats: int, out: str | None,
          use_ema: bool = True) -> tuple[dict, Path]:
    from .api import load
    from .data import build_data
    from .eval.nelbo import evaluate_nelbo
    pipe = load(ckpt_path, use_ema=use_ema)
    cfg = pipe.cfg
    data = build_data(cfg.data, None, tokenizer=pipe.tokenizer)
    res = evaluate_nelbo(pipe.family, pipe.model, data.val,
                         batch_size=cfg.train.micro_batch or cfg.train.global_batch,
                         max_batches=batches, seed=seed, repeats=repeats)
    res.update({"checkpoint": str(pipe.checkpoint.path), "family": cfg.model.family,
                "step": pipe.checkpoint.trainer.get("step"), "weights": "ema" if
                (use_ema and pipe.checkpoint.ema_state is not None) else "raw",
                "data_layout": cfg.data.layout, "seq_len": cfg.data.seq_len,
                "data_source": cfg.data.source, "tokenizer": cfg.data.tokenizer,
                "schedule": cfg.diffusion.schedule, "num_timesteps": cfg.diffusion.num_timesteps})
    out_dir = Path(out) if out else pipe.checkpoint.path.parent.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "metrics.json", res)
    return res, out_dir


def _write_json(path: Path, obj) -> None:
    from .train.checkpoint import atomic_write_text
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


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
            seq_len: int | None, out: str | None) -> tuple[list, Path]:
    from .api import load
    if steps <= 0:
        raise TdlmError(f"--steps must be >= 1, got {steps}")
    if num <= 0:
        raise TdlmError(f"--num must be >= 1, got {num}")
    pipe = load(ckpt_path)
    if seq_len and seq_len > pipe.cfg.model.max_seq_len:
        raise TdlmError(f"--seq-len {seq_len} exceeds the model's max_seq_len "
                        f"{pipe.cfg.model.max_seq_len}")
    t0 = time.perf_counter()
    ids = pipe.generate_ids(num, steps, seq_len=seq_len, seed=seed, temperature=temperature,
                            top_p=top_p)
    dt = time.perf_counter() - t0
    recs = [{"id": i, "text": pipe.tokenizer.decode(row.tolist()), "ids": row.tolist()}
            for i, row in enumerate(ids)]
    out_path = Path(out) if out else pipe.checkpoint.path.parent.parent / "samples" / "samples.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from .train.checkpoint import atomic_write_text
    atomic_write_text(out_path, "".join(json.dumps(r) + "\n" for r in recs))
    meta = {"checkpoint": str(pipe.checkpoint.path), "num": num, "steps": steps, "seed": seed,
            "temperature": temperature, "top_p": top_p, "gumbel": "float64",
            "seq_len": int(ids.shape[1]), "seconds": dt}
    _write_json(out_path.with_suffix(".meta.json"), meta)
    return recs, out_path


def cmd_sample(args) -> int:
    recs, path = _sample(args.checkpoint, args.num, args.steps, args.seed, args.temperature,
                         args.top_p, args.seq_len, args.out)
    for r in recs[:args.show]:
        print(f"--- sample {r['id']} ---\n{r['text'][:600]}")
    print(f"samples: {path}")
    return 0


def cmd_info(args) -> int:
    import torch
    from .config import get_preset, preset_names
    from .families import get_family
    from .nn.dit import count_parameters
    if args.list:
        print("\n".join(preset_names()))
        return 0
    rows = {}
    for name in args.preset or ["tiny"]:
        cfg = get_preset(name)
        with torch.device("meta"):
            model = get_family(cfg).build_model()
        c = count_parameters(model)
        m = cfg.model
        rows[name] = {"family": m.family, "d_model": m.d_model, "n_layers": m.n_layers,
                      "n_heads": m.n_heads, "vocab_size": m.vocab_size, "seq_len": cfg.data.seq_len,
                      "parameters": c}
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
    """Main job: train the tiny preset on the bundled corpus, evaluate it, sample from it."""
    from .config import get_preset
    from .train.loop import train
    out = Path(args.out or f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = get_preset(args.preset)
    if args.set:
        cfg = cfg.override(args.set)
        cfg.preset = args.preset
    print(f"[tdlm] training preset {args.preset!r} ({cfg.model.family}) on the bundled corpus "
          f"for {cfg.train.max_steps} steps -> {out}")
    res = train(cfg, out, progress=not args.no_progress)
    ck = res.final_checkpoint
    ev, ev_dir = _eval(str(ck), 0 if args.full_eval else 32, 0, 1, None)
    print(f"[tdlm] validation NELBO/token {ev['nelbo_per_token']:.4f}, perplexity bound "
          f"{ev['ppl_bound']:.2f}, bits/token {ev['bits_per_token']:.3f} over {ev['tokens']} tokens")
    recs, spath = _sample(str(ck), args.num_samples, args.steps, 0, 1.0, 1.0, None, None)
    for r in recs[:3]:
        print(f"--- sample {r['id']} ({args.steps} steps) ---\n{r['text'][:400]}")
    print("[tdlm] outputs:")
    for label, p in (("run folder", out), ("resolved config", out / "config.json"),
                     ("training metrics", out / "metrics.jsonl"), ("loss curve", out / "loss_curve.png"),
                     ("checkpoint", ck), ("eval metrics", ev_dir / "metrics.json"), ("samples", spath)):
        print(f"  {label:<17} {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tdlm", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="main job: train + evaluate + sample a tiny model")
    p.add_argument("--preset", default="tiny")
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
    p.add_argument("checkpoint")
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--show", type=int, default=3)
    p.add_argument("--out", help="JSONL path (default: <run>/samples/samples.jsonl)")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("info", help="parameter counts of presets")
    p.add_argument("--preset", action="append")
    p.add_argument("--json", action="store_true")
    p.add_argument("--list", action="store_true")
    p.set_defaults(fn=cmd_info)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except TdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
