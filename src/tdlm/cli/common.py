"""Shared pieces of the subcommands: config options."""
from __future__ import annotations

from ..errors import ConfigError


def _config_from_args(args):
    from ..config import get_preset, load_config
    if args.config and args.preset:
        raise ConfigError("give either --preset or --config, not both")
    cfg = load_config(args.config) if args.config else get_preset(args.preset or "tiny")
    if args.set:
        preset = cfg.preset
        cfg = cfg.override(args.set)
        cfg.preset = preset
    return cfg


def _add_config_args(p):
    p.add_argument("--preset", help="named preset (default: tiny; see `tdlm info --list`)")
    p.add_argument("--config", help="a JSON config file (instead of --preset)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set train.max_steps=200")

