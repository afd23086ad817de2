"""``tdlm ngram``: fit an n-gram judge (interpolated modified Kneser-Ney over a run config's
tokenised training split; ``tdlm.eval.ngram``) and report its own validation NLL; the folder
is a judge for ``tdlm genppl --judge`` and ``tdlm schedule search/rescore --judge``."""
from __future__ import annotations

import json

from .common import _add_config_args, _config_from_args


def cmd_ngram(args) -> int:
    from ..eval.ngram import build_ngram_judge
    cfg = _config_from_args(args)
    m = build_ngram_judge(cfg, args.order, args.out, progress=None if args.json else print)
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("ngram", help="fit a Kneser-Ney n-gram judge on a config's training "
                       "split (closed form: converged by construction)")
    _add_config_args(p)
    p.add_argument("--order", type=int, default=4, help="n (1-4 for an 8k vocabulary; "
                   "default 4)")
    p.add_argument("--out", required=True, help="folder for the judge (must not hold one)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_ngram)
