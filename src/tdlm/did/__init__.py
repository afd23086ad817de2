"""Deletion-insertion diffusion (DID) building blocks: the deletion forward process and the
exact subsequence-count DP that gives the insertion targets. The model family lives in
``tdlm.families.deletion_insertion``."""
from .dp import InsertionTargets, insertion_targets, log_count, log_prefix_suffix
from .process import delete, log_marginal

__all__ = ["InsertionTargets", "insertion_targets", "log_count", "log_prefix_suffix", "delete",
           "log_marginal"]
