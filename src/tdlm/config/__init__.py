"""Typed, validated run configuration with named presets (layer 1).

``RunConfig(backbone, family, data, train)``: the DiT sizes, the family's own section (declared
by the family in ``tdlm/families/<name>/config.py``), the data and the optimisation. Every
field is validated; errors raise :class:`tdlm.errors.ConfigError` naming ``section.field`` and
the allowed values. Every field carries its documentation (``tdlm info --fields``). Configs
round-trip through JSON with a ``version``; run folders, checkpoints and exports written with
the version-1 flat layout load unchanged (:mod:`tdlm.config.legacy`).
"""
from .base import EPS_MIN, field_docs, opt  # noqa: F401
from .legacy import DiffusionConfig, ModelConfig  # noqa: F401  (deprecated v1 sections)
from .presets import PRESETS, get_preset, preset_names  # noqa: F401
from .run import VERSION, RunConfig, load_config  # noqa: F401
from .sections import (AUTO, LAYOUTS, LR_SCHEDULES, PARALLEL, PRECISIONS, SCHEDULES,  # noqa: F401
                       BackboneConfig, DataConfig, FamilySection, NoiseSection, TrainConfig,
                       family_section, register_section, section_names)
