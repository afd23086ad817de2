"""The deletion forward process of DID (spec DID.md §2).

x0 = BOS a_1..a_m; each non-BOS token survives to time t independently with probability
alpha_t (BOS is never deleted and is handled by the caller), giving xt = BOS b_1..b_n with
    q_t(xt | x0) = N(xt, x0) alpha_t^n (1 - alpha_t)^(m - n).
"""
from __future__ import annotations

import torch

from .dp import log_prefix_counts


def delete(x0: torch.Tensor, m: torch.Tensor, alpha: torch.Tensor,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Delete tokens of the right-padded bodies ``x0`` [B, M] (lengths ``m``), each kept with
    probability ``alpha[b]``. Returns (xt [B, max n] right-padded with 0, n [B], keep [B, M])."""
    B, M = x0.shape
    dev = x0.device
    u = torch.rand((B, M), generator=generator, device=dev)
    valid = torch.arange(M, device=dev)[None, :] < m[:, None]
    keep = valid & (u < alpha.to(u.dtype)[:, None])
    n = keep.sum(1)
    Nn = int(n.max()) if B else 0
    xt = torch.zeros((B, Nn), dtype=x0.dtype, device=dev)
    if Nn:
        dest = keep.long().cumsum(1) - 1                         # target column of kept tokens
        rows = torch.arange(B, device=dev)[:, None].expand(B, M)
        xt[rows[keep], dest[keep]] = x0[keep]
    return xt, n, keep


def log_marginal(xt: torch.Tensor, n: torch.Tensor, x0: torch.Tensor, m: torch.Tensor,
                 alpha: torch.Tensor) -> torch.Tensor:
    """log q_t(xt | x0) = log N(xt, x0) + n log alpha + (m - n) log(1 - alpha), float64."""
    logP = log_prefix_counts(x0, m, xt, n, torch.float64)
    B = x0.shape[0]
    logN = logP[torch.arange(B, device=x0.device), m.long(), n.long()]
    a = alpha.double()
    n, m = n.double(), m.double()
    return (logN + torch.xlogy(n, a) + torch.xlogy(m - n, 1 - a))
