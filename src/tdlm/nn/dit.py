"""The DiT backbone of MDLM (Sahoo et al. 2024), free of any diffusion logic.

``DiT(tokens, sigma) -> (hidden, c)``: token embedding, rotary positions, ``n_layers`` blocks
with adaLN-zero modulation by the time embedding ``c = TimestepEmbedder(sigma)``, PyTorch SDPA
attention (bidirectional, or causal for the AR family). Heads (``tdlm.nn.heads``) turn
``hidden`` into predictions; the final adaLN layer lives in the head so that the head's
parameter count matches the papers' convention (the output linear).

One code path serves every batch: the batch's :class:`~tdlm.nn.layout.Layout` says where the
tokens sit. Dense batches (``forward(tokens [B, L], sigma [B])``) get a ``DenseLayout`` built
here (causal when the backbone is). Packed ragged batches (DID; ``forward(tokens [T], sigma [B],
packing=PackedLayout(cu_seqlens))``, ``Packing`` being the same class): the B sequences are
concatenated without padding; linear layers and the MLP run on the T real tokens only, rotary
positions restart at 0 in every sequence, adaLN modulation is per sequence, and attention never
crosses sequences.

Shared conditioning: without a time input (``time_conditioning=False`` or sigma None), or with
one sigma for every sequence (``sigma`` of shape [1], e.g. a sampler's step), ``c`` is one row
[1, cond] and every layout broadcasts it as a view: a packed batch then never gathers the
[T, 6d] modulation of each block row by row (a tenth of DID's sampling time at d=112).

The model knows nothing of training: activation checkpointing, compile and DDP/FSDP are
applied from outside (``tdlm.train.parallel.parallelize``).

Parameter layout follows MDLM's ``DIT`` exactly, so ``mdlm-small`` (d=768, 12 blocks, 12 heads,
cond 128, vocab 50257+1) has 169,627,218 parameters, of which the output linear is 22.8%.
The model reports its parameter groups and FLOPs itself (``tdlm.nn.accounting``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import BackboneConfig
from .accounting import SeqStats, count_parameters  # noqa: F401  (re-exported)
from .heads import FinalLayer  # noqa: F401  (re-exported: tdlm.nn.dit.FinalLayer)
from .layers import LayerNorm, modulate  # noqa: F401  (re-exported)
from .layout import DenseLayout, Layout, PackedLayout, packed_attention  # noqa: F401

Packing = PackedLayout      # the name families use for a packed ragged batch


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level sigma (256 frequencies) -> MLP -> cond_dim."""

    FREQ_DIM = 256

    def __init__(self, cond_dim: int, freq_dim: int = FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) *
                          torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    """Rotary position embedding (base 10000) on the head dimension; positions 0..L-1.
    Returns ``(cos, sin)`` of shape [L, hd], each half repeated (the "rotate half" layout)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None]       # [L, hd/2]
        freqs = torch.cat([freqs, freqs], dim=-1)                       # [L, hd]
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., L, hd]; rotates the pairs (x_j, x_{j+hd/2}) by position-dependent angles:
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = (-x2, x1)``."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


def _rotate_into(out: torch.Tensor, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> None:
    """``out = (x1 c - x2 s, x2 c + x1 s)`` for the halves x1, x2 of the last dimension and the
    half tables c, s: the rotary rotation by +angle (s = sin) or -angle (s = -sin, backward),
    written in place, two multiply-adds per half, no temporaries of x's size."""
    h = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=-1.0)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s)


class _RotaryQK(torch.autograd.Function):
    """Rotary on q and k of a fused ``qkv`` [3, ...heads layout..., hd] (the layout's
    ``split_heads``): returns ``(rot(q), rot(k), v)``.

    Same values as :func:`apply_rotary` on ``qkv[:2]`` (each pair (x_j, x_{j+hd/2}) is a complex
    number multiplied by e^{i theta}); the backward is the rotation by -theta
    (``R(theta)^T = R(-theta)``), written with v's gradient straight into one gradient buffer
    laid out like ``qkv``, so that autograd neither zero-fills nor adds slice gradients, nor
    copies the buffer back into the projection's layout (tests/nn/test_rotary.py checks values
    and gradients against the plain formula)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        h = cos.shape[-1] // 2
        c, s = cos[..., :h].to(qkv.dtype), sin[..., :h].to(qkv.dtype)
        ctx.save_for_backward(c, s)
        ctx.layout = (qkv.shape, qkv.stride())
        qk = torch.empty_like(qkv[:2])
        _rotate_into(qk, qkv[:2], c, s)
        q, k = qk.unbind(0)
        return q, k, qkv[2]

    @staticmethod
    def backward(ctx, gq, gk, gv):
        c, s = ctx.saved_tensors
        like = next(g for g in (gq, gk, gv) if g is not None)
        # qkv is a permuted view of the projection's output: a buffer with its strides flows
        # back through split_heads' permute and view without a copy
        grad = torch.empty_strided(*ctx.layout, dtype=like.dtype, device=like.device)
        for i, g in enumerate((gq, gk)):
            if g is None:
                grad[i].zero_()
            else:
                _rotate_into(grad[i], g, c, -s)
        if gv is None:
            grad[2].zero_()
        else:
            grad[2].copy_(gv)
        return grad, None, None


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``(q, k, v)`` of a fused [3, ...] projection with rotary applied to q and k
    (:class:`_RotaryQK`); ``cos``/``sin`` as :class:`Rotary` returns them (halves equal),
    broadcastable against q. In float32 and float64 the math runs in the input's dtype; half
    precision inputs rotate in float32 (as :func:`apply_rotary`)."""
    if qkv.dtype in (torch.float16, torch.bfloat16):
        q, k = apply_rotary(qkv[:2], cos, sin).unbind(0)
        return q, k, qkv[2]
    return _RotaryQK.apply(qkv, cos, sin)


def block_token_params(d: int, mlp_ratio: int) -> int:
    """Weights + biases of one block's token-wise linear layers (qkv, out, MLP)."""
    return 3 * d * d + d * d + 2 * mlp_ratio * d * d + mlp_ratio * d + d


def dit_flops(cfg: BackboneConfig, n_embed: int, s: SeqStats) -> dict:
    """Forward FLOPs of a :class:`DiT` (``tdlm.flops`` states the convention): ``blocks``,
    ``embedding`` (the input table as a one-hot matmul) and ``other`` (time embedding)."""
    d, n, r, c = cfg.d_model, cfg.n_layers, cfg.mlp_ratio, cfg.cond_dim
    f = TimestepEmbedder.FREQ_DIM
    per_block = (2 * block_token_params(d, r) * s.tokens + 4 * d * s.sq_tokens
                 + 2 * (6 * d * c + 6 * d) * s.conditioning)
    return {"blocks": n * per_block, "embedding": 2 * n_embed * d * s.tokens,
            "other": 2 * (f * c + c + c * c + c) * s.conditioning}


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero: shift/scale/gate for attention and MLP
    come from ``Linear(cond_dim, 6d)(c)``, initialised to zero so each block starts as identity.
    ``forward(x, c, rope, layout)``: ``x`` token features in the layout's shape ([B, L, d] or
    [T, d]), ``c`` [B, cond] per sequence, ``rope`` the layout's rotary tables."""

    def __init__(self, d: int, n_heads: int, cond_dim: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * d, d))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * d)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                layout: Layout) -> torch.Tensor:
        mod = layout.broadcast(self.adaLN_modulation(c)).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        qkv = layout.split_heads(self.attn_qkv(h), self.n_heads)     # [3, *heads layout]
        q, k, v = rotary_qkv(qkv, *rope)                              # q and k in one pass
        a = layout.attention(q, k, v)
        drop = self.dropout if self.training else 0.0
        # gated residuals as one fused multiply-add: x + gate * branch
        x = torch.addcmul(x, gate_msa, F.dropout(self.attn_out(a), drop, self.training))
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return torch.addcmul(x, gate_mlp, F.dropout(self.mlp(h), drop, self.training))


class DiT(nn.Module):
    """Backbone: ``forward(tokens, sigma | None) -> (hidden, c [B, cond])``.

    ``n_embed`` is the number of input embedding rows (vocabulary + [MASK] for MDLM; all tree
    nodes for TDLM). ``causal``: left-to-right attention (the family that builds the model
    says so; the model knows no family). With ``time_conditioning=False`` sigma is replaced by
    zeros (MDLM OWT).
    """

    def __init__(self, cfg: BackboneConfig, n_embed: int, causal: bool = False):
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        d = cfg.d_model
        self.vocab_embed = nn.Embedding(n_embed, d)
        nn.init.kaiming_uniform_(self.vocab_embed.weight, a=math.sqrt(5))
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary = Rotary(d // cfg.n_heads)
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg.n_heads, cfg.cond_dim, cfg.mlp_ratio, cfg.dropout)
            for _ in range(cfg.n_layers))

    def layout(self, tokens: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> Layout:
        """The dense layout of a [B, L] token batch for this backbone (causal or not)."""
        return DenseLayout.of(tokens, causal=self.causal, attn_mask=attn_mask)

    def forward(self, tokens: torch.Tensor, sigma: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, packing: Optional[Layout] = None,
                layout: Optional[Layout] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense: tokens [B, L] -> hidden [B, L, d] (``attn_mask``: an SDPA mask). Packed
        (``packing`` or ``layout`` a ``PackedLayout``): tokens [T] -> hidden [T, d]; sigma is
        per sequence [B], or [1] shared by all. Returns ``(hidden, c [B or 1, cond])``: one
        row when the conditioning is shared (module docstring)."""
        if layout is None:
            layout = packing if packing is not None else self.layout(tokens, attn_mask)
        layout.check(tokens)
        if self.causal and not layout.causal:
            raise ValueError("a causal backbone needs a causal layout (a PackedLayout "
                             "built with causal=True)")
        if sigma is None or not self.cfg.time_conditioning:
            sigma = torch.zeros(1, device=tokens.device)          # shared by every sequence
        elif sigma.dim() != 1 or sigma.shape[0] not in (1, layout.num_sequences):
            raise ValueError(f"sigma must have shape [{layout.num_sequences}] or [1], "
                             f"got {tuple(sigma.shape)}")
        c = F.silu(self.sigma_map(sigma))
        x = self.vocab_embed(tokens)
        rope = layout.rope(self.rotary)
        for block in self.blocks:
            x = block(x, c, rope, layout)
        return x, c

    # ---- accounting (tdlm.nn.accounting) -------------------------------------------------
    def param_groups(self) -> dict:
        return {"embedding": list(self.vocab_embed.parameters()),
                "blocks": list(self.blocks.parameters()),
                "other": list(self.sigma_map.parameters())}

    @property
    def shared_conditioning(self) -> bool:
        """True when every forward computes one conditioning row (no time input)."""
        return not self.cfg.time_conditioning

    def shares_conditioning(self, sigma: Optional[torch.Tensor]) -> bool:
        """True when ``forward(tokens, sigma)`` computes one conditioning row for all
        sequences (no time input, sigma None, or one sigma [1]): ``forward``'s own rule."""
        return self.shared_conditioning or sigma is None or sigma.shape[0] == 1

    def flops(self, s: SeqStats, head_out: Optional[int] = None) -> dict:
        return dit_flops(self.cfg, self.vocab_embed.num_embeddings, s)


def backbone_of(model: nn.Module) -> Optional["DiT"]:
    """The model's DiT (the first one among its modules), or None: every family runs it once
    per network forward, whether a caller uses the model's ``forward`` or its ``features`` and
    output layer apart (the samplers), so hooks that count or time forwards sit on it."""
    return next((m for m in model.modules() if isinstance(m, DiT)), None)
