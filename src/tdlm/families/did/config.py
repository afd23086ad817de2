"""DID's config section (``family`` with ``name = "did"``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ...sampling.result import SampleOptions
from ...schedules import SAMPLE_T_MIN
from ...config import NoiseSection, opt, register_section
from ...config.base import check, choice


@register_section
@dataclass
class DIDConfig(NoiseSection):
    """Deletion-insertion diffusion (spec DID.md): tokens are deleted by the forward process
    and re-inserted by the model; continuous time only."""
    name = "did"
    layouts = ("packed_bos", "varlen")
    renamed = {"model.did_length": "length"}
    length: str = opt("fixed", "fixed (DICE: gap softmax, no time input) | variable (DISE: time-conditioned)")
    train_weighting: str = opt("elbo", "elbo | simple (drop the w(t) weight in training)")
    train_weight_clip: float = opt(0.0, "0: exact ELBO weights; > 0 clips them in training")
    head_rows: str = opt("targets", "rows of the output layer in the loss: targets (only the gap rows that have insertion targets, r_g > 0: the lean default) | all (every gap row, as the paper's code); both give the same loss and gradients")

    def __post_init__(self) -> None:
        super().__post_init__()
        s = "family."
        choice(self, "length", ("fixed", "variable"), section=s)
        choice(self, "train_weighting", ("elbo", "simple"), section=s)
        choice(self, "head_rows", ("targets", "all"), section=s)
        check(self.train_weight_clip >= 0, s + "train_weight_clip", "must be >= 0")

    def check_run(self, run) -> None:
        check(run.data.layout in self.layouts, "data.layout",
              f"the did family needs BOS-led sequences: packed_bos or varlen, "
              f"got {run.data.layout!r}")


@dataclass
class DIDSampleOptions(SampleOptions):
    """Tau-leaping insertion from [BOS] (+ prompt)."""
    bos_id: Optional[int] = None                       # required: the tokenizer's BOS
    prompts: Optional[Sequence[Sequence[int]]] = None  # kept fixed; insertions after them
    allowed: Optional[Sequence[Sequence[bool]]] = None  # per initial token: gap may grow
    t_min: float = SAMPLE_T_MIN
    cache: bool = True
    max_extra_steps: int = 0
    exclude_tokens: Optional[Sequence[int]] = None     # never inserted
    trajectory: bool = False                           # record every step's sequences
