# FROZEN COPY of src/tdlm/nn/dit.py at commit 37baf4c (before the single-Layout code path),
# used only by tests/nn/test_dit_layout.py as the bit-exact reference for dense and packed
# inputs. Do not edit: it is the "before" of a refactoring, not library code.
"""The DiT backbone of MDLM (Sahoo et al. 2024), free of any diffusion logic.

``DiT(tokens, sigma) -> (hidden, c)``: token embedding, rotary positions, ``n_layers`` blocks
with adaLN-zero modulation by the time embedding ``c = TimestepEmbedder(sigma)``, PyTorch SDPA
attention (bidirectional, or causal for the AR family). Heads (``tdlm.nn.heads``) turn
``hidden`` into predictions; the final adaLN layer lives in the head so that the head's
parameter count matches the papers' convention (the output linear).

Packed ragged batches (DID; ``forward(tokens [T], sigma [B], cu_seqlens=[B+1])``): the B
sequences are concatenated without padding; linear layers and the MLP run on the T real
tokens only, rotary positions restart at 0 in every sequence, adaLN modulation is per
sequence, and attention never crosses sequences (``packed_attention``: flash varlen on CUDA
when available, otherwise SDPA on a [B, max_len] scatter with a key-padding mask).

Parameter layout follows MDLM's ``DIT`` exactly, so ``mdlm-small`` (d=768, 12 blocks, 12 heads,
cond 128, vocab 50257+1) has 169,627,218 parameters, of which the output linear is 22.8%.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tdlm.config import ModelConfig


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias (MDLM), computed in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), (self.dim,))
        return (y * self.weight.float()).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sequence ``shift, scale`` of shape [B, 1, d]."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level sigma (256 frequencies) -> MLP -> cond_dim."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
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


class Packing:
    """Index bookkeeping of a packed ragged batch: ``cu_seqlens`` [B+1] offsets into the
    T concatenated tokens; ``seq_id`` [T] the sequence of each token; ``pos`` [T] its
    position inside its sequence; ``pad_index`` [T] its slot in a [B, max_len] layout."""

    def __init__(self, cu_seqlens: torch.Tensor):
        cu = cu_seqlens.long()
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0:
            raise ValueError("cu_seqlens must be a 1-D tensor [B+1] starting at 0")
        self.cu_seqlens = cu
        self.lengths = cu[1:] - cu[:-1]
        if bool((self.lengths <= 0).any()):
            raise ValueError("every packed sequence must have at least one token")
        self.B = int(self.lengths.numel())
        self.T = int(cu[-1])
        self.max_len = int(self.lengths.max())
        self.seq_id = torch.repeat_interleave(torch.arange(self.B, device=cu.device),
                                              self.lengths, output_size=self.T)
        self.pos = torch.arange(self.T, device=cu.device) - cu[:-1][self.seq_id]
        self.pad_index = self.seq_id * self.max_len + self.pos
        self._key_mask = None

    def key_mask(self) -> torch.Tensor:
        """[B, 1, 1, max_len] bool: True where the key slot holds a real token."""
        if self._key_mask is None:
            ar = torch.arange(self.max_len, device=self.cu_seqlens.device)
            self._key_mask = (ar[None, :] < self.lengths[:, None])[:, None, None, :]
        return self._key_mask


def _varlen_attn_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:          # pragma: no cover - depends on the torch build
        return None
    return varlen_attn


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     packing: Packing) -> torch.Tensor:
    """Bidirectional attention within each packed sequence. q, k, v: [T, H, hd] -> [T, H, hd].

    CUDA with half precision: ``torch.nn.attention.varlen.varlen_attn`` (flash, no padding).
    Otherwise: scatter into [B, H, max_len, hd], SDPA with a key-padding mask, gather back
    (padding only inside attention; with length-bucketed batches max_len is close to every
    length)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        fn = _varlen_attn_fn()
        if fn is not None:
            cu = packing.cu_seqlens.to(torch.int32)
            return fn(q, k, v, cu, cu, packing.max_len, packing.max_len)   # window (-1,-1): full
    T, H, hd = q.shape
    B, Lm = packing.B, packing.max_len

    def pad(x):
        out = x.new_zeros(B * Lm, H, hd)
        out[packing.pad_index] = x
        return out.view(B, Lm, H, hd).transpose(1, 2)             # [B, H, Lm, hd]

    a = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=packing.key_mask())
    return a.transpose(1, 2).reshape(B * Lm, H, hd)[packing.pad_index]


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero: shift/scale/gate for attention and MLP
    come from ``Linear(cond_dim, 6d)(c)``, initialised to zero so each block starts as identity."""

    def __init__(self, d: int, n_heads: int, cond_dim: int, mlp_ratio: int, dropout: float,
                 causal: bool):
        super().__init__()
        self.n_heads, self.causal, self.dropout = n_heads, causal, dropout
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
                attn_mask: Optional[torch.Tensor], packing: Optional[Packing] = None
                ) -> torch.Tensor:
        if packing is not None:
            return self._forward_packed(x, c, rope, packing)
        B, L, d = x.shape
        mod = self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        qkv = self.attn_qkv(h).view(B, L, 3, self.n_heads, d // self.n_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)                              # [3, B, H, L, hd]
        q, k = apply_rotary(qkv[:2], *rope).unbind(0)                 # q and k in one pass
        v = qkv[2]
        drop = self.dropout if self.training else 0.0
        # No attention-probability dropout (MDLM applies dropout to the residual branches only).
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=self.causal and attn_mask is None)
        a = a.transpose(1, 2).reshape(B, L, d)
        x = x + gate_msa * F.dropout(self.attn_out(a), drop, self.training)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * F.dropout(self.mlp(h), drop, self.training)

    def _forward_packed(self, x: torch.Tensor, c: torch.Tensor,
                        rope: tuple[torch.Tensor, torch.Tensor], packing: Packing) -> torch.Tensor:
        """x: [T, d] packed tokens; c: [B, cond] per sequence; rope: per-token (cos, sin)."""
        T, d = x.shape
        mod = self.adaLN_modulation(c)[packing.seq_id].chunk(6, dim=-1)   # each [T, d]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        qkv = self.attn_qkv(h).view(T, 3, self.n_heads, d // self.n_heads)
        qkv = qkv.permute(1, 0, 2, 3)                                  # [3, T, H, hd]
        cos, sin = rope
        q, k = apply_rotary(qkv[:2], cos[:, None, :], sin[:, None, :]).unbind(0)
        a = packed_attention(q, k, qkv[2], packing).reshape(T, d)
        drop = self.dropout if self.training else 0.0
        x = x + gate_msa * F.dropout(self.attn_out(a), drop, self.training)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * F.dropout(self.mlp(h), drop, self.training)


class DiT(nn.Module):
    """Backbone: ``forward(tokens [B, L], sigma [B] | None, attn_mask) -> (hidden [B, L, d], c [B, cond])``.

    ``n_embed`` is the number of input embedding rows (vocabulary + [MASK] for MDLM; all tree
    nodes for TDLM). ``causal``: left-to-right attention (the family that builds the model
    says so; the model knows no family). With ``time_conditioning=False`` sigma is replaced by
    zeros (MDLM OWT).
    """

    def __init__(self, cfg: ModelConfig, n_embed: int, causal: bool = False):
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        d = cfg.d_model
        self.vocab_embed = nn.Embedding(n_embed, d)
        nn.init.kaiming_uniform_(self.vocab_embed.weight, a=math.sqrt(5))
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary = Rotary(d // cfg.n_heads)
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg.n_heads, cfg.cond_dim, cfg.mlp_ratio, cfg.dropout, causal)
            for _ in range(cfg.n_layers))

    def forward(self, tokens: torch.Tensor, sigma: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None,
                packing: Optional[Packing] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense: tokens [B, L] -> hidden [B, L, d]. Packed (``packing`` given): tokens [T]
        -> hidden [T, d]; sigma is per sequence [B]. Returns ``(hidden, c [B, cond])``."""
        if packing is not None:
            return self._forward_packed(tokens, sigma, packing)
        B, L = tokens.shape
        if sigma is None or not self.cfg.time_conditioning:
            sigma = torch.zeros(B, device=tokens.device)
        c = F.silu(self.sigma_map(sigma))
        x = self.vocab_embed(tokens)
        rope = self.rotary(torch.arange(L, device=tokens.device))
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, c, rope, attn_mask, use_reentrant=False)
            else:
                x = block(x, c, rope, attn_mask)
        return x, c

    def _forward_packed(self, tokens: torch.Tensor, sigma: Optional[torch.Tensor],
                        packing: Packing) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.dim() != 1 or tokens.numel() != packing.T:
            raise ValueError(f"packed tokens must be 1-D with {packing.T} entries, "
                             f"got shape {tuple(tokens.shape)}")
        if sigma is None or not self.cfg.time_conditioning:
            sigma = torch.zeros(packing.B, device=tokens.device)
        c = F.silu(self.sigma_map(sigma))
        x = self.vocab_embed(tokens)
        rope = self.rotary(packing.pos)                       # positions restart per sequence
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, c, rope, None, packing, use_reentrant=False)
            else:
                x = block(x, c, rope, None, packing)
        return x, c


class FinalLayer(nn.Module):
    """adaLN final norm + zero-initialised ``Linear(d, out_dim)`` (MDLM's ``DDitFinalLayer``)."""

    def __init__(self, d: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(d)
        self.linear = nn.Linear(d, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * d)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def features(self, x: torch.Tensor, c: torch.Tensor,
                 packing: Optional[Packing] = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c)
        mod = mod[packing.seq_id] if packing is not None else mod[:, None, :]
        shift, scale = mod.chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                packing: Optional[Packing] = None) -> torch.Tensor:
        return self.linear(self.features(x, c, packing))


def count_parameters(model: nn.Module) -> dict:
    """Total, embedding (input table), head (output linear(s)) and transformer-block counts."""
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if "vocab_embed" in n)
    head = sum(p.numel() for n, p in model.named_parameters()
               if n.startswith("head.") and ".linear" in n)
    blocks = sum(p.numel() for n, p in model.named_parameters() if ".blocks." in n or n.startswith("blocks."))
    return {"total": total, "embedding": emb, "head": head, "blocks": blocks,
            "other": total - emb - head - blocks, "head_share": head / total}
