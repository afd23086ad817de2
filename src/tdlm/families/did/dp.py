"""Exact subsequence counts and insertion targets for DID (spec DID.md §4), vectorised.

Notation (1-indexed, BOS excluded): x0 body a = a_1..a_m, xt body b = b_1..b_n (a subsequence
of a, d = m - n deletions); N(b, a) = number of index sets at which b occurs in a.

* prefix  P[i][j] = N(b_1..j, a_1..i):  P[i][0] = 1,  P[0][j>0] = 0,
          P[i][j] = P[i-1][j] + [a_i = b_j] P[i-1][j-1].
* suffix  S[i][j] = N(b_j..n, a_i..m):  S[i][n+1] = 1,  S[m+1][j<=n] = 0,
          S[i][j] = S[i+1][j] + [a_i = b_j] S[i+1][j+1].
* N = P[m][n];  rho[g, v] = (1/N) sum_{i: a_i = v} P[i-1][g] S[i+1][g+1],  g = 0..n:
  the expected number of deleted v's in gap g (right after b_g; g = 0: right after BOS) under
  the uniform posterior over alignments. Identity: sum_{g,v} rho[g, v] = m - n.

Algorithm (the column form of the spec, on matches only).
* Column form: P[i][j] = sum_{i' <= i, a_i' = b_j} P[i'-1][j-1]. Column j of P is a step
  function of i that only changes at the matches of b_j. Only the band j <= i <= j + d matters
  (b_1..j needs j tokens of a, b_j+1..n needs n - j after), so column j is stored on its
  matches i_j,1 < i_j,2 < ... (the positions of b_j in a_j..a_j+d: runs of the keys of a sorted
  by (token, position), found for all j at once by ``searchsorted``).
* With F[j, u] = P[i_j,u - 1][j-1] and C[j, s] = sum_{u <= s} F[j, u] (C[j, 0] = 0):
      F[j, u] = C[j-1, r_ju],  r_ju = #{matches of column j-1 before i_j,u},
      P[i][j] = C[j, #{matches of column j at or before i}].
  The indices r_ju depend on the strings only and are computed up front (``searchsorted``), so
  the DP is n steps of one ``gather`` and one ``cumsum`` over the matches of a column (a few
  for text, d + 1 for a one-token string), vectorised over the batch. Column 0 is one virtual
  match at position 0 (P[i][0] = 1).
* Suffix: S[i][j] = P'[m-i+1][n-j+1] with P' the prefix table of the reversed strings; the
  reversed problem runs as extra batch rows of the same loop.
* rho: P[i-1][g] > 0 iff i-1 >= lo_g (lo_g = the leftmost position of b_g over all prefix
  embeddings, the first match of column g with a positive count) and S[i+1][g+1] > 0 iff
  i <= m - lo'_{n-g} (lo' of the reversed problem). So only the terms i in
  [lo_g + 1, m - lo'_{n-g}] are formed (~d in all for text, (n+1) d for one token), each P and
  S looked up by ``searchsorted``; duplicates (same token at several i of a gap) are summed;
  no threshold.
* Arithmetic. Every stored value is a count bounded by C(m, n) (band), so when
  log C(m, n) < 708 for every row (always for m < 1030, e.g. L = 1024 with BOS) the tables
  hold the exact counts in float64 (rounded like any float64 beyond 2^53) and ``cumsum`` does
  the work. Otherwise, or on request, they hold log counts: each column is computed with
  ``logcumsumexp`` in float64, shifted by its row totals (so stored values are <= 0 and small)
  and stored in float64 or float32; the shifts add up in float64 offsets.
* Padded positions of a and b hold two different sentinels (-1, -2) that never match each
  other or a (non-negative) token.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

PAD_A, PAD_B = -1, -2
LINEAR_MAX_LOG = 708.0   # float64 holds counts up to e^709.78


@dataclass
class InsertionTargets:
    seq: torch.Tensor        # [K] sequence index in the batch
    gap: torch.Tensor        # [K] gap g in 0..n_b (g = 0: right after BOS)
    token: torch.Tensor      # [K] token id v
    rho: torch.Tensor        # [K] N(Ins(xt, g, v), x0) / N(xt, x0)
    log_count: torch.Tensor  # [B] log N(xt, x0)


# ---- helpers ------------------------------------------------------------------------------
def _masked(x: torch.Tensor, lengths: torch.Tensor, pad: int) -> torch.Tensor:
    ar = torch.arange(x.shape[1], device=x.device)
    return torch.where(ar[None, :] < lengths[:, None], x.long(), pad)


def _reverse_within(x: torch.Tensor, lengths: torch.Tensor, pad: int) -> torch.Tensor:
    """x[r, :len_r] reversed, padding kept at the end."""
    L = x.shape[1]
    if L == 0:
        return x
    idx = (lengths[:, None] - 1 - torch.arange(L, device=x.device)[None, :]).clamp(0, L - 1)
    return _masked(x.gather(1, idx), lengths, pad)


def _pick(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """t[i] for a 1-D t (``index_select``: much faster than advanced indexing on CPU)."""
    return t.index_select(0, i.reshape(-1)).view(i.shape)


def _log_binom(m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    m, n = m.double(), n.double().clamp(max=m)
    return torch.lgamma(m + 1) - torch.lgamma(n + 1) - torch.lgamma(m - n + 1)


def _use_log(m, n, log_space: bool | None) -> bool:
    """Log space when asked, or when a count may pass float64's range: every count is at most
    C(m, n), so linear space is exact while log C(m, n) < LINEAR_MAX_LOG. Forcing linear space
    beyond that is refused (it would return inf or wrong targets without a word)."""
    too_big = m.numel() > 0 and float(_log_binom(m, n).max()) >= LINEAR_MAX_LOG
    if log_space is None:
        return too_big
    if not log_space and too_big:
        raise ValueError(f"log_space=False: subsequence counts up to C(m, n) = "
                         f"e^{float(_log_binom(m, n).max()):.0f} may exceed float64 "
                         f"(max e^{LINEAR_MAX_LOG:g}); use log_space=None or True")
    return log_space


@dataclass
class _Columns:
    """The prefix DP of R rows, on the matches. The tokens of row r sorted by (token, position)
    are the global keys ``keys = sort(r*G + token*W + position)``; the matches of column
    j >= 1 (0-based f = r*J + j - 1) are the ``cnt[f]`` keys from ``start[f]`` on, and
    ``base[f] = r*G + b_j*W``. Column j has w_j slots per row, stored column-major at
    ``(offw[j] + s)*R + r``: there ``C`` = the sum of F over the first s matches of column j
    (slot 0: 0; slots past a row's matches repeat its total), in counts or log counts."""
    C: torch.Tensor
    offw: torch.Tensor
    w: torch.Tensor
    keys: torch.Tensor
    start: torch.Tensor
    cnt: torch.Tensor
    base: torch.Tensor
    R: int
    J: int
    off: torch.Tensor | None = None       # log space: float64 offset of column j, row r at j*R + r

    def at(self, j: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (_pick(self.offw, j) + s) * self.R + r

    def value(self, j: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The count (log count, float64, in log space) at slot s of column j, row r."""
        v = _pick(self.C, self.at(j, r, s))
        return v if self.off is None else v.double() + _pick(self.off, j * self.R + r)

    def total(self, j: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """P[m_r][j] (all matches of column j lie at or before m_r)."""
        return self.value(j, r, _pick(self.w, j) - 1)

    def slots(self, j: torch.Tensor, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """#matches of column j of row r at positions <= x (x >= 0; column 0: its virtual
        match at 0)."""
        if self.J == 0:
            return torch.ones_like(x)
        f = r * self.J + (j - 1).clamp(min=0)
        k = torch.searchsorted(self.keys, _pick(self.base, f) + x, right=True) - _pick(self.start, f)
        return torch.where(j > 0, k.clamp(min=0).minimum(_pick(self.cnt, f)), 1)

    def lookup(self, j: torch.Tensor, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """P[x][j] for index tensors j, r, x of one shape."""
        return self.value(j, r, self.slots(j, r, x))


def _columns(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor, n: torch.Tensor, log: bool,
             dtype: torch.dtype, band: bool = True) -> tuple[_Columns, torch.Tensor]:
    """Prefix DP of rows a [R, M], b [R, J] (already padded with the sentinels). Also returns
    lo [R, J+1]: the leftmost position of b_j over all prefix embeddings (the first match of
    column j with a positive count; column 0: 0)."""
    R, M = a.shape
    J = b.shape[1]
    dev = a.device
    # global sort keys r*G + token*W + position; pads of a get a token above every query
    top = max(int(a.max()) if a.numel() else 0, int(b.max()) if b.numel() else 0) + 1
    W = M + 1
    G = (top + 1) * W
    rr = torch.arange(R, device=dev)
    keys = (torch.where(a >= 0, a, top) * W + torch.arange(1, M + 1, device=dev)
            + rr[:, None] * G).view(-1).sort().values
    # matches of b_j in the band j..j+d (or j..m): a run of the keys
    j1 = torch.arange(1, J + 1, device=dev)[None, :]
    hi = j1 + (m - n)[:, None] if band else m[:, None].expand(R, J)
    base = rr[:, None] * G + b.clamp(min=0) * W
    start = torch.searchsorted(keys, base + j1)
    end = torch.searchsorted(keys, base + hi, right=True)
    cnt = torch.where(j1 <= n[:, None], (end - start).clamp(min=0), 0)
    # column j: w_j = 1 + max_r cnt slots per row (column 0: slot 0 and its virtual match)
    w = torch.cat([torch.tensor([2], device=dev), (cnt.amax(0) if R else cnt.sum(0)) + 1])
    offw = torch.cat([w.new_zeros(1), w.cumsum(0)])
    cols = _Columns(None, offw, w, keys, start.view(-1), cnt.view(-1), base.view(-1), R, J)
    # every match (r, j, u) in flat lists (f = r*J + j-1): F at slot u+1 = C[j-1, r, #matches
    # of column j-1 (f - 1) before it] (column 1: the virtual match); other slots gather 0
    seg = torch.repeat_interleave(torch.arange(R * J, device=dev), cols.cnt)
    u = torch.arange(seg.numel(), device=dev) - _pick(cols.cnt.cumsum(0) - cols.cnt, seg)
    p = _pick(keys, _pick(cols.start, seg) + u) % W
    prev = (seg - 1).clamp(min=0)
    k = torch.searchsorted(keys, _pick(cols.base, prev) + p - 1, right=True) - _pick(cols.start, prev)
    first_col = seg % J == 0
    slot0 = (offw[1:-1] + 1)[None, :] * R + rr[:, None]            # slot 1 of (r, j)
    at = _pick(slot0.view(-1), seg) + u * R
    total = int(offw[-1]) * R
    idx = torch.empty(total - 2 * R, dtype=torch.long, device=dev).fill_(0)
    idx[at - 2 * R] = torch.where(first_col, 1, k.clamp(min=0).minimum(_pick(cols.cnt, prev)))
    one, zero = (0.0, float("-inf")) if log else (1.0, 0.0)
    C = torch.empty(total, dtype=dtype, device=dev)
    C[:2 * R].view(2, R).copy_(torch.tensor([[zero], [one]], dtype=dtype))
    wl = w.tolist()
    Cs = C.view(-1, R).split(wl)                                 # [w_j, R] blocks
    ids = idx.view(-1, R).split(wl[1:])
    if log:
        # log space: each column is kept relative to its row totals (<= 0), the totals add up
        # in float64 offsets, so float32 tables never hold magnitudes like 700
        tot = torch.zeros((J + 1, R), dtype=torch.float64, device=dev)
        for j in range(1, J + 1):
            x = torch.logcumsumexp(torch.gather(Cs[j - 1], 0, ids[j - 1]).double(), 0)
            t = x[-1].nan_to_num(neginf=0.0)
            torch.sub(x, t, out=x)
            Cs[j].copy_(x)
            tot[j] = t
        cols.off = tot.cumsum(0).view(-1)
    else:
        for j in range(1, J + 1):
            torch.gather(Cs[j - 1], 0, ids[j - 1], out=Cs[j])
            Cs[j].cumsum_(0)
    cols.C = C
    # lo: the number of leading zero-count matches of column j gives its first positive one
    z = torch.zeros(R * J, dtype=torch.long, device=dev).index_add_(0, seg, (_pick(C, at) == zero).long())
    first = (cols.start + z).clamp(max=max(keys.numel() - 1, 0))
    lo = torch.cat([torch.zeros((R, 1), dtype=torch.long, device=dev),
                    (keys[first] % W).view(R, J) if keys.numel() else torch.zeros_like(cnt)], 1)
    return cols, lo


def _prepare(x0, m, xt, n):
    dev = x0.device
    m, n = m.long().to(dev), n.long().to(dev)
    return _masked(x0, m, PAD_A), m, _masked(xt, n, PAD_B), n


# ---- public API ---------------------------------------------------------------------------
@torch.no_grad()
def log_count(x0: torch.Tensor, m: torch.Tensor, xt: torch.Tensor, n: torch.Tensor,
              log_space: bool | None = None) -> torch.Tensor:
    """log N(xt, x0) per row, float64 (-inf where xt is not a subsequence of x0)."""
    a, m, b, n = _prepare(x0, m, xt, n)
    if a.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=a.device)
    log = _use_log(m, n, log_space)
    cols, _ = _columns(a, m, b, n, log, torch.float64)
    N = cols.total(n, torch.arange(a.shape[0], device=a.device))
    return N if log else N.log()


@torch.no_grad()
def log_prefix_suffix(x0: torch.Tensor, m: torch.Tensor, xt: torch.Tensor, n: torch.Tensor,
                      dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense log tables, indices as in the spec: ``logP[r, i, j] = log P[i][j]`` for i = 0..M,
    j = 0..N ([R, M+1, N+1]) and ``logS[r, i, j] = log S[i][j]`` for i = 1..m_r+1,
    j = 1..n_r+1 ([R, M+2, N+2]; row/column 0 and entries outside a row's own range: -inf).
    Runs the log-space DP without the band (every P entry is exact); for tests and inspection."""
    a, m, b, n = _prepare(x0, m, xt, n)
    R, M = a.shape
    J = b.shape[1]
    dev = a.device
    a2 = torch.cat([a, _reverse_within(a, m, PAD_A)])
    b2 = torch.cat([b, _reverse_within(b, n, PAD_B)])
    cols, _ = _columns(a2, torch.cat([m, m]), b2, torch.cat([n, n]), True, dtype, band=False)
    r, i, j = torch.meshgrid(torch.arange(2 * R, device=dev), torch.arange(M + 1, device=dev),
                             torch.arange(J + 1, device=dev), indexing="ij")
    full = cols.lookup(j, r, i)                                  # [2R, M+1, J+1]: log P[i][j]
    logP = full[:R]
    # S[i][j] = P'[m-i+1][n-j+1]
    ii = torch.arange(M + 2, device=dev)[None, :, None]
    jj = torch.arange(J + 2, device=dev)[None, None, :]
    ok = (ii >= 1) & (ii <= m[:, None, None] + 1) & (jj >= 1) & (jj <= n[:, None, None] + 1)
    pi = (m[:, None, None] - ii + 1).clamp(0, M)
    pj = (n[:, None, None] - jj + 1).clamp(0, J)
    rev = full[R:]
    logS = rev[torch.arange(R, device=dev)[:, None, None], pi, pj]
    return logP, torch.where(ok, logS, float("-inf"))


@torch.no_grad()
def insertion_targets(x0: torch.Tensor, m: torch.Tensor, xt: torch.Tensor, n: torch.Tensor,
                      dtype: torch.dtype = torch.float32, log_space: bool | None = None,
                      table_dtype: torch.dtype | None = None) -> InsertionTargets:
    """Sparse insertion targets of a batch. ``x0`` [B, M], ``xt`` [B, N]: right-padded bodies
    (no BOS, non-negative token ids) with lengths ``m``, ``n``; xt must be a subsequence of x0
    (rows where it is not get no targets and log_count = -inf). Triples sorted by
    (seq, gap, token), duplicates summed, every non-zero value kept; rho and log_count in
    ``dtype``. ``log_space``: None = exact float64 counts when they fit (log C(m, n) < 708),
    log space otherwise; True/False forces it. ``table_dtype``: the tables' dtype (float64
    unless given; float32 only in log space)."""
    a, m, b, n = _prepare(x0, m, xt, n)
    B, M = a.shape
    J = b.shape[1]
    dev = a.device
    log = _use_log(m, n, log_space)
    tdt = table_dtype or torch.float64
    if not log and tdt != torch.float64:
        raise ValueError("linear-space tables must be float64 (counts up to ~1e307)")
    if B == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return InsertionTargets(e, e, e, torch.zeros(0, dtype=dtype, device=dev),
                                torch.zeros(0, dtype=dtype, device=dev))
    a2 = torch.cat([a, _reverse_within(a, m, PAD_A)])
    b2 = torch.cat([b, _reverse_within(b, n, PAD_B)])
    cols, lo = _columns(a2, torch.cat([m, m]), b2, torch.cat([n, n]), log, tdt)
    rows = torch.arange(B, device=dev)
    N = cols.total(n, rows)                                      # [B], log N in log space
    logN = (N if log else N.log()).double()
    # gap g of row b: terms i = lo_g + 1 .. m - lo'_{n-g}
    g = torch.arange(J + 1, device=dev)[None, :]
    gr = (n[:, None] - g).clamp(min=0)
    lo_g = lo[:B]                                                # [B, J+1]
    lo_r = lo[B:].gather(1, gr)
    ok = (g <= n[:, None]) & torch.isfinite(logN)[:, None]
    lens = torch.where(ok, (m[:, None] - lo_r - lo_g).clamp(min=0), 0).view(-1)
    seg = torch.repeat_interleave(torch.arange(B * (J + 1), device=dev), lens)
    K = seg.numel()
    sb, sg = seg // (J + 1), seg % (J + 1)
    i = lo_g.reshape(-1)[seg] + 1 + torch.arange(K, device=dev) - (lens.cumsum(0) - lens)[seg]
    pv = cols.lookup(sg, sb, i - 1)                              # P[i-1][g]
    sv = cols.lookup(n[sb] - sg, sb + B, m[sb] - i)              # S[i+1][g+1] = P'[m-i][n-g]
    if log:
        val = (pv.double() + sv.double() - logN[sb]).exp()
    else:
        val = pv * sv / N[sb]
    tok = a[sb, (i - 1).clamp(min=0)]
    keep = val > 0                                               # exact zeros only
    sb, sg, tok, val = sb[keep], sg[keep], tok[keep], val[keep]
    # sum duplicates (same (seq, gap, token) at several i), sorted by (seq, gap, token)
    V = int(tok.max()) + 1 if tok.numel() else 1
    key = (sb * (J + 1) + sg) * V + tok
    uk, inv = torch.unique(key, sorted=True, return_inverse=True)
    rho = torch.zeros(uk.numel(), dtype=val.dtype, device=dev).index_add_(0, inv, val)
    return InsertionTargets(uk // (V * (J + 1)), (uk // V) % (J + 1), uk % V, rho.to(dtype),
                            logN.to(dtype))


# ---- plain-Python references (tests, benchmarks) ------------------------------------------
def count_subsequences_python(a, b) -> int:
    """N(b, a) by the O(mn) double loop over the prefix recursion (exact integers)."""
    m, n = len(a), len(b)
    P = [[1] + [0] * n for _ in range(m + 1)]
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            P[i][j] = P[i - 1][j] + (P[i - 1][j - 1] if a[i - 1] == b[j - 1] else 0)
    return P[m][n]


def rho_python(a, b) -> dict:
    """{(g, v): Fraction rho[g, v]} by the prefix/suffix double loops (exact; {} if N = 0)."""
    m, n = len(a), len(b)
    P = [[1] + [0] * n for _ in range(m + 1)]
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            P[i][j] = P[i - 1][j] + (P[i - 1][j - 1] if a[i - 1] == b[j - 1] else 0)
    S = [[0] * (n + 1) + [1] for _ in range(m + 2)]              # S[i][j], i = 1..m+1, j = 1..n+1
    for i in range(m, 0, -1):
        for j in range(n, 0, -1):
            S[i][j] = S[i + 1][j] + (S[i + 1][j + 1] if a[i - 1] == b[j - 1] else 0)
    N = P[m][n]
    out: dict = {}
    if N == 0:
        return out
    for i in range(1, m + 1):
        for g in range(n + 1):
            c = P[i - 1][g] * S[i + 1][g + 1]
            if c:
                k = (g, a[i - 1])
                out[k] = out.get(k, 0) + Fraction(c, N)
    return out

