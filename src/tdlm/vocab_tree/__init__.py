"""Vocabulary tree for TDLM (spec §2): integer arrays with save/load/validate
(:class:`VocabTree`), a balanced k-means builder (:func:`build_tree`), a frequency-sorted
baseline (:func:`build_frequency_tree`), embedding sources and summaries."""
from .build import build_frequency_tree, build_tree, plan_groups
from .describe import describe_tree, tree_stats
from .embeddings import (corpus_embeddings, frequency_embeddings, from_checkpoint_embeddings,
                         random_embeddings, token_counts)
from .tree import VocabTree

__all__ = [
    "VocabTree", "build_tree", "build_frequency_tree", "plan_groups",
    "from_checkpoint_embeddings", "corpus_embeddings", "random_embeddings",
    "frequency_embeddings", "token_counts", "describe_tree", "tree_stats",
]
