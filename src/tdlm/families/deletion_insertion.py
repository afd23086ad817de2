"""Deprecated alias of :mod:`tdlm.families.did.family`."""
import sys

from .did import family as _family

sys.modules[__name__] = _family
