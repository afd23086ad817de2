"""The vocabulary tree a TDLM run trains with, from its ``family`` section.

``tree_source``: ``corpus`` (PPMI + truncated SVD embeddings of the training token stream,
then balanced k-means; the default, needs no trained model), ``checkpoint`` (the input
embeddings of a trained checkpoint at ``tree_path``), ``random`` / ``frequency`` (ablation
baselines) or ``file`` (a tree saved by ``tdlm tree build``, checked against the tokenizer's
vocab hash). Built trees are cached by (settings, corpus, tokenizer) next to the token cache
and copied into the run folder.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ...errors import CheckpointError
from ...vocab_tree import VocabTree
from ...vocab_tree.sources import build_from_source


def tree_for_run(cfg, data, run_dir) -> VocabTree:
    f = cfg.family
    tok = data.tokenizer
    vh = tok.vocab_hash()
    if f.tree_source == "file":
        try:
            tree = VocabTree.load(f.tree_path, expected_vocab_hash=vh)
        except CheckpointError as e:
            msg = str(e)
            raise CheckpointError(msg if str(f.tree_path) in msg else
                                  f"family.tree_path {f.tree_path}: {msg}") from None
    else:
        key = json.dumps({"src": f.tree_source, "K": f.K, "H": f.H, "seed": f.tree_seed,
                          "cap": f.capacity_ratio, "dim": f.embed_dim, "vocab": vh,
                          "ckpt": f.tree_path, "corpus": data.train_cache.key}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        cached = Path(cfg.data.cache_path) / f"tree-{digest}.safetensors"
        if cached.exists():
            tree = VocabTree.load(cached, expected_vocab_hash=vh)
        else:
            tokens = np.asarray(data.train_cache.tokens)
            tree = build_from_source(f.tree_source, tok.vocab_size, f.K, f.H,
                                     seed=f.tree_seed, capacity_ratio=f.capacity_ratio,
                                     dim=f.embed_dim, tokens=tokens,
                                     checkpoint=f.tree_path, vocab_hash=vh)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tree.save(cached)
    if run_dir is not None:
        tree.save(Path(run_dir) / "tree.safetensors")
    return tree
