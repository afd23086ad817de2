"""``tdlm genppl``: generative perplexity (+ unigram entropy) of a samples file under a judge
LM (``tdlm.eval.genppl`` writes the metrics)."""
from __future__ import annotations

import json
import sys


def cmd_genppl(args) -> int:
    from ..eval.genppl import genppl_file
    res, dest = genppl_file(args.samples, args.judge, args.out, args.eos, args.batch_size,
                            args.device, args.precision)
    res.pop("per_sample", None)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        ci = res.get("gen_ppl_ci95")
        ci = f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
        print(f"gen PPL {res['gen_ppl']:.2f}{ci}  entropy {res['entropy']:.3f}  "
              f"({res['num_samples']} samples, {res['tokens']} tokens scored, eos={res['eos']}, "
              f"{'retokenised' if res['retokenised'] else 'same tokenizer'})")
        print(f"judge: {res['judge']['label']}")
    print(f"metrics: {dest}", file=sys.stderr if args.json else sys.stdout)
    return 0


def add_parser(sub) -> None:
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
