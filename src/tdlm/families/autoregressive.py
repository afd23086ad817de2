"""Deprecated alias of :mod:`tdlm.families.ar.family`."""
import sys

from .ar import family as _family

sys.modules[__name__] = _family
