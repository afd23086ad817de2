"""``tdlm convert``: a published MDLM / DUO checkpoint (local folder or hub id) -> an exported
model folder of this library (``tdlm.convert``)."""
from __future__ import annotations


def cmd_convert(args) -> int:
    from ..convert import convert
    folder, pipe, prov = convert(args.source, args.out, source=getattr(args, "from"),
                                 tokenizer=args.tokenizer, revision=args.revision,
                                 overwrite=args.overwrite)
    m = pipe.cfg.backbone
    print(f"converted {prov['source']} ({prov['layout']} layout) into a "
          f"{pipe.cfg.family.name} model: {m.n_layers} blocks, d_model {m.d_model}, "
          f"{m.n_heads} heads, {prov['parameters']:,} parameters -> {folder}")
    for note in prov["notes"][1:]:
        print(f"note: {note}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="import a published MDLM/DUO checkpoint (folder or "
                       "hub id) as an exported tdlm model (safetensors only)")
    p.add_argument("source", help="folder with config.json + *.safetensors, a .safetensors "
                   "file, or a Hugging Face hub id (e.g. kuleshov-group/mdlm-owt)")
    p.add_argument("--out", required=True, help="new folder (an existing non-empty one is "
                   "refused unless --overwrite)")
    p.add_argument("--from", default="auto", choices=["auto", "mdlm", "duo"],
                   help="published layout (auto: config.json's model_type, else the "
                   "embedding's rows)")
    p.add_argument("--tokenizer", default="gpt2", help="the checkpoint's vocabulary")
    p.add_argument("--revision", default=None, help="hub revision (hub ids only)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_convert)
