"""``tdlm tree build`` / ``tdlm tree show``: build a vocabulary tree from an embedding source
and inspect one (depth, fill, cluster sizes, sample clusters decoded to tokens)."""
from __future__ import annotations

import json
import time
from pathlib import Path


def add_tree_parser(sub) -> None:
    p = sub.add_parser("tree", help="build or inspect a vocabulary tree (TDLM)")
    tsub = p.add_subparsers(dest="tree_cmd", required=True)

    b = tsub.add_parser("build", help="build a tree")
    b.add_argument("--source", default="corpus",
                   choices=["corpus", "exchange", "random", "frequency", "checkpoint"],
                   help="embedding source (corpus: PPMI + truncated SVD of the training tokens)")
    b.add_argument("--K", type=int, default=256, help="max children per node")
    b.add_argument("--H", type=int, default=2, help="height (levels)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--capacity-ratio", type=float, default=1.0,
                   help="leaf-cluster capacity / K (the cluster-size-ratio knob)")
    b.add_argument("--dim", type=int, default=64, help="embedding dimension (corpus/random)")
    b.add_argument("--checkpoint", default="", help="checkpoint for --source checkpoint")
    b.add_argument("--data-source", default="bundled", help="corpus (see DataConfig.source)")
    b.add_argument("--tokenizer", default="gpt2")
    b.add_argument("--cache-dir", default="~/.cache/tdlm")
    b.add_argument("--out", required=True, help="tree file (.safetensors)")
    b.set_defaults(fn=cmd_tree_build)

    s = tsub.add_parser("show", help="describe a tree")
    s.add_argument("path")
    s.add_argument("--tokenizer", default="gpt2", help="tokenizer name or saved tokenizer folder")
    s.add_argument("--samples", type=int, default=5)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_tree_show)


def _tokenizer(name: str):
    from ..data import get_tokenizer
    from ..data.tokenizer import Tokenizer
    if Path(name).is_dir():
        return Tokenizer.load(name)
    return get_tokenizer(name)


def cmd_tree_build(args) -> int:
    import numpy as np
    from ..config import DataConfig
    from ..data import build_data
    from ..errors import TdlmError
    from ..vocab_tree.sources import build_from_source
    from ..vocab_tree.describe import tree_stats
    out = Path(args.out)
    if out.exists():
        raise TdlmError(f"{out} exists; choose another --out (nothing overwritten)")
    t0 = time.perf_counter()
    data = build_data(DataConfig(source=args.data_source, tokenizer=args.tokenizer,
                                 cache_dir=args.cache_dir), None)
    tok = data.tokenizer
    tokens = np.asarray(data.train_cache.tokens)
    t1 = time.perf_counter()
    tree = build_from_source(args.source, tok.vocab_size, args.K, args.H, seed=args.seed,
                             capacity_ratio=args.capacity_ratio, dim=args.dim, tokens=tokens,
                             checkpoint=args.checkpoint, vocab_hash=tok.vocab_hash())
    t2 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tree.save(out)
    st = tree_stats(tree)
    print(f"built {args.source} tree: V={tree.V} K={tree.K} H={tree.H} nodes={tree.num_nodes} "
          f"level sizes {tree.level_sizes().tolist()} in {t2 - t1:.1f}s "
          f"(data {t1 - t0:.1f}s) -> {out}")
    (out.with_suffix(".json")).write_text(json.dumps(
        {"stats": st, "build_seconds": t2 - t1, "data_seconds": t1 - t0}, indent=2, default=str))
    return 0


def cmd_tree_show(args) -> int:
    from ..vocab_tree import VocabTree, describe_tree, tree_stats
    tok = _tokenizer(args.tokenizer)
    tree = VocabTree.load(args.path, expected_vocab_hash=tok.vocab_hash())
    if args.json:
        print(json.dumps(tree_stats(tree), indent=2, default=str))
    else:
        print(describe_tree(tree, lambda ids: tok.decode(ids), n_samples=args.samples))
    return 0
