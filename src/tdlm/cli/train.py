"""``tdlm train``: train a model (``--resume`` continues a run exactly)."""
from __future__ import annotations

from ..errors import ConfigError
from .common import _add_config_args, _config_from_args


def cmd_train(args) -> int:
    from ..train.loop import train
    if args.resume:
        if args.preset or args.config or args.set:
            raise ConfigError("--resume continues the run with its saved config; do not pass "
                              "--preset, --config or --set with it")
        from ..config import RunConfig
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


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_train)
