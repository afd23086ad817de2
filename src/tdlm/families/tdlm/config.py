"""TDLM's config section (``family`` with ``name = "tdlm"``): the vocabulary tree (K, H and how
it is built), the level windows and weights, and the noise fields of every diffusion family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...sampling.result import SampleOptions
from ...schedules import SAMPLE_T_MIN
from ...config import NoiseSection, opt, register_section
from ...config.base import check, choice, positive

TREE_SOURCES = ("corpus", "exchange", "random", "frequency", "checkpoint", "file")


@register_section
@dataclass
class TDLMConfig(NoiseSection):
    """Tree-structured diffusion (spec TDLM.md): H levels of K-way child prediction.

    The default tree, ``tree_source="corpus"`` (balanced k-means of corpus co-occurrence
    embeddings), follows the parity study's ablations [ours] (benchmarks/results/parity.md:
    ``tdlm-cpu``, 8k BPE, K=128, H=2, seed 0, 1000 steps; validation NELBO/token): exchange
    6.027, corpus 6.097, H=3 (K=21) 6.330, checkpoint (the trained MDLM's input embeddings)
    6.526, frequency 6.560, random 6.624. Only exchange and corpus are within two runs' seed
    noise of the lowest (2 sqrt(2) x TDLM's seed sd 0.047 = 0.134 nats), so no construction is
    shown better than corpus; corpus stays the default because it builds about 4x faster
    (GPT-2 vocabulary, K=256, 2 cores: 27 s against exchange's 109 s,
    benchmarks/results/tree_build.md). ``tree_source="exchange"`` is there for those who want
    the lowest single-seed figure."""
    name = "tdlm"
    layouts = ("packed", "crop_pad", "packed_bos", "varlen")
    renamed = {"model.tree_K": "K", "model.tree_H": "H", "model.tree_head": "head",
               "model.tree_capacity_ratio": "capacity_ratio", "model.tree_embed_dim": "embed_dim"}
    K: int = opt(512, "children per internal node (branching factor of the vocabulary tree)")
    H: int = opt(2, "levels of the tree (H = 1 is MDLM with a K = V head)")
    head: str = opt("shared", "child head: shared (one K-way head) | per_level (one per level)")
    tree_source: str = opt("corpus", "how the tree is built: corpus | exchange (corpus + likelihood-based exchange clustering of the bigrams) | random | frequency | checkpoint | file")
    tree_path: str = opt("", "the tree file (tree_source=file) or checkpoint (tree_source=checkpoint)")
    tree_seed: int = opt(0, "seed of the embeddings and k-means of the tree build")
    capacity_ratio: float = opt(1.0, "leaf-cluster capacity / K (the paper's cluster size ratio)")
    embed_dim: int = opt(64, "dimension of the corpus/random token embeddings clustered into the tree")
    num_timesteps: int = opt(0, "0: continuous-time NELBO; T > 0: the discrete-time bound with T steps")
    window_allocation: str = opt("linear", "level time windows: linear (equal) | exponential")
    window_ratio: float = opt(2.0, "exponential allocation: ratio of consecutive window widths")
    level_weighting: str = opt("none", "training multiplier per level: none | linear | exponential")
    level_weight_ratio: float = opt(2.0, "ratio of the level multipliers (linear / exponential)")
    train_weight_clip: float = opt(0.0, "0: exact ELBO weights; > 0 clips them in training")
    train_on_padding: bool = opt(False, "crop_pad: training also models the padding (GIDD); evaluation never counts it")

    def __post_init__(self) -> None:
        super().__post_init__()
        s = "family."
        positive(self, "K", "H", "capacity_ratio", "embed_dim", "window_ratio",
                 "level_weight_ratio", section=s)
        check(self.K >= 2, s + "K", f"must be >= 2, got {self.K}")
        choice(self, "head", ("shared", "per_level"), section=s)
        choice(self, "tree_source", TREE_SOURCES, section=s)
        check(self.tree_source not in ("checkpoint", "file") or bool(self.tree_path),
              s + "tree_path", f"required when tree_source={self.tree_source!r}")
        check(isinstance(self.num_timesteps, int) and self.num_timesteps >= 0,
              s + "num_timesteps", f"must be an integer >= 0, got {self.num_timesteps!r}")
        choice(self, "window_allocation", ("linear", "exponential"), section=s)
        choice(self, "level_weighting", ("none", "linear", "exponential"), section=s)
        check(self.train_weight_clip >= 0, s + "train_weight_clip", "must be >= 0")


@dataclass
class TDLMSampleOptions(SampleOptions):
    """Coarse-to-fine ancestral sampling, level by level from the root."""
    steps_split: Optional[list] = None   # steps per level, leaf level first (default: even)
    cache: bool = True
    t_min: float = SAMPLE_T_MIN
    noise_removal: bool = True
    trajectory: bool = False         # record every step's state (SampleResult.trajectory)
