"""Former location of the multi-process helpers, kept so existing imports work: everything
distributed is :mod:`tdlm.train.parallel` (``Runtime``, ``parallelize``, batch sharding,
full state dicts); this name is the same module object."""
import sys

from . import parallel as _parallel

sys.modules[__name__] = _parallel
