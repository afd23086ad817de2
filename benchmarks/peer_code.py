"""Running the peers' public modeling code from local checkouts (never copied here).

Used by ``benchmarks/peers.py`` (timing) and ``scripts/make_published_fixture.py`` (the
logits fixture of ``tdlm convert``). Checkouts come from the search tool's ``fetch``
(github:s-sahoo/duo, github:kuleshov-group/mdlm, github:dvruette/gidd,
github:Dao-AILab/flash-attention).

flash-attn's CUDA kernels cannot run on a CPU. MDLM's and DUO's ``models/dit.py`` import
``flash_attn`` unconditionally, so :func:`flash_attn_shim` assembles a temporary
``flash_attn`` package from

* ``flash_attn/layers/rotary.py``: the real file of the flash-attention checkout (its
  ``apply_rotary_emb_torch`` is the reference its own tests check the Triton kernel against);
* ``flash_attn.ops.triton.rotary.apply_rotary`` (the Triton kernel): a stand-in written here
  that calls that reference ``apply_rotary_emb_torch`` (in place when asked, conjugate = -sin);
* ``flash_attn_varlen_qkvpacked_func`` (MDLM's attention): a stand-in written here,
  per-sequence ``F.scaled_dot_product_attention`` with the default 1/sqrt(head_dim) scale.
  DUO's DiT calls SDPA itself and only takes the rotary function from flash-attn; GIDD's DiT
  falls back to pure PyTorch when flash-attn is missing (so it is loaded without the shim).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

TRITON_STANDIN = '''
def apply_rotary(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None,
                 interleaved=False, inplace=False, conjugate=False):
    """Stand-in for the Triton kernel: flash-attention's reference apply_rotary_emb_torch."""
    assert cu_seqlens is None and (not isinstance(seqlen_offsets, int) or seqlen_offsets == 0)
    from flash_attn.layers.rotary import apply_rotary_emb_torch
    out = apply_rotary_emb_torch(x, cos, -sin if conjugate else sin, interleaved)
    if inplace:
        x.copy_(out)
        return x
    return out
'''

ATTN_STANDIN = '''
import torch
import torch.nn.functional as F

def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, **kw):
    """Stand-in (CPU): qkv [T, 3, H, D] -> [T, H, D], attention within each segment."""
    assert dropout_p == 0.0
    out = torch.empty_like(qkv[:, 0])
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        q, k, v = (qkv[a:b, i].transpose(0, 1) for i in range(3))      # [H, S, D]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)
        out[a:b] = o.transpose(0, 1)
    return out
'''

STAND_INS = [
    "flash_attn.ops.triton.rotary.apply_rotary -> flash-attention's reference "
    "apply_rotary_emb_torch (its tests' reference for the kernel)",
    "flash_attn_varlen_qkvpacked_func -> per-sequence torch.nn.functional."
    "scaled_dot_product_attention (MDLM only; DUO calls SDPA itself)",
]


def flash_attn_shim(root: Path, flash: Path) -> None:
    """Write the ``flash_attn`` stand-in package (module docstring) under ``root`` and put
    ``root`` first on ``sys.path``."""
    pkg = Path(root) / "flash_attn"
    for sub in ("", "layers", "ops", "ops/triton"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from . import flash_attn_interface, layers  # noqa\n"
                                     "from .layers import rotary  # noqa\n")
    (pkg / "layers" / "rotary.py").write_text(
        (Path(flash) / "flash_attn" / "layers" / "rotary.py").read_text())
    (pkg / "ops" / "triton" / "rotary.py").write_text(textwrap.dedent(TRITON_STANDIN))
    (pkg / "flash_attn_interface.py").write_text(textwrap.dedent(ATTN_STANDIN))
    sys.path.insert(0, str(root))


def load_module(path: Path, name: str):
    """Import one file of a checkout under a private module name (no package import)."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def commit(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
