"""``tdlm eval``: NELBO / perplexity bound of a checkpoint, written to ``metrics.json``: on
its validation split, or with ``--dataset`` / ``--suite`` on several held-out collections
(one row each in ``metrics.json``, and ``table.md``)."""
from __future__ import annotations

import json
import sys


def cmd_eval(args) -> int:
    if args.dataset or args.suite:
        return _eval_sets(args)
    if args.data_root:
        from ..errors import ConfigError
        raise ConfigError("--data-root applies to --suite / --dataset evaluation")
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


def _eval_sets(args) -> int:
    from ..eval.suite import evaluate_sets_to_files
    res, out_dir = evaluate_sets_to_files(
        args.checkpoint, args.dataset, args.suite, args.data_root, args.batches, args.seed,
        args.repeats, args.out, not args.no_ema,
        log=None if args.json else (lambda s: print(s, file=sys.stderr)))
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        print((out_dir / "table.md").read_text(), end="")
    print(f"metrics: {out_dir / 'metrics.json'}, table: {out_dir / 'table.md'}",
          file=sys.stderr if args.json else sys.stdout)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="NELBO / perplexity bound of a checkpoint on validation data "
                       "or on several datasets (--dataset, --suite)")
    p.add_argument("checkpoint")
    p.add_argument("--batches", type=int, default=0, help="0: the whole validation split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="noise draws per batch")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", help="folder for metrics.json (default: <run>/eval; with --dataset "
                   "or --suite: <run>/eval/<suite or datasets>)")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME[=SOURCE]",
                   help="evaluate on this collection instead of the validation split (repeat "
                        "for several): a known set (ptb, wikitext103, lm1b, lambada, ag_news, "
                        "pubmed, arxiv: MDLM's split, field and detokenizer), NAME=SOURCE (a "
                        "known set read from SOURCE, or any hf:... / file / folder under the "
                        "label NAME), or a bare source")
    p.add_argument("--suite", metavar="NAME",
                   help="a named list of datasets: mdlm-zero-shot = MDLM's zero-shot table "
                        "(PTB, WikiText-103, LM1B, LAMBADA, AG News, PubMed, arXiv)")
    p.add_argument("--data-root", help="read each known set NAME from DIR/NAME (a "
                   "save_to_disk folder or NAME.jsonl/.json/.parquet) instead of the Hub")
    p.set_defaults(fn=cmd_eval)
