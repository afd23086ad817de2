"""Obtain the vocabulary tree a TDLM run trains with, from ``model.tree_*`` settings.

* ``corpus``: PPMI + truncated SVD embeddings of the training token stream, then balanced
  k-means (default; needs no trained model).
* ``checkpoint``: the input embeddings of a trained checkpoint (``tree_path``).
* ``random`` / ``frequency``: ablation baselines.
* ``file``: a tree saved by ``tdlm tree build`` (checked against the tokenizer's vocab hash).
Built trees are cached by (settings, corpus, tokenizer) next to the token cache and copied
into the run folder.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .build import build_frequency_tree, build_tree
from .embeddings import corpus_embeddings, from_checkpoint_embeddings, random_embeddings
from .tree import VocabTree


def build_from_source(source: str, V: int, K: int, H: int, *, seed: int = 0,
                      capacity_ratio: float = 1.0, dim: int = 64, tokens=None,
                      checkpoint: str = "", vocab_hash: str = "") -> VocabTree:
    """Build a tree from one of the embedding sources (see module docstring)."""
    meta = {"embedding_source": source}
    if source == "frequency":
        counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=V)[:V]
        return build_frequency_tree(counts, K, H, capacity_ratio, vocab_hash=vocab_hash, meta=meta)
    if source == "corpus":
        emb = corpus_embeddings(np.asarray(tokens), V, dim=dim, seed=seed)
    elif source == "random":
        emb = random_embeddings(V, dim, seed)
    elif source == "checkpoint":
        from ..store.checkpoint import load_checkpoint
        ck = load_checkpoint(checkpoint)
        if vocab_hash:      # embeddings of another tokenizer would silently be mis-assigned
            from ..store.checkpoint import tokenizer_of as load_tokenizer
            ck_hash = load_tokenizer(ck).vocab_hash()
            if ck_hash != vocab_hash:
                raise CheckpointError(f"checkpoint {ck.path} was trained with another tokenizer "
                                      f"(vocab hash {ck_hash[:12]} != {vocab_hash[:12]}): its "
                                      "embeddings cannot order this vocabulary's tree")
        key = next((k for k in ck.model_state if k.endswith("vocab_embed.weight")), None)
        if key is None:
            raise CheckpointError(f"checkpoint {ck.path} has no input embedding "
                                  "(vocab_embed.weight) to build a tree from")
        emb = from_checkpoint_embeddings(ck.model_state[key], V)
        meta["checkpoint"] = str(ck.path)
    else:
        raise ValueError(source)
    return build_tree(emb, K, H, seed=seed, leaf_capacity_ratio=capacity_ratio,
                      vocab_hash=vocab_hash, meta=meta)


def tree_for_run(cfg, data, run_dir) -> VocabTree:
    m = cfg.model
    tok = data.tokenizer
    vh = tok.vocab_hash()
    if m.tree_source == "file":
        try:
            tree = VocabTree.load(m.tree_path, expected_vocab_hash=vh)
        except CheckpointError as e:
            msg = str(e)
            raise CheckpointError(msg if str(m.tree_path) in msg else
                                  f"model.tree_path {m.tree_path}: {msg}") from None
    else:
        key = json.dumps({"src": m.tree_source, "K": m.tree_K, "H": m.tree_H, "seed": m.tree_seed,
                          "cap": m.tree_capacity_ratio, "dim": m.tree_embed_dim, "vocab": vh,
                          "ckpt": m.tree_path, "corpus": data.train_cache.key}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        cached = Path(cfg.data.cache_path) / f"tree-{digest}.safetensors"
        if cached.exists():
            tree = VocabTree.load(cached, expected_vocab_hash=vh)
        else:
            tokens = np.asarray(data.train_cache.tokens)
            tree = build_from_source(m.tree_source, tok.vocab_size, m.tree_K, m.tree_H,
                                     seed=m.tree_seed, capacity_ratio=m.tree_capacity_ratio,
                                     dim=m.tree_embed_dim, tokens=tokens,
                                     checkpoint=m.tree_path, vocab_hash=vh)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tree.save(cached)
    if run_dir is not None:
        tree.save(Path(run_dir) / "tree.safetensors")
    return tree
