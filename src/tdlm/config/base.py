"""Validation and JSON helpers shared by every config section (layer 1).

A section is a dataclass whose fields carry their documentation (``opt(default, doc)``), so
``tdlm info --fields`` can list every field of every section with its type, default and
meaning. Validation raises :class:`tdlm.errors.ConfigError` naming ``section.field`` and
the allowed values; :func:`build_section` turns a JSON object into a section with the same
one-line errors for unknown fields and wrong types.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field, fields
from typing import Any

from ..errors import ConfigError

EPS_MIN = 1e-12      # smallest eps: below it 1 - eps rounds to 1 in float64 and the time
                     # input sigma(1) = -log eps is no longer finite (tdlm.schedules)


def opt(default: Any, doc: str, words: tuple = (), **kw) -> Any:
    """A dataclass field with its documentation (shown by ``tdlm info --fields``).
    ``words``: strings a numeric field also accepts (e.g. ``train.micro_batch = "auto"``)."""
    meta = {"doc": doc, "words": tuple(words)}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"invalid config value for '{name}': {msg}")


def positive(obj: Any, *names: str, section: str = "") -> None:
    for n in names:
        v = getattr(obj, n)
        check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
              f"{section}{n}", f"must be > 0, got {v!r}")


def choice(obj: Any, name: str, allowed: tuple, section: str = "") -> None:
    v = getattr(obj, name)
    check(v in allowed, f"{section}{name}", f"{v!r} is not one of {', '.join(map(str, allowed))}")


def field_docs(cls) -> list[dict]:
    """``[{name, type, default, doc}]`` for every field of a section class."""
    rows = []
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:      # type: ignore[misc]
            default = f.default_factory()                        # type: ignore[misc]
        else:
            default = None
        rows.append({"name": f.name, "type": f.type if isinstance(f.type, str) else
                     getattr(f.type, "__name__", str(f.type)),
                     "default": default, "doc": f.metadata.get("doc", "")})
    return rows


def build_section(cls, d: Any, section: str, drop: tuple = ()):
    """``cls(**d)`` with one-line errors naming ``section.field`` for unknown fields and for
    values of the wrong JSON type (a bool where a number is expected, a float where an
    integer is expected, ...). Keys in ``drop`` are ignored (e.g. a family section's
    ``name``)."""
    if not isinstance(d, dict):
        raise ConfigError(f"invalid config section '{section}': expected an object")
    allowed = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(allowed) - set(drop)
    if unknown:
        raise ConfigError(f"unknown config field(s) "
                          f"{', '.join(f'{section}.{u}' for u in sorted(unknown))}; "
                          f"allowed: {', '.join(allowed)}")
    defaults = cls()
    kw = {}
    for k, v in d.items():
        if k in drop:
            continue
        default = getattr(defaults, k)
        name = f"{section}.{k}"
        if isinstance(v, str) and v in allowed[k].metadata.get("words", ()):
            kw[k] = v
            continue
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"invalid config value for '{name}': expected true/false, got {v!r}")
        elif isinstance(default, (int, float)):
            if isinstance(default, int) and isinstance(v, float) and v.is_integer():
                v = int(v)
            if not isinstance(v, (int, float)):
                raise ConfigError(f"invalid config value for '{name}': expected a number, got {v!r}")
            if isinstance(default, int) and isinstance(v, float):
                raise ConfigError(f"invalid config value for '{name}': expected an integer, got {v!r}")
        elif isinstance(default, str) and not isinstance(v, str):
            raise ConfigError(f"invalid config value for '{name}': expected a string, got {v!r}")
        kw[k] = v
    return cls(**kw)
