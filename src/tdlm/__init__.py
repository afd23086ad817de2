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
