"""``tdlm eval``: NELBO / perplexity bound of a checkpoint, written to ``metrics.json``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import ConfigError
from ..store.checkpoint import run_dir_of
from ..utils.io import atomic_write_json


def _eval(ckpt_path: str, batches: int, seed: int, repeats: int, out: str | None,
          use_ema: bool = True) -> tuple[dict, Path]:
    from ..pipeline import load
    from ..data import build_data
    from ..eval.nelbo import evaluate_nelbo
    from ..train.parallel import derive_micro      # the training micro-batch of one process
    if batches < 0:
        raise ConfigError(f"--batches must be >= 0 (0: the whole validation split), got {batches}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    pipe = load(ckpt_path, use_ema=use_ema)
    cfg = pipe.cfg
    data = build_data(cfg.data, None, tokenizer=pipe.tokenizer, need_train=False)
    micro, _ = derive_micro(cfg.train.global_batch, cfg.train.micro_batch, 1)
    res = evaluate_nelbo(pipe.family, pipe.model, data.val, batch_size=micro,
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


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="NELBO / perplexity bound of a checkpoint on validation data")
    p.add_argument("checkpoint")
    p.add_argument("--batches", type=int, default=0, help="0: the whole validation split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="noise draws per batch")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", help="folder for metrics.json (default: <run>/eval)")
    p.set_defaults(fn=cmd_eval)
