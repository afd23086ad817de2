"""The autoregressive baseline's config section (``family`` with ``name = "ar"``): no options
of its own (the backbone is causal; the loss is next-token cross-entropy on real tokens)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...sampling.result import SampleOptions
from ...config import FamilySection, register_section


@register_section
@dataclass
class ARConfig(FamilySection):
    """Left-to-right next-token model on the shared DiT backbone (causal attention)."""
    name = "ar"
    layouts = ("packed", "crop_pad", "packed_bos", "varlen")


@dataclass
class ARSampleOptions(SampleOptions):
    """Left-to-right sampling (``steps`` is ignored: one token per forward)."""
    bos_id: Optional[int] = None     # first token when no prefix (default: the last id)
