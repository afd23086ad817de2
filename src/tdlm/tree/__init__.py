"""Deprecated alias of :mod:`tdlm.vocab_tree` (the vocabulary tree data structure; the model
family is :mod:`tdlm.families.tdlm`). ``tdlm.tree.X`` and ``tdlm.tree.<module>`` keep working."""
import importlib
import sys

from ..vocab_tree import *  # noqa: F401,F403
from ..vocab_tree import __all__  # noqa: F401

for _name in ("build", "describe", "embeddings", "tree", "sources"):
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"tdlm.vocab_tree.{_name}")
sys.modules[f"{__name__}.resources"] = importlib.import_module("tdlm.families.tdlm.resources")
sys.modules[f"{__name__}.cli"] = importlib.import_module("tdlm.cli.tree")
