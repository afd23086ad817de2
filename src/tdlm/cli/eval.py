"""``tdlm eval``: NELBO / perplexity bound of a checkpoint, written to ``metrics.json``."""
from __future__ import annotations

import json
import sys


def cmd_eval(args) -> int:
    from ..eval.nelbo import evaluate_to_files
    res, out_dir = evaluate_to_files(args.checkpoint, args.batches, args.seed, args.repeats, args.out,
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
