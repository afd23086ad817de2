"""Deprecated alias: DID's deletion process and insertion-target DP live in
:mod:`tdlm.families.did` (``process``, ``dp``). ``tdlm.did.dp`` and ``tdlm.did.process`` keep
working."""
import importlib
import sys

from ..families.did.dp import InsertionTargets, insertion_targets, log_count, log_prefix_suffix
from ..families.did.process import delete, log_marginal

for _name in ("dp", "process"):
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"tdlm.families.did.{_name}")

__all__ = ["InsertionTargets", "insertion_targets", "log_count", "log_prefix_suffix", "delete",
           "log_marginal"]
