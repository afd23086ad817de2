"""``tdlm export``: a shareable folder (``tdlm.load`` / ``tdlm.from_pretrained``)."""
from __future__ import annotations


def cmd_export(args) -> int:
    from ..pipeline import save_pretrained
    from ..pipeline import load
    pipe = load(args.checkpoint, use_ema=not args.no_ema)
    out = save_pretrained(pipe, args.out)
    print(f"exported {pipe.cfg.family.name} model ({pipe.weights} weights, step "
          f"{pipe.checkpoint.trainer.get('step')}) to {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a trained model to a shareable folder "
                       "(config.json, model.safetensors, tokenizer, tree, README.md)")
    p.add_argument("checkpoint", help="run, checkpoint or exported folder")
    p.add_argument("--out", required=True, help="new folder (an existing non-empty one is refused)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.set_defaults(fn=cmd_export)
