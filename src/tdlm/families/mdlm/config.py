"""MDLM's config section (``family`` with ``name = "mdlm"``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...sampling.result import SampleOptions
from ...schedules import SAMPLE_T_MIN
from ...config import NoiseSection, opt, register_section

HEAD_IMPLS = ("masked", "reference", "chunked")


@register_section
@dataclass
class MDLMConfig(NoiseSection):
    """Absorbing ('masking') diffusion with the SUBS parameterisation: the noise schedule
    fields of every diffusion family plus the options below."""
    name = "mdlm"
    layouts = ("packed", "crop_pad", "packed_bos", "varlen")
    num_timesteps: int = opt(0, "0: continuous-time NELBO; T > 0: the discrete-time bound with T steps")
    keep_first: bool = opt(False, "position 0 (BOS) is never masked nor counted (the DID comparison)")
    train_on_padding: bool = opt(False, "crop_pad: training also models the padding (GIDD); evaluation never counts it")
    head_impl: str = opt("masked", "loss head: masked (the output layer and a fused cross-entropy on the counted masked positions only: the lean default) | reference (full [B, L, V] fp32 logits and SUBS log-probabilities, as MDLM's code; what the memory comparisons use) | chunked (fused linear cross-entropy over the masked positions, head_chunk rows at a time, logits recomputed in backward); all three give the same loss and gradients")
    head_chunk: int = opt(1024, "head_impl=chunked: positions per chunk (memory ~ head_chunk x V x 4 bytes per working tensor)")

    def __post_init__(self) -> None:
        super().__post_init__()
        from ...config.base import check
        check(isinstance(self.num_timesteps, int) and self.num_timesteps >= 0,
              "family.num_timesteps", f"must be an integer >= 0, got {self.num_timesteps!r}")
        check(self.head_impl in HEAD_IMPLS, "family.head_impl",
              f"{self.head_impl!r} is not one of {', '.join(HEAD_IMPLS)}")
        check(isinstance(self.head_chunk, int) and not isinstance(self.head_chunk, bool)
              and self.head_chunk >= 1, "family.head_chunk",
              f"must be an integer >= 1, got {self.head_chunk!r}")


@dataclass
class MDLMSampleOptions(SampleOptions):
    """Ancestral sampling on the grid linspace(1, t_min, steps + 1)."""
    t_min: float = SAMPLE_T_MIN      # end of the time grid
    cache: bool = True               # reuse the prediction while nothing moved (no time input)
    noise_removal: bool = True       # fill the masks left at the end with the argmax
    trajectory: bool = False         # record every step's state (SampleResult.trajectory)
    bos_id: Optional[int] = None     # keep_first models: the BOS held at position 0 (from the tokenizer)
