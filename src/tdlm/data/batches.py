"""Batch helpers that work for both batch kinds the data layer produces.

* **dense** (layouts ``packed``, ``packed_bos``, ``crop_pad``): ``{"input_ids": LongTensor[B, L],
  "valid": BoolTensor[B, L]}``; every tensor has the rows as its first dimension.
* **ragged** (layout ``varlen``): ``{"input_ids": LongTensor[T], "cu_seqlens": LongTensor[B+1],
  "valid": BoolTensor[T]}``: the B sequences concatenated without padding; sequence b is
  ``input_ids[cu_seqlens[b]:cu_seqlens[b+1]]`` and ``cu_seqlens[0] == 0``. Other tensors
  are per token (first dimension T) or per row (first dimension B); when T == B every row
  has one token and both readings slice alike.

``split_micro`` cuts a batch into micro-batches for gradient accumulation: by rows, and for
ragged batches optionally by a token budget as well.
"""
from __future__ import annotations

from typing import Any

import torch

Batch = dict[str, Any]


def is_ragged(batch: Batch) -> bool:
    """True for a ragged (``cu_seqlens``) batch."""
    return "cu_seqlens" in batch


def num_rows(batch: Batch) -> int:
    """Number of sequences B."""
    if is_ragged(batch):
        return int(batch["cu_seqlens"].shape[0]) - 1
    return int(batch["input_ids"].shape[0])


def num_tokens(batch: Batch) -> int:
    """Number of real (valid) tokens; padding is not counted."""
    valid = batch.get("valid")
    if valid is not None:
        return int(valid.sum().item())
    return int(batch["input_ids"].numel())


def row_lengths(batch: Batch) -> torch.Tensor:
    """LongTensor[B] of the real tokens per row."""
    if is_ragged(batch):
        return batch["cu_seqlens"].diff()
    valid = batch.get("valid")
    if valid is not None:
        return valid.sum(1)
    ids = batch["input_ids"]
    return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)


def slice_rows(batch: Batch, lo: int, hi: int) -> Batch:
    """Rows ``lo:hi`` (clipped to [0, B], like Python slicing of non-negative bounds). For a
    ragged batch the per-token tensors are cut at ``cu_seqlens[lo]:cu_seqlens[hi]`` and
    ``cu_seqlens`` is re-based to start at 0. Non-tensor values are passed through."""
    B = num_rows(batch)
    lo, hi = max(0, min(int(lo), B)), max(0, min(int(hi), B))
    hi = max(hi, lo)
    if not is_ragged(batch):
        return {k: (v[lo:hi] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    cu = batch["cu_seqlens"]
    T = int(cu[-1])
    a, b = int(cu[lo]), int(cu[hi])
    out: Batch = {}
    for k, v in batch.items():
        if k == "cu_seqlens":
            out[k] = cu[lo:hi + 1] - a
        elif not isinstance(v, torch.Tensor) or v.dim() == 0:
            out[k] = v
        elif v.shape[0] == T:
            out[k] = v[a:b]
        elif v.shape[0] == B:
            out[k] = v[lo:hi]
        else:
            raise ValueError(f"ragged batch entry {k!r} has first dimension {v.shape[0]}, "
                             f"neither the {T} tokens nor the {B} rows")
    return out


def to_device(batch: Batch, device, non_blocking: bool = False) -> Batch:
    """Every tensor moved to ``device``."""
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def micro_bounds(lengths, micro: int, max_tokens: int = 0) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of consecutive greedy groups: at most ``micro`` rows each (0: no
    row cap) and, when ``max_tokens > 0``, at most ``max_tokens`` tokens each; a row longer
    than the budget forms a group of its own."""
    lengths = [int(x) for x in lengths]
    B = len(lengths)
    micro = int(micro) if micro and micro > 0 else max(B, 1)
    if max_tokens <= 0:
        return [(i, min(i + micro, B)) for i in range(0, B, micro)]
    out, lo, tok = [], 0, 0
    for i, n in enumerate(lengths):
        if i > lo and (i - lo >= micro or tok + n > max_tokens):
            out.append((lo, i))
            lo, tok = i, 0
        tok += n
    if lo < B:
        out.append((lo, B))
    return out


def split_micro(batch: Batch, micro: int, max_tokens: int = 0) -> list[Batch]:
    """Micro-batches of consecutive rows. Dense batches: ``micro`` rows each (the last may
    be shorter; ``max_tokens`` is not used). Ragged batches: greedy groups of at most
    ``micro`` rows and, with ``max_tokens > 0``, at most ``max_tokens`` tokens (at least one
    row each). ``micro <= 0`` means no row cap."""
    if not is_ragged(batch):
        return [slice_rows(batch, lo, hi) for lo, hi in micro_bounds([0] * num_rows(batch), micro)]
    lengths = batch["cu_seqlens"].diff().tolist()
    return [slice_rows(batch, lo, hi) for lo, hi in micro_bounds(lengths, micro, max_tokens)]


def collate_ragged(rows) -> Batch:
    """A ragged batch from per-item ``(ids LongTensor[n_b], valid BoolTensor[n_b])`` pairs:
    the items concatenated, ``cu_seqlens`` their cumulative lengths (starting at 0)."""
    ids = [torch.as_tensor(r[0], dtype=torch.long).reshape(-1) for r in rows]
    valid = [torch.as_tensor(r[1], dtype=torch.bool).reshape(-1) for r in rows]
    lens = torch.tensor([0] + [x.numel() for x in ids], dtype=torch.long)
    return {"input_ids": torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long),
            "cu_seqlens": lens.cumsum(0),
            "valid": torch.cat(valid) if valid else torch.zeros(0, dtype=torch.bool)}
