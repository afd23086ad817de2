"""Exact subsequence counts and insertion targets for DID (spec DID.md §4), vectorised.

Notation (1-indexed, BOS excluded): x0 body a_1..a_m, xt body b_1..b_n (a subsequence of a).
N(b, a) = number of index sets at which b occurs in a.

* prefix  P[i][j] = N(b_1..j, a_1..i):  P[i][0] = 1,  P[0][j>0] = 0,
          P[i][j] = P[i-1][j] + [a_i = b_j] P[i-1][j-1].
* suffix  S[i][j] = N(b_j..n, a_i..m):  S[i][n+1] = 1,  S[m+1][j<=n] = 0,
          S[i][j] = S[i+1][j] + [a_i = b_j] S[i+1][j+1].
* N = P[m][n];  rho[g, v] = (1/N) sum_{i: a_i = v} P[i-1][g] S[i+1][g+1],  g = 0..n,
  the expected number of deleted v's in gap g (right after b_g; g = 0: after BOS) under the
  uniform posterior over alignments. Identity: sum_{g,v} rho[g, v] = m - n.

Implementation. Column form of the prefix recursion:
    P[i][j] = sum_{i' <= i} [a_i' = b_j] P[i'-1][j-1],   i.e.  P[:, j] = cumsum_i(E[:, j] * P[:-1, j-1]),
one ``logcumsumexp`` per column j, vectorised over the batch and over i (n steps in all).
The suffix table is the prefix table of the reversed strings,
    S[i][j] = P_rev[m-i+1][n-j+1],
so both directions run as one stacked batch of 2B rows. Everything is in log space (counts
reach ~1e306 at L = 1024 for repetitive text) in float32 by default. Padded positions of a and
b hold two different sentinels (-1, -2) that never match each other or a token.
The targets are sparse triples (seq, gap, token, rho), duplicates (same token at several i)
summed, no threshold; computed under ``no_grad``.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations

import torch

PAD_A, PAD_B = -1, -2


@dataclass
class InsertionTargets:
    seq: torch.Tensor        # [K] sequence index in the batch
    gap: torch.Tensor        # [K] gap g in 0..n_b
    token: torch.Tensor      # [K] token id v
    rho: torch.Tensor        # [K] expected number of deleted v's in gap g
    log_count: torch.Tensor  # [B] log N(xt, x0)


def _masked(x: torch.Tensor, lengths: torch.Tensor, pad: int) -> torch.Tensor:
    ar = torch.arange(x.shape[1], device=x.device)
    return torch.where(ar[None, :] < lengths[:, None], x, torch.full_like(x, pad))


def _reverse_within(x: torch.Tensor, lengths: torch.Tensor, pad: int) -> torch.Tensor:
    """x[b, :len_b] reversed, padding kept at the end."""
    L = x.shape[1]
    ar = torch.arange(L, device=x.device)
    idx = (lengths[:, None] - 1 - ar[None, :]).clamp(0, max(L - 1, 0))
    out = x.gather(1, idx) if L else x
    return _masked(out, lengths, pad)


def log_prefix_scaled(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor, n: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-scaled log prefix counts: ``log P[b, i, j] = rel[b, i, j] + off[b, j]`` with
    ``rel`` in ``dtype`` (max 0 over i in each column) and the offsets in float64, so the
    large magnitudes (up to ~700) never sit in float32. ``rel`` is returned as a [B, M+1, N+1]
    view of a column-contiguous table (each column is one contiguous ``logcumsumexp``)."""
    a = _masked(a.long(), m, PAD_A)
    b = _masked(b.long(), n, PAD_B)
    B, M = a.shape
    Nn = b.shape[1]
    relT = torch.empty((B, Nn + 1, M + 1), dtype=dtype, device=a.device)
    relT[:, 0, :] = 0.0                                   # P[i][0] = 1
    relT[:, 1:, 0] = float("-inf")                        # P[0][j>0] = 0
    off = torch.zeros((B, Nn + 1), dtype=torch.float64, device=a.device)
    if M == 0 or Nn == 0:
        return relT.transpose(1, 2), off
    mx = torch.empty((Nn, B), dtype=dtype, device=a.device)
    for j in range(1, Nn + 1):
        # P[:, j] = cumsum_i([a_i = b_j] P[i-1, j-1]) in log space
        x = relT[:, j - 1, :-1].masked_fill(a != b[:, j - 1:j], float("-inf"))
        col = torch.logcumsumexp(x, dim=1)
        # the cumulative sum peaks at i = M: shift that maximum to 0 (all -inf: shift 0)
        torch.nan_to_num(col[:, -1], neginf=0.0, out=mx[j - 1])
        torch.sub(col, mx[j - 1][:, None], out=relT[:, j, 1:])
    off[:, 1:] = mx.double().t().cumsum(1)                # log P = rel + off, off in float64
    return relT.transpose(1, 2), off


def log_prefix_counts(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor, n: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log P[b, i, j] = log N(b_1..j, a_1..i) for i = 0..M, j = 0..N: [B, M+1, N+1] in
    ``dtype``. Entries beyond a row's own (m, n) are well defined (sentinels never match)."""
    rel, off = log_prefix_scaled(a, m, b, n, dtype)
    return (rel.double() + off[:, None, :]).to(dtype)


@torch.no_grad()
def insertion_targets(x0: torch.Tensor, m: torch.Tensor, xt: torch.Tensor, n: torch.Tensor,
                      dtype: torch.dtype = torch.float32,
                      accum: torch.dtype | None = None, backend: str = "auto") -> InsertionTargets:
    """Sparse insertion targets of a batch. ``x0`` [B, M], ``xt`` [B, N] right-padded bodies
    (no BOS) with lengths ``m``, ``n`` (xt a subsequence of x0). ``dtype``: the outputs;
    ``accum``: the DP tables (default float64 on CPU, where it costs the same as float32,
    and float32 on accelerators; float32 tables put rho within ~1e-4 relative of float64 at
    L = 1024 in the worst, all-one-token case). ``backend``: "torch" (the vectorised column
    loop, any device), "numba" (compiled CPU kernel, float64, ``dp_numba``) or "auto" (numba
    on CPU when installed, torch otherwise)."""
    dev = x0.device
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be auto, torch or numba, got {backend!r}")
    if backend == "numba" or (backend == "auto" and dev.type == "cpu" and accum is None):
        from . import dp_numba
        if dp_numba.AVAILABLE and dev.type == "cpu":
            return _targets_numba(x0, m, xt, n, dtype)
        if backend == "numba":
            raise RuntimeError("backend='numba' needs numba and CPU tensors")
    if accum is None:
        accum = torch.float64 if (dev.type == "cpu" or dtype == torch.float64) else torch.float32
    m, n = m.long().to(dev), n.long().to(dev)
    B, M = x0.shape
    Nn = xt.shape[1]
    if M == 0 or int(m.max()) == int(n.max()) == 0 or bool((m == n).all()):
        e = torch.empty(0, dtype=torch.long, device=dev)
        logN = log_prefix_counts(x0, m, xt, n, dtype)[torch.arange(B, device=dev), m, n] if B else \
            torch.empty(0, dtype=dtype, device=dev)
        return InsertionTargets(e, e, e, torch.empty(0, dtype=dtype, device=dev), logN)
    a = _masked(x0.long(), m, PAD_A)
    bb = _masked(xt.long(), n, PAD_B)
    a2 = torch.cat([a, _reverse_within(a, m, PAD_A)])
    b2 = torch.cat([bb, _reverse_within(bb, n, PAD_B)])
    rel2, off2 = log_prefix_scaled(a2, torch.cat([m, m]), b2, torch.cat([n, n]), accum)
    relP, relR = rel2[:B], rel2[B:]                              # prefix; reversed prefix
    offP, offR = off2[:B], off2[B:]
    ar_b = torch.arange(B, device=dev)
    logN64 = relP[ar_b, m, n].double() + offP[ar_b, n]          # [B], float64
    logN = logN64.to(dtype)
    # Band. P[i][j] > 0 iff i >= L_j (leftmost end of an embedding of b_1..j; L_0 = 0) and
    # S[i][j] > 0 iff i <= R_j = m + 1 - Lrev_{n-j+1} (R_{n+1} = m + 1), so gap g only gets
    # mass from x0 positions L_g < i < R_{g+1}. Only those (b, g, i) are formed.
    relT2 = rel2.transpose(1, 2)                                  # [2B, N+1, M+1] contiguous
    first = (M + 1) - torch.isfinite(relT2).sum(-1)               # first finite i per column
    LP, Lrev = first[:B], first[B:]
    g = torch.arange(0, Nn + 1, device=dev)
    rg = (n[:, None] - g[None, :]).clamp_min(0)                   # n - g
    lo = LP + 1
    hi = torch.minimum(m[:, None], m[:, None] - Lrev.gather(1, rg))
    cnt = torch.where(g[None, :] <= n[:, None], (hi - lo + 1).clamp_min(0), torch.zeros_like(lo))
    cnt_f = cnt.flatten()
    K = int(cnt_f.sum())
    seg = torch.repeat_interleave(torch.arange(cnt_f.numel(), device=dev), cnt_f, output_size=K)
    start = torch.cumsum(cnt_f, 0) - cnt_f
    sb, sg = seg // (Nn + 1), seg % (Nn + 1)
    si = lo.flatten()[seg] + (torch.arange(K, device=dev) - start[seg])        # i in 1..m
    # term = log P[i-1][g] + log P_rev[m-i][n-g] - log N, the large parts added in float64
    shift = offP + offR.gather(1, rg) - logN64[:, None]           # [B, N+1]
    term = (relP[sb, si - 1, sg].double() + relR[sb, m[sb] - si, n[sb] - sg].double()
            + shift[sb, sg])
    val = term.exp().to(accum)
    tok = a[sb, si - 1]
    keep = val > 0                                                # exact zeros only
    sb, sg, tok, val = sb[keep], sg[keep], tok[keep], val[keep]
    # sum duplicates (same (seq, gap, token) from several i), sorted by (seq, gap, token)
    sb_u, sg_u, tok_u, rho = _sum_duplicates(sb, sg, tok, val, Nn, dtype, accum)
    return InsertionTargets(sb_u, sg_u, tok_u, rho, logN)


def _sum_duplicates(sb, sg, tok, val, Nn, dtype, accum=torch.float64):
    """Sum values with the same (seq, gap, token); output sorted by (seq, gap, token)."""
    vmax = int(tok.max()) + 1 if tok.numel() else 1
    key = (sb * (Nn + 1) + sg) * vmax + tok
    uk, inv = torch.unique(key, sorted=True, return_inverse=True)
    rho = torch.zeros(uk.numel(), dtype=accum, device=key.device).index_add_(0, inv, val.to(accum))
    return uk // (vmax * (Nn + 1)), (uk // vmax) % (Nn + 1), uk % vmax, rho.to(dtype)


def _targets_numba(x0, m, xt, n, dtype) -> InsertionTargets:
    from .dp_numba import raw_targets
    sb, sg, tok, val, logN = raw_targets(x0.numpy(), m.numpy(), xt.numpy(), n.numpy())
    keep = val > 0
    t = [torch.from_numpy(v[keep]) for v in (sb, sg, tok, val)]
    seq, gap, token, rho = _sum_duplicates(*t, xt.shape[1], dtype)
    return InsertionTargets(seq, gap, token, rho, torch.from_numpy(logN).to(dtype))


# ---- plain-Python references (tests, benchmarks) ------------------------------------------
def count_subsequences_python(a, b) -> int:
    """N(b, a) by the O(mn) double loop over the prefix recursion (exact integers)."""
    m, n = len(a), len(b)
    P = [[0] * (n + 1) for _ in range(m + 1)]
    for i in range(m + 1):
        P[i][0] = 1
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            P[i][j] = P[i - 1][j] + (P[i - 1][j - 1] if a[i - 1] == b[j - 1] else 0)
    return P[m][n]


def rho_python(a, b) -> dict:
    """{(g, v): Fraction rho} by the prefix/suffix double loops (exact)."""
    m, n = len(a), len(b)
    P = [[0] * (n + 2) for _ in range(m + 2)]
    S = [[0] * (n + 2) for _ in range(m + 2)]
    for i in range(m + 1):
        P[i][0] = 1
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            P[i][j] = P[i - 1][j] + (P[i - 1][j - 1] if a[i - 1] == b[j - 1] else 0)
    for i in range(1, m + 2):
        S[i][n + 1] = 1
    for i in range(m, 0, -1):
        for j in range(n, 0, -1):
            S[i][j] = S[i + 1][j] + (S[i + 1][j + 1] if a[i - 1] == b[j - 1] else 0)
    N = P[m][n]
    out: dict = {}
    if N == 0:
        return out
    for i in range(1, m + 1):
        for g in range(0, n + 1):
            c = P[i - 1][g] * S[i + 1][g + 1]
            if c:
                k = (g, a[i - 1])
                out[k] = out.get(k, 0) + Fraction(c, N)
    return out


def rho_enumerate(a, b) -> tuple[int, dict]:
    """(N, rho) by enumerating all index sets (alignments): the definition itself."""
    A = [S for S in combinations(range(len(a)), len(b)) if all(a[i] == c for i, c in zip(S, b))]
    out: dict = {}
    for S in A:
        for i, v in enumerate(a):
            if i not in S:
                k = (sum(1 for j in S if j < i), v)
                out[k] = out.get(k, 0) + Fraction(1, len(A))
    return len(A), out
