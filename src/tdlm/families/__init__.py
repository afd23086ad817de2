"""Model families: each module registers a process + objective + sampler (see base.py)."""
from .base import Family, LossTerms, get_family, get_family_class, meta_model, register  # noqa: F401
