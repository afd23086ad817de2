"""tdlm: discrete diffusion language models (TDLM, MDLM, DID, AR) in PyTorch."""
__version__ = "0.1.0"


def load(path, device: str = "cpu", use_ema: bool = True, expect_family=None):
    """Load a checkpoint into a :class:`tdlm.pipeline.Pipeline` (``generate``, ``nelbo``)."""
    from .pipeline import load as _load
    return _load(path, device=device, use_ema=use_ema, expect_family=expect_family)


def from_pretrained(name_or_path, device: str = "cpu", **kw):
    """A :class:`tdlm.pipeline.Pipeline` from an exported folder (or run/checkpoint folder), or a
    Hugging Face hub id when it is not a local path; see :mod:`tdlm.export`."""
    from .pipeline import from_pretrained as _fp
    return _fp(name_or_path, device=device, **kw)


def save_pretrained(model, folder, **kw):
    """Export a Pipeline or a run/checkpoint folder to a shareable folder (config.json,
    model.safetensors, tokenizer, tree, README.md, manifest.json); see :mod:`tdlm.export`."""
    from .pipeline import save_pretrained as _sp
    return _sp(model, folder, **kw)


def measure_throughput(config, steps: int = 5, warmup: int = 2, device: str = "cpu",
                       overrides=()):
    """Training tokens/s and seconds per step of a preset name or ``RunConfig`` (with
    ``overrides``, e.g. ``["train.global_batch=8"]``) on this machine: the trainer's own step
    over the config's data; see :mod:`tdlm.train.throughput`."""
    from .config import get_preset
    from .train.throughput import measure_throughput as _mt
    cfg = get_preset(config) if isinstance(config, str) else config
    if overrides:
        cfg = cfg.override(list(overrides))
    return _mt(cfg, steps=steps, warmup=warmup, device=device)


def compare_throughput(configs, steps: int = 5, warmup: int = 2, device: str = "cpu",
                       overrides=()) -> dict:
    """:func:`measure_throughput` of several presets or configs (a list, or ``{name: preset or
    RunConfig}``; ``overrides`` apply to each) timed round-robin, one step of each in turn, with
    each one's step time (``step_ratio``: mean step time over the first's; the median of the
    per-round ratios in ``step_ratio_median``), tokens and FLOPs relative to the first:
    ``tdlm.compare_throughput(["mdlm-cpu", "did-cpu"], steps=24)["did-cpu"]["step_ratio"]``."""
    from .config import get_preset
    from .train.throughput import compare_throughput as _ct
    from .errors import ConfigError
    if not isinstance(configs, dict):
        names = [c if isinstance(c, str) else f"config{i}" for i, c in enumerate(configs)]
        if len(set(names)) < len(names):
            raise ConfigError(f"compare_throughput: a preset is named twice in {names}")
        configs = dict(zip(names, configs))
    cfgs = {}
    for name, c in configs.items():
        cfg = get_preset(c) if isinstance(c, str) else c
        cfgs[name] = cfg.override(list(overrides)) if overrides else cfg
    return _ct(cfgs, steps=steps, warmup=warmup, device=device)


def load_scheduled(paths, device: str = "cpu", use_ema: bool = True):
    """A :class:`tdlm.scheduling.sampler.ScheduledSampler` over named checkpoints
    (``{"H": "runs/heavy", "L": "runs/light"}``): ``sample(num, steps, schedule="sandwich:0.25")``,
    with the forward calls and FLOPs saved in ``last_report``."""
    from .scheduling.sampler import load_scheduled as _ls
    return _ls(paths, device=device, use_ema=use_ema)
