"""The deletion forward process of DID (spec DID.md §2).

x0 = BOS a_1..a_m. Each non-BOS token survives to time t independently with probability
alpha_t (BOS is never deleted; it is not part of the bodies handled here), giving
xt = BOS b_1..b_n with

    q_t(xt | x0) = N(xt, x0) alpha_t^n (1 - alpha_t)^(m - n),

N(xt, x0) = the number of index sets of a at which b occurs (``tdlm.did.dp``).
"""
from __future__ import annotations

import torch

from .dp import log_count


def delete(x0: torch.Tensor, m: torch.Tensor, alpha: torch.Tensor,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Delete tokens of the right-padded bodies ``x0`` [B, M] (lengths ``m``; no BOS), each kept
    independently with probability ``alpha[b]``. Returns xt [B, max n] (kept tokens moved to
    the left in order, right-padded with 0), n [B] and the keep mask [B, M]."""
    B, M = x0.shape
    dev = x0.device
    u = torch.rand((B, M), generator=generator, device=dev)
    valid = torch.arange(M, device=dev)[None, :] < m.to(dev)[:, None]
    keep = valid & (u < alpha.to(device=dev, dtype=u.dtype)[:, None])
    n = keep.sum(1)
    xt = torch.zeros((B, int(n.max()) if B else 0), dtype=x0.dtype, device=dev)
    rows, cols = keep.nonzero(as_tuple=True)                     # row-major: in order
    xt[rows, keep.cumsum(1)[rows, cols] - 1] = x0[rows, cols]
    return xt, n, keep


def log_marginal(xt: torch.Tensor, n: torch.Tensor, x0: torch.Tensor, m: torch.Tensor,
                 alpha: torch.Tensor) -> torch.Tensor:
    """log q_t(xt | x0) = log N(xt, x0) + n log alpha + (m - n) log(1 - alpha), float64 [B]."""
    a = alpha.double().to(x0.device)
    n, m = n.to(x0.device), m.to(x0.device)
    nd, md = n.double(), m.double()
    return log_count(x0, m, xt, n) + torch.xlogy(nd, a) + torch.xlogy(md - nd, 1 - a)
