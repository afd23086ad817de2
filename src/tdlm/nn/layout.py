"""Where the tokens of a batch sit: the one thing the DiT's code path depends on.

A ``Layout`` tells the backbone (``tdlm.nn.dit``) and the heads (``tdlm.nn.heads``) how to
treat a batch of token features ``x``, so that one ``DiTBlock.forward`` serves every batch:

* :class:`DenseLayout` -- B sequences of equal length L, ``x`` is [B, L, d]; rotary
  positions 0..L-1; attention is PyTorch SDPA over [B, H, L, hd] (bidirectional, causal for
  the AR family, or with an explicit ``attn_mask``).
* :class:`PackedLayout` (also exported as ``Packing``) -- B ragged sequences concatenated
  without padding, ``x`` is [T, d] with ``cu_seqlens`` [B+1] offsets; rotary positions
  restart at 0 in every sequence; attention never crosses sequences (flash varlen on CUDA in
  half precision, else SDPA per sequence on views: no padding anywhere).

What a layout provides (and all the model needs to know about it):

* ``num_sequences`` (B: one time input and one conditioning vector per sequence) and
  ``positions`` (the rotary positions of the tokens), ``rope(rotary)`` the rotary tables
  shaped for the heads;
* ``broadcast(v)``: per-sequence values [B, k] (adaLN modulation) -> per token;
* ``split_heads(qkv, n_heads)``: the fused q/k/v projection -> [3, ...] in the attention
  layout; ``attention(q, k, v)`` -> [..., d] back in the token layout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class Layout:
    """Interface of a batch layout (module docstring)."""

    causal: bool = False

    @property
    def num_sequences(self) -> int:
        raise NotImplementedError

    @property
    def positions(self) -> torch.Tensor:
        raise NotImplementedError

    def check(self, tokens: torch.Tensor) -> None:
        """Raise ValueError unless ``tokens`` has this layout's shape."""
        raise NotImplementedError

    def rope(self, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of ``rotary(positions)``, shaped to broadcast against q and k."""
        raise NotImplementedError

    def broadcast(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """Per-sequence values [B, k] (or [1, k], shared by every sequence) shaped to
        broadcast against the hidden states; a shared row stays a view."""
        raise NotImplementedError

    def split_heads(self, qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
        raise NotImplementedError

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DenseLayout(Layout):
    """B sequences of length L (``x`` [B, L, d]). ``causal``: left-to-right attention;
    ``attn_mask``: an SDPA mask (bool, True = attend, or additive float), which replaces the
    causal rule when given."""

    def __init__(self, batch: int, length: int, device=None, causal: bool = False,
                 attn_mask: Optional[torch.Tensor] = None):
        self.batch, self.length = int(batch), int(length)
        self.causal, self.attn_mask = causal, attn_mask
        self._positions = torch.arange(self.length, device=device)

    @classmethod
    def of(cls, tokens: torch.Tensor, causal: bool = False,
           attn_mask: Optional[torch.Tensor] = None) -> "DenseLayout":
        """The layout of a [B, L] token batch."""
        if tokens.dim() != 2:
            raise ValueError(f"dense tokens must be 2-D [B, L], got shape {tuple(tokens.shape)}")
        B, L = tokens.shape
        return cls(B, L, tokens.device, causal, attn_mask)

    @property
    def num_sequences(self) -> int:
        return self.batch

    @property
    def positions(self) -> torch.Tensor:
        return self._positions

    def check(self, tokens: torch.Tensor) -> None:
        if tuple(tokens.shape) != (self.batch, self.length):
            raise ValueError(f"dense tokens must have shape ({self.batch}, {self.length}), "
                             f"got {tuple(tokens.shape)}")

    def rope(self, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(self._positions)                              # [L, hd] each

    def broadcast(self, per_sequence: torch.Tensor) -> torch.Tensor:
        return per_sequence[:, None, :]                              # [B, 1, k]

    def split_heads(self, qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
        B, L, three_d = qkv.shape
        qkv = qkv.view(B, L, 3, n_heads, three_d // (3 * n_heads))
        return qkv.permute(2, 0, 3, 1, 4)                            # [3, B, H, L, hd]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # No attention-probability dropout (MDLM applies dropout to the residual branches only).
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask,
                                           is_causal=self.causal and self.attn_mask is None)
        B, H, L, hd = a.shape
        return a.transpose(1, 2).reshape(B, L, H * hd)


class PackedLayout(Layout):
    """Index bookkeeping of a packed ragged batch: ``cu_seqlens`` [B+1] offsets into the
    T concatenated tokens; ``seq_id`` [T] the sequence of each token; ``pos`` [T] its
    position inside its sequence; ``pad_index`` [T] its slot in a [B, max_len] layout.
    Attention stays within each sequence: bidirectional, or left-to-right with ``causal``
    (the AR family on ragged batches)."""

    def __init__(self, cu_seqlens: torch.Tensor, causal: bool = False):
        self.causal = causal
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
        self.lengths_list = self.lengths.tolist()                    # one host sync, here
        self._key_mask = None

    def key_mask(self) -> torch.Tensor:
        """[B, 1, 1, max_len] bool: True where the key slot holds a real token; causal:
        [B, 1, max_len, max_len], also only keys at or before the query."""
        if self._key_mask is None:
            ar = torch.arange(self.max_len, device=self.cu_seqlens.device)
            self._key_mask = (ar[None, :] < self.lengths[:, None])[:, None, None, :]
            if self.causal:
                self._key_mask = self._key_mask & (ar[None, :] <= ar[:, None])[None, None]
        return self._key_mask

    @property
    def num_sequences(self) -> int:
        return self.B

    @property
    def positions(self) -> torch.Tensor:
        return self.pos                                              # restart per sequence

    def check(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 1 or tokens.numel() != self.T:
            raise ValueError(f"packed tokens must be 1-D with {self.T} entries, "
                             f"got shape {tuple(tokens.shape)}")

    def rope(self, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary(self.pos)                                  # [T, hd]
        return cos[:, None, :], sin[:, None, :]                      # [T, 1, hd]

    def broadcast(self, per_sequence: torch.Tensor) -> torch.Tensor:
        if per_sequence.shape[0] == 1:                               # shared: a view
            return per_sequence.expand(self.T, -1)                   # [T, k]
        return per_sequence[self.seq_id]                             # [T, k]

    def split_heads(self, qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
        T, three_d = qkv.shape
        qkv = qkv.view(T, 3, n_heads, three_d // (3 * n_heads))
        return qkv.permute(1, 0, 2, 3)                               # [3, T, H, hd]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T, H, hd = q.shape
        return packed_attention(q, k, v, self).reshape(T, H * hd)


def _varlen_attn_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:          # pragma: no cover - depends on the torch build
        return None
    return varlen_attn


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     packing: PackedLayout) -> torch.Tensor:
    """Attention within each packed sequence (bidirectional, or causal when the layout is).
    q, k, v: [T, H, hd] -> [T, H, hd].

    CUDA with half precision: ``torch.nn.attention.varlen.varlen_attn`` (flash, no padding).
    Otherwise no padding either: sequences of equal length are one batched SDPA call on a
    [B, H, L, hd] view; ragged ones get one SDPA call per sequence on views of q, k, v (a loop
    over the B sequences, not over tokens), so attention costs sum_b L_b^2 rather than
    B max_b L_b^2 (a third of it for uniformly spread lengths: DID's deletions). The former
    CPU path, a [B, max_len] scatter with a key-padding mask (``key_mask``), paid for the
    padding and took 2x as long at DID's lengths (benchmarks/results/did_race.md)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        fn = _varlen_attn_fn()
        if fn is not None:
            cu = packing.cu_seqlens.to(torch.int32)
            window = (-1, 0) if packing.causal else (-1, -1)            # causal / full
            return fn(q, k, v, cu, cu, packing.max_len, packing.max_len, window_size=window)
    T, H, hd = q.shape
    lens = packing.lengths_list
    if min(lens) == packing.max_len:                              # all the same length
        B, L = packing.B, packing.max_len

        def heads(x):
            return x.view(B, L, H, hd).transpose(1, 2)              # [B, H, L, hd]
        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=packing.causal)
        return a.transpose(1, 2).reshape(T, H, hd)
    outs = []
    for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens)):
        a = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                           vs.transpose(0, 1)[None], is_causal=packing.causal)
        outs.append(a[0].transpose(0, 1))                           # [L_b, H, hd]
    return torch.cat(outs)
