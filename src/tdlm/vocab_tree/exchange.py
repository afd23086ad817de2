"""Likelihood-based (exchange) clustering of the corpus bigrams, with the tree's capacities.

The class-based bigram model of the predictive exchange algorithm (Uszkoreit & Brants 2008,
after Kneser & Ney 1993 and Martin et al. 1998; Brown et al. 1992 use the two-sided variant)
factorises ``p(w | v) = p(w | c(w)) p(c(w) | v)``. With bigram counts ``N(v, w)`` (v followed
by w in the training stream), token counts ``n(w) = sum_v N(v, w)`` and, for a partition c of the tokens,
``N(v, c) = sum_{w in c} N(v, w)`` and ``N(c) = sum_{w in c} n(w)``, its maximum-likelihood
log-likelihood is, up to terms that do not depend on the partition::

    LL(c) = sum_{v, c} f(N(v, c)) - sum_c f(N(c)),      f(x) = x log x  (f(0) = 0).

A tree level is such a partition (the children of every node at that height), and the
classes are the ones TDLM's coarse levels predict, so a higher LL means coarse symbols that
say more about the next token given the previous one.

:func:`exchange_level` refines one level of :func:`tdlm.vocab_tree.build.build_tree` (the
balanced k-means split is its start) under the same capacities. The gain of placing token w in
class c, with w first taken out of its own class and every other token fixed, is::

    gain(w, c) = sum_{v: N(v,w) > 0} [f(M(v,c) + N(v,w)) - f(M(v,c))] - [f(N'(c) + n(w)) - f(N'(c))]

(``M``, ``N'`` the counts without w), so moving w from a to b changes LL by exactly
``gain(w, b) - gain(w, a)`` (tested against brute force). Tokens are re-assigned by the
balanced auction on the cost ``-gain``, a random block at a time (:func:`exchange_level`); every
sweep's exact LL is computed and the best partition seen is kept. Work per sweep:
(non-zero bigrams of the level's tokens) x K, plus one [V, G] class-count table per block.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

_CHUNK = 1 << 22          # (non-zero bigram, candidate) pairs per vectorised block


def bigram_counts(tokens: np.ndarray, V: int) -> sp.csc_matrix:
    """``N[v, w]``: how often token v is followed by token w in the stream (CSC, float64)."""
    t = np.asarray(tokens, dtype=np.int64).ravel()
    if t.size < 2:
        return sp.csc_matrix((V, V), dtype=np.float64)
    ones = np.ones(t.size - 1, dtype=np.float64)
    return sp.csc_matrix((ones, (t[:-1], t[1:])), shape=(V, V))


def _f(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def class_loglik(N: sp.csc_matrix, n: np.ndarray, cls: np.ndarray, G: int) -> float:
    """``LL(c)`` (module docstring) of the partition ``cls`` [V] (class ids < G; tokens with
    ``cls < 0`` are left out)."""
    keep = np.flatnonzero(cls >= 0)
    onehot = sp.csr_matrix((np.ones(keep.size), (keep, cls[keep])), shape=(N.shape[1], G))
    M = (N @ onehot).tocoo()
    Nc = np.bincount(cls[keep], weights=n[keep], minlength=G)
    return float(_f(M.data).sum() - _f(Nc).sum())


def exchange_gains(N: sp.csc_matrix, n: np.ndarray, tok: np.ndarray, gl: np.ndarray,
                   pt_coff: np.ndarray, pt_g: np.ndarray, G: int,
                   pts: np.ndarray | None = None) -> np.ndarray:
    """``gain[i, k]`` of putting point i (token ``tok[i]``, now in global class ``gl[i]``) in
    class ``pt_coff[i] + k`` (``-inf`` for ``k >= pt_g[i]``), every other point staying where
    it is; formula in the module docstring. ``N`` [V, V] bigram counts, ``n`` [V] token
    counts; ``pts``: the points to compute (default all; the class counts use all)."""
    pts = np.arange(tok.size) if pts is None else np.asarray(pts)
    P, Km = pts.size, int(pt_g.max())
    onehot = sp.csr_matrix((np.ones(tok.size), (tok, gl)), shape=(N.shape[1], G))
    M = np.asarray((N @ onehot).todense(), dtype=np.float64)            # [V, G]
    Nc = np.zeros(G)
    np.add.at(Nc, gl, n[tok])
    t, g_, coff, pg = tok[pts], gl[pts], pt_coff[pts], pt_g[pts]
    sub = N[:, t].tocsc()                                               # columns = points
    sub.sort_indices()
    pt_of = np.repeat(np.arange(P), np.diff(sub.indptr))
    v_of, b_of = sub.indices, sub.data
    gain = np.zeros((P, Km))
    ar = np.arange(Km)
    step = max(1, _CHUNK // Km)
    for a in range(0, pt_of.size, step):
        i, v, b = pt_of[a:a + step], v_of[a:a + step], b_of[a:a + step]
        cand = np.minimum(coff[i, None] + ar, G - 1)                    # [chunk, Km]
        base = M[v[:, None], cand] - b[:, None] * (cand == g_[i, None])
        vals = _f(base + b[:, None]) - _f(base)
        starts = np.flatnonzero(np.r_[True, i[1:] != i[:-1]])         # points are contiguous
        gain[i[starts]] += np.add.reduceat(vals, starts, axis=0)
    cand = np.minimum(coff[:, None] + ar, G - 1)
    nw = n[t][:, None]
    base = Nc[cand] - nw * (cand == g_[:, None])
    gain -= _f(base + nw) - _f(base)
    gain[ar[None, :] >= pg[:, None]] = -np.inf
    return gain


def exchange_level(lv, tok: np.ndarray, local: np.ndarray, N: sp.csc_matrix, n: np.ndarray,
                   max_sweeps: int = 6, blocks: int = 16, seed: int = 0,
                   tol: float = 1e-5) -> tuple[np.ndarray, dict]:
    """Refine a balanced split (``lv``: the ``build._Level`` of one tree level, ``tok`` the
    token of each of its points, ``local`` their groups) by exchange sweeps: the points are
    visited in ``blocks`` random blocks; a block's points are re-assigned together by the
    balanced auction on ``-gain`` (every other point fixed, the block sharing the capacity
    the others leave), then the class counts are updated before the next block. Re-assigning
    all points at once overshoots (the gains assume the others stay); small blocks keep each
    step close to exact. Every sweep's LL is computed exactly; the best partition is kept and
    sweeps stop when LL rises by less than ``tol`` (relative)."""
    from .build import EPS_LAST, _cost_spread, auction_assign, repair_lower
    G, V = lv.G, N.shape[1]
    rng = np.random.default_rng(seed)
    cur = local.copy()
    ll = class_loglik(N, n, _as_classes(tok, lv.pt_coff + cur, V), G)
    best, best_ll, hist, moved = cur.copy(), ll, [round(ll, 3)], []
    for _ in range(max_sweeps):
        order = rng.permutation(lv.n)
        n_moved = 0
        for blk in np.array_split(order, max(1, min(blocks, lv.n))):
            blk = np.sort(blk)
            gl = lv.pt_coff + cur
            gain = exchange_gains(N, n, tok, gl, lv.pt_coff, lv.pt_g, G, pts=blk)
            D = (-gain).astype(np.float32)
            others = np.bincount(np.delete(gl, blk), minlength=G)
            cap = np.maximum(lv.cap - others, 0)
            s = _cost_spread(D)
            new, _ = auction_assign(D, lv.pt_coff[blk], cap, [s * EPS_LAST[0], s * EPS_LAST[1]],
                                    init=cur[blk])
            n_moved += int((new != cur[blk]).sum())
            cur[blk] = new
        cnt = np.bincount(lv.pt_coff + cur, minlength=G)
        if (cnt < lv.low).any():                     # lower bounds (rarely bind)
            gain = exchange_gains(N, n, tok, lv.pt_coff + cur, lv.pt_coff, lv.pt_g, G)
            cur = repair_lower(lv, (-gain).astype(np.float32), cur)
        ll = class_loglik(N, n, _as_classes(tok, lv.pt_coff + cur, V), G)
        hist.append(round(ll, 3))
        moved.append(n_moved)
        if ll > best_ll:
            gained = ll - best_ll
            best, best_ll = cur.copy(), ll
            if gained < tol * abs(best_ll):
                break
        else:
            break
    return best, {"exchange_loglik": hist, "exchange_moved": moved}


def exchange_refiner(tokens: np.ndarray, V: int, **kw):
    """The ``refine`` hook of :func:`tdlm.vocab_tree.build.build_tree` for the token stream
    ``tokens``: exchange on its bigram counts (``kw``: :func:`exchange_level` options)."""
    N = bigram_counts(np.asarray(tokens, dtype=np.int64), V)
    n = np.asarray(N.sum(axis=0)).ravel()          # n(w): w as a bigram target

    def refine(lv, tok, local):
        return exchange_level(lv, tok, local, N, n, **kw)
    refine.name = "exchange"
    return refine


def _as_classes(tok: np.ndarray, gl: np.ndarray, V: int) -> np.ndarray:
    cls = np.full(V, -1, dtype=np.int64)
    cls[tok] = gl
    return cls
