"""Build a vocabulary tree from one embedding source.

* ``corpus``: PPMI + truncated SVD embeddings of the training token stream, then balanced
  k-means (default; needs no trained model).
* ``checkpoint``: the input embeddings of a trained checkpoint (``tree_path``).
* ``exchange``: the ``corpus`` tree's splits refined by likelihood-based (exchange)
  clustering of the corpus bigrams under the same capacities (:mod:`.exchange`).
* ``random`` / ``frequency``: ablation baselines.
* ``file``: a tree saved by ``tdlm tree build`` (checked against the tokenizer's vocab hash).
(``tdlm.families.tdlm.resources.tree_for_run`` picks the source from a run's config and caches
the built tree.)
"""
from __future__ import annotations

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
    refine = None
    if source in ("corpus", "exchange"):
        emb = corpus_embeddings(np.asarray(tokens), V, dim=dim, seed=seed)
        if source == "exchange":
            from .exchange import exchange_refiner
            refine = exchange_refiner(tokens, V, seed=seed)
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
                      vocab_hash=vocab_hash, meta=meta, refine=refine)
