"""Deprecated location, kept so existing imports work: training checkpoints are
:mod:`tdlm.store.checkpoint` (this name is the same module object)."""
import sys

from ..store import checkpoint as _checkpoint

sys.modules[__name__] = _checkpoint
