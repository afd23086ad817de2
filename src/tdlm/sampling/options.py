"""Checks and parsing of the sampling options shared by ``tdlm sample`` with one model and
with a model schedule (one-line ConfigErrors for bad values)."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError


def check_sample_args(steps: int, num: int, seq_len: Optional[int], temperature: float,
                      top_p: float) -> None:
    """steps, num >= 1; seq_len >= 1 when given; temperature > 0; top_p in (0, 1]."""
    if steps <= 0:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if num <= 0:
        raise ConfigError(f"--num must be >= 1, got {num}")
    if seq_len is not None and seq_len <= 0:
        raise ConfigError(f"--seq-len must be >= 1, got {seq_len}")
    if not temperature > 0:
        raise ConfigError(f"--temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")


def parse_steps_split(text: str, cfg, family, steps: int) -> list[int]:
    """``--steps-split 64,64`` (given root-to-leaf) as the per-level step counts indexed by
    height (leaf first), validated against ``steps`` by the tree family."""
    if "steps_split" not in family.sample_options:
        raise ConfigError("--steps-split applies to tdlm (tree) models only")
    try:
        split = [int(v) for v in text.split(",")][::-1]
    except ValueError:
        raise ConfigError(f"--steps-split {text!r}: expected integers like 64,64") from None
    family.steps_per_level(steps, split)          # validates
    return split


#: how clamped prefixes are given to the models; recorded with prefix-conditional results.
#: 1: as given (until session 22); 2: [BOS] in front of prompts on BOS-led layouts, and TDLM
#: shows the prefix at level h as its height-h ancestors (it had shown leaves at every level)
PREFIX_CONVENTION = 2


def encode_prompt(tokenizer, prompt: str, num: int, bos: bool = False) -> torch.Tensor:
    """The prompt's token ids repeated for ``num`` samples: a [num, k] prefix; ``bos``: with
    the tokenizer's BOS in front (a model trained on a BOS-led layout, whose rows all start
    with it, as ``prefixes_from_validation`` gives them)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("--prompt encodes to no tokens")
    return torch.tensor([([tokenizer.bos_id] if bos else []) + ids] * num)
