"""Deprecated alias of :mod:`tdlm.families.mdlm.family`."""
import sys

from .mdlm import family as _family

sys.modules[__name__] = _family
