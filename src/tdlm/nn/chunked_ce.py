"""Cross-entropy of a linear output layer without its full logits (a fused linear
cross-entropy, in plain PyTorch).

``linear_cross_entropy(h, weight, bias, target, chunk)`` equals
``F.cross_entropy(F.linear(h, weight, bias).float(), target, reduction="none")`` row by row
(``h`` [M, d], ``weight`` [C, d], ``bias`` [C] or None, ``target`` [M]), but walks over the M
rows ``chunk`` at a time: the forward keeps only each row's log-sum-exp (fp32, [M]); the
backward recomputes a chunk's logits, turns them into ``softmax - onehot(target)`` scaled by
the incoming gradient, and accumulates the gradients of ``h``, ``weight`` and ``bias``. The
largest tensors alive are a few [chunk, C] ones instead of several [M, C] ones (the logits,
their fp32 copy, the log-probabilities and their gradient).

Precision follows the caller's: under autocast the matrix products run in the autocast dtype
(as ``F.linear`` would, the weight cast once per pass), logits, log-sum-exp and softmax in
fp32; the weight and bias gradients accumulate in fp32. In fp32 (and fp64) the loss and the
gradients equal the unchunked computation up to summation order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev) and h.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _accum_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _chunk_logits(h, w, b, lo, hi, acc):
    return F.linear(h[lo:hi], w, b).to(acc)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk: int, dtype: torch.dtype):
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            bc = bias.to(dtype) if bias is not None else None
            acc = _accum_dtype(h)
            lse = torch.empty(h.shape[0], dtype=acc, device=h.device)
            picked = torch.empty_like(lse)
            for lo in range(0, h.shape[0], chunk):
                hi = min(lo + chunk, h.shape[0])
                logits = _chunk_logits(hc, wc, bc, lo, hi, acc)
                lse[lo:hi] = torch.logsumexp(logits, -1)
                picked[lo:hi] = logits.gather(-1, target[lo:hi, None]).squeeze(-1)
                del logits
        ctx.save_for_backward(h, weight, bias, target, lse)
        ctx.chunk, ctx.dtype, ctx.has_bias = chunk, dtype, bias is not None
        return lse - picked

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, target, lse = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _accum_dtype(h)
        hc, wc = h.to(dtype), weight.to(dtype)
        bc = bias.to(dtype) if bias is not None else None
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=acc, device=h.device) if (need_b and bias is not None) else None
        for lo in range(0, h.shape[0], chunk):
            hi = min(lo + chunk, h.shape[0])
            p = _chunk_logits(hc, wc, bc, lo, hi, acc)
            p.sub_(lse[lo:hi, None]).exp_()                   # softmax
            p[torch.arange(hi - lo, device=p.device), target[lo:hi]] -= 1.0
            p.mul_(grad[lo:hi, None].to(acc))                         # d loss / d logits
            if gb is not None:
                gb += p.sum(0)
            g = p.to(dtype)
            del p
            if gh is not None:
                gh[lo:hi] = (g @ wc).to(h.dtype)
            if gw is not None:
                if g.dtype == acc:
                    gw.addmm_(g.t(), hc[lo:hi])
                else:
                    gw += g.t() @ hc[lo:hi]
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(bias.dtype) if gb is not None else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         target: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-row cross-entropy ``logsumexp(h W^T + b) - (h W^T + b)[target]`` ([M], fp32; fp64
    for fp64 inputs), computed ``chunk`` rows at a time (module docstring)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if h.dim() != 2 or target.shape != h.shape[:1]:
        raise ValueError(f"expected h [M, d] and target [M], got {tuple(h.shape)} and "
                         f"{tuple(target.shape)}")
    return _LinearCrossEntropy.apply(h, weight, bias, target, int(chunk), _compute_dtype(h))
