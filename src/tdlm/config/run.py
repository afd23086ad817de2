"""The run configuration: ``RunConfig(backbone, family, data, train)``.

``family`` is the family's own section (``tdlm/families/<name>/config.py``, found by name
through the section registry), so the shared sections hold no family's options. Configs
round-trip through JSON (``to_dict``/``from_dict``) with ``"version": 2``; a version-1 dict
(the flat ``model``/``diffusion`` layout of run folders, checkpoints and exports written
before the family sections) is read through :mod:`tdlm.config.legacy`. Overrides are
``section.field=value``; v1 keys (``model.tree_K=...``, ``diffusion.eps=...``) still work
(deprecated) and are translated for the run's family.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, fields
from typing import Any, Optional

from ..errors import ConfigError
from .base import build_section, check
from .legacy import DiffusionConfig, ModelConfig, from_v1_objects, upgrade_v1, v1_key_to_v2
from .sections import (BackboneConfig, DataConfig, FamilySection, TrainConfig,
                       family_section)

VERSION = 2
_SECTIONS = ("backbone", "family", "data", "train")


@dataclass(init=False)
class RunConfig:
    backbone: BackboneConfig
    family: FamilySection
    data: DataConfig
    train: TrainConfig
    preset: str = "custom"

    def __init__(self, backbone: Optional[BackboneConfig] = None,
                 family: "FamilySection | str | None" = None,
                 data: Optional[DataConfig] = None, train: Optional[TrainConfig] = None,
                 preset: str = "custom", *, model: Optional[ModelConfig] = None,
                 diffusion: Optional[DiffusionConfig] = None) -> None:
        if model is not None or diffusion is not None:
            warnings.warn("RunConfig(model=, diffusion=) is deprecated: use "
                          "RunConfig(backbone=, family=)", DeprecationWarning, stacklevel=2)
            if backbone is not None or family is not None:
                raise ConfigError("RunConfig: give backbone/family or the deprecated "
                                  "model/diffusion, not both")
            v2 = from_v1_objects(model or ModelConfig(), diffusion)
            backbone = build_section(BackboneConfig, v2["backbone"], "backbone")
            family = _family_from_dict(v2["family"])
            if v2["train"] and train is None:
                train = TrainConfig(**v2["train"])
            elif v2["train"]:
                train = dataclasses.replace(train, **v2["train"])
        if isinstance(family, str):
            family = family_section(family)()
        self.backbone = backbone if backbone is not None else BackboneConfig()
        self.family = family if family is not None else family_section("mdlm")()
        self.data = data if data is not None else DataConfig()
        self.train = train if train is not None else TrainConfig()
        self.preset = preset
        self.__post_init__()

    def __post_init__(self) -> None:
        check(isinstance(self.family, FamilySection), "family",
              f"expected a family section, got {type(self.family).__name__}")
        check(self.data.seq_len <= self.backbone.max_seq_len, "data.seq_len",
              f"{self.data.seq_len} exceeds the model's max_seq_len {self.backbone.max_seq_len}")
        self.family.check_run(self)

    # ---- deprecated v1 views ------------------------------------------------------------
    @property
    def model(self) -> "_V1View":
        """Deprecated: the v1 ``model`` section as a view (``cfg.model.tree_K`` is
        ``cfg.family.K``, ``cfg.model.family`` is ``cfg.family.name``, ...)."""
        warnings.warn("RunConfig.model is deprecated: use cfg.backbone / cfg.family",
                      DeprecationWarning, stacklevel=2)
        return _V1View(self, "model")

    @property
    def diffusion(self) -> "_V1View":
        """Deprecated: the v1 ``diffusion`` section as a view of the family section."""
        warnings.warn("RunConfig.diffusion is deprecated: use cfg.family",
                      DeprecationWarning, stacklevel=2)
        return _V1View(self, "diffusion")

    # ---- JSON round trip ----------------------------------------------------------------
    def to_dict(self) -> dict:
        fam = dataclasses.asdict(self.family)
        return {"version": VERSION, "preset": self.preset,
                "backbone": dataclasses.asdict(self.backbone),
                "family": {"name": self.family.name, **fam},
                "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """A config from its JSON object: version 2, or the v1 flat layout (no ``version``,
        ``model``/``diffusion`` sections) written by earlier tdlm."""
        if not isinstance(d, dict):
            raise ConfigError("invalid config: expected a JSON object")
        version = d.get("version", 1 if ("model" in d or "diffusion" in d) else VERSION)
        if version == 1:
            d = upgrade_v1({k: v for k, v in d.items() if k != "version"})
        elif version != VERSION:
            raise ConfigError(f"config version {version!r} is not supported by this tdlm "
                              f"(it reads versions 1 and {VERSION})")
        allowed = set(_SECTIONS) | {"preset", "version"}
        unknown = set(d) - allowed
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}; "
                              f"allowed: {', '.join(_SECTIONS)}, preset")
        kw: dict = {}
        if "backbone" in d:
            kw["backbone"] = build_section(BackboneConfig, d["backbone"], "backbone")
        if "family" in d:
            kw["family"] = _family_from_dict(d["family"])
        if "data" in d:
            kw["data"] = build_section(DataConfig, d["data"], "data")
        if "train" in d:
            kw["train"] = build_section(TrainConfig, d["train"], "train")
        if "preset" in d:
            kw["preset"] = d["preset"]
        return cls(**kw)

    def override(self, assignments: list[str]) -> "RunConfig":
        """Apply ``section.field=value`` assignments (values parsed as JSON when possible).
        ``family.name=X`` switches family: fields the new family's section shares keep their
        values. v1 keys (``model.*``, ``diffusion.*``) are translated (deprecated)."""
        d = self.to_dict()
        for a in assignments:
            if "=" not in a or "." not in a.split("=", 1)[0]:
                raise ConfigError(f"invalid override {a!r}: expected section.field=value")
            key, raw = a.split("=", 1)
            try:
                val = json.loads(raw)
            except json.JSONDecodeError:
                val = raw
            key = _translate_key(key, d["family"]["name"], a)
            section, name = key.split(".", 1)
            if section == "family" and name == "name":
                d["family"] = _switch_family(d["family"], val)
                continue
            if section not in d or not isinstance(d[section], dict):
                raise ConfigError(f"unknown config section {section!r} in override {a!r}; "
                                  f"allowed: {', '.join(_SECTIONS)}")
            allowed = (set(d[section]) if section != "family" else
                       {f.name for f in fields(family_section(d["family"]["name"]))})
            if name not in allowed:
                raise ConfigError(f"unknown config field '{key}'; allowed: "
                                  f"{', '.join(sorted(allowed))}")
            d[section][name] = val
        return RunConfig.from_dict(d)


def _family_from_dict(d: Any) -> FamilySection:
    if not isinstance(d, dict):
        raise ConfigError("invalid config section 'family': expected an object")
    name = d.get("name")
    if not isinstance(name, str):
        raise ConfigError("invalid config section 'family': it needs a 'name' (the family)")
    return build_section(family_section(name), d, "family", drop=("name",))


def _switch_family(old: dict, name: Any) -> dict:
    """The family section of ``name`` keeping the values of fields it shares with ``old``."""
    if not isinstance(name, str):
        raise ConfigError(f"invalid config value for 'family.name': {name!r}")
    cls = family_section(name)
    keep = {f.name for f in fields(cls)}
    return {"name": name, **{k: v for k, v in old.items() if k in keep}}


def _translate_key(key: str, family: str, assignment: str) -> str:
    section = key.split(".", 1)[0]
    if section not in ("model", "diffusion"):
        return key
    new = v1_key_to_v2(key, family)
    if new is None:
        raise ConfigError(f"config field '{key}' does not apply to the {family!r} family "
                          f"(override {assignment!r})")
    warnings.warn(f"override key {key!r} is deprecated: use {new!r}", DeprecationWarning,
                  stacklevel=3)
    return new


class _V1View:
    """Attribute access with v1 names, read and write, on a v2 config."""

    def __init__(self, cfg: RunConfig, section: str):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_section", section)

    def _where(self, name: str):
        cfg = self._cfg
        if self._section == "model" and name == "family":
            return None, "name"
        target = v1_key_to_v2(f"{self._section}.{name}", cfg.family.name)
        if target is None:
            raise AttributeError(f"{self._section}.{name} does not apply to the "
                                 f"{cfg.family.name!r} family")
        sec, field_name = target.split(".", 1)
        return getattr(cfg, sec), field_name

    def __getattr__(self, name: str):
        obj, field_name = self._where(name)
        return self._cfg.family.name if obj is None else getattr(obj, field_name)

    def __setattr__(self, name: str, value) -> None:
        obj, field_name = self._where(name)
        if obj is None:
            raise AttributeError("set the family with cfg.override(['family.name=...'])")
        setattr(obj, field_name, value)


def load_config(path: str) -> RunConfig:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    return RunConfig.from_dict(d)
