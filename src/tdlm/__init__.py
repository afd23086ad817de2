"""tdlm: discrete diffusion language models (TDLM, MDLM, DID, AR) in PyTorch."""
__version__ = "0.1.0"


def load(path, device: str = "cpu", use_ema: bool = True, expect_family=None):
    """Load a checkpoint into a :class:`tdlm.api.Pipeline` (``generate``, ``nelbo``)."""
    from .api import load as _load
    return _load(path, device=device, use_ema=use_ema, expect_family=expect_family)
