"""Deprecated alias of :mod:`tdlm.families.tdlm.family`."""
import sys

from .tdlm import family as _family

sys.modules[__name__] = _family
