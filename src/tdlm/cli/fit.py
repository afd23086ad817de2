"""``tdlm fit``: will this config fit on my card, and at what micro-batch?

    tdlm fit --preset mdlm-small --seq-len 1024 --batch 8           CUDA, the config's precision
    tdlm fit --preset tdlm-small --precision bf16 --checkpointing on --memory 24 40 80
    tdlm fit --config run.json --device cpu --precision fp32 --batch 1 2
    tdlm fit --preset mdlm-small --set family.head_impl=chunked --memory device --json

The peak memory of one optimizer step (the library's own step: model, family loss, backward,
clipping, AdamW, EMA), accounted on fake tensors in seconds (``tdlm.train.memory``), broken
down into parameters, gradients, optimizer state, activations and temporaries; and for each
``--memory`` size the largest micro-batch whose peak stays within the size less ``--margin``
(CUDA context, library workspaces and allocator fragmentation are not in the estimate).
"""
from __future__ import annotations

import argparse
import json

from .common import _add_config_args, _config_from_args

GIB = 1024 ** 3


def _gib(b) -> str:
    return f"{b / GIB:.2f} GiB"


def cmd_fit(args) -> int:
    from ..errors import ConfigError
    from ..train.memory import (CATEGORIES, Target, estimate_memory, largest_micro_batch,
                                parse_capacity, target_config)
    from ..train.parallel import derive_micro
    from ..train.step import family_for
    cfg = _config_from_args(args)
    if not 0 <= args.margin < 1:
        raise ConfigError(f"--margin must be in [0, 1), got {args.margin}")
    ck = None if args.checkpointing is None else args.checkpointing == "on"
    target = Target(args.device, args.precision, args.seq_len, ck)
    tcfg = target_config(cfg, target)
    family = family_for(tcfg)
    batches = args.batch or [derive_micro(cfg.train.global_batch,
                                          0 if cfg.train.micro_batch == "auto" else cfg.train.micro_batch, 1)[0]]
    mems = args.memory if args.memory is not None else (["24", "40", "80"] if args.device == "cuda" else [])
    caps = [parse_capacity(spec) for spec in mems]
    cache: dict = {}
    ests = []
    for b in batches:
        cache[b] = estimate_memory(cfg, b, target, family)
        ests.append(cache[b])
    fits = []
    for label, cap in caps:
        fit = largest_micro_batch(cfg, int(cap * (1 - args.margin)), target, family, cache=cache)
        fits.append({"memory": label, "capacity_bytes": cap, "margin": args.margin, **fit.to_dict()})
    if args.json:
        print(json.dumps({"preset": cfg.preset, "target": vars(target), "estimates":
                          [e.to_dict() for e in ests], "fits": fits}, indent=2, default=str))
        return 0
    _print_text(tcfg, ests, fits, args.margin, CATEGORIES)
    return 0


def _print_text(cfg, ests, fits, margin, categories) -> None:
    e0 = ests[0]
    how = ", ".join(f"{k} x{v}" for k, v in e0.kernels.items()) if isinstance(
        next(iter(e0.kernels.values()), 0), int) else "CPU kernels as dispatched"
    prec = "bf16 autocast" if e0.precision == "bf16" else "fp32"
    print(f"{e0.preset} ({e0.family}, {e0.n_params / 1e6:.1f}M parameters) on {e0.device}, "
          f"{prec}, L={e0.seq_len}, activation checkpointing "
          f"{'on' if e0.activation_checkpointing else 'off'}"
          + (f", head {cfg.family.head_impl}" if hasattr(cfg.family, "head_impl") else ""))
    secs = min(e.seconds for e in ests)
    print(f"  simulated step on fake tensors ({how}); {secs:.1f} s per estimate")
    if e0.corrections:
        print("  CUDA autocast applied where the CPU's differs: "
              + ", ".join(f"{k} x{v}" for k, v in e0.corrections.items()))
    for n in e0.notes:
        print(f"  note: {n}")
    for e in ests:
        print(f"\nmicro-batch {e.micro_batch}: peak {_gib(e.peak_bytes)}")
        for c in categories:
            print(f"  {c:<13}{e.breakdown[c] / GIB:>9.2f} GiB")
    if fits:
        print(f"\nlargest micro-batch with peak <= memory x (1 - {margin:.0%} margin):")
        for f in fits:
            tail = (f"{f['micro_batch']:>6}  (peak {_gib(f['peak_bytes'])})" if f["micro_batch"]
                    else "     0  (one row does not fit)")
            print(f"  {f['memory']:>10}: {tail}")


def add_parser(sub) -> None:
    p = sub.add_parser("fit", help="peak training memory and the largest micro-batch that fits",
                       description=__doc__.splitlines()[0],
                       epilog="\n".join(__doc__.splitlines()[1:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="device kind simulated (default cuda)")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="bf16 (autocast, CUDA) or fp32 (default: the config's train.precision)")
    p.add_argument("--batch", type=int, nargs="+", metavar="B",
                   help="micro-batches to estimate (default: the config's micro-batch)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: data.seq_len)")
    p.add_argument("--checkpointing", choices=("on", "off"),
                   help="activation checkpointing (default: train.activation_checkpointing)")
    p.add_argument("--memory", nargs="+", metavar="GB",
                   help="memory sizes in GiB to fit, or 'device' (the present CUDA device); "
                        "default 24 40 80 on cuda")
    p.add_argument("--margin", type=float, default=0.10,
                   help="fraction of each memory size kept free (default 0.10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_fit)
