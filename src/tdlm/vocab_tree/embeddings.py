"""Embedding sources for :func:`tdlm.tree.build_tree` (spec §2, **[ours]**); each returns a
float32 array ``[V, d]`` with one row per token.

* :func:`from_checkpoint_embeddings` - input-embedding rows of a trained model (the default
  source; HDLM clusters pretrained GIDD embeddings).
* :func:`corpus_embeddings` - distributional vectors from a tokenised corpus: positive PMI of
  windowed co-occurrence counts, factorised by a truncated (randomised) SVD.
* :func:`random_embeddings` - random baseline (clusters carry no meaning).
* :func:`frequency_embeddings` - frequency baseline: a 2-D embedding of the frequency rank that
  makes ``build_tree`` group tokens of neighbouring ranks. For the exact frequency-sorted tree
  (consecutive ranks fill consecutive clusters) use :func:`tdlm.tree.build_frequency_tree`.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import DataError


def from_checkpoint_embeddings(weight, V: int) -> np.ndarray:
    """The first ``V`` rows of an input-embedding matrix ``[rows >= V, d]`` (torch tensor or
    array; extra rows such as [MASK] or padding are dropped), as float32 numpy."""
    if hasattr(weight, "detach"):
        weight = weight.detach().to("cpu").float().numpy()
    w = np.asarray(weight)
    if w.ndim != 2:
        raise DataError(f"embedding weight must be 2-D [rows, d], got shape {w.shape}")
    if w.shape[0] < V:
        raise DataError(f"embedding weight has {w.shape[0]} rows, fewer than the {V} tokens")
    out = np.array(w[:V], dtype=np.float32)
    if not np.isfinite(out).all():
        raise DataError("embedding weight contains NaN or infinite values")
    return out


def random_embeddings(V: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """i.i.d. standard normal vectors ``[V, dim]`` (random-assignment baseline)."""
    return np.random.default_rng(seed).standard_normal((int(V), int(dim)), dtype=np.float32)


def frequency_embeddings(counts: np.ndarray) -> np.ndarray:
    """Frequency-rank baseline as embeddings ``[V, 2]``: token of rank ``r`` (decreasing count,
    ties by id) sits on the unit quarter circle at angle ``theta_r = (pi/2) r / (V-1)``.

    Unit vectors survive ``build_tree``'s L2 normalisation (a 1-D embedding would not), and
    the distance between two points grows with ``|theta_r - theta_s|``, so balanced k-means
    groups (nearly) contiguous rank ranges."""
    c = np.asarray(counts)
    if c.ndim != 1 or c.size < 1:
        raise DataError(f"token counts must be a non-empty 1-D array, got shape {c.shape}")
    V = c.size
    order = np.lexsort((np.arange(V), -c.astype(np.float64)))
    rank = np.empty(V, dtype=np.int64)
    rank[order] = np.arange(V)
    theta = (np.pi / 2) * rank / max(V - 1, 1)
    return np.stack([np.cos(theta), np.sin(theta)], axis=1).astype(np.float32)


def token_counts(token_ids: np.ndarray, V: int) -> np.ndarray:
    """Occurrences of each token id in a 1-D token stream, int64 ``[V]``."""
    ids = _check_ids(token_ids, V)
    return np.bincount(ids, minlength=V).astype(np.int64)


def _check_ids(token_ids, V: int) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"token ids must be a 1-D integer array, got shape {ids.shape} "
                        f"dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise DataError(f"token ids must lie in [0, {V}), got range "
                        f"[{int(ids.min())}, {int(ids.max())}]")
    return ids


def cooccurrence_counts(token_ids: np.ndarray, V: int, window: int = 4) -> sp.csr_matrix:
    """Symmetric windowed co-occurrence matrix ``C[w, c] = sum_{1<=o<=window} (1/o) *
    #{i : (x_i, x_{i+o}) = (w, c) or (c, w)}`` as float32 CSR ``[V, V]`` (harmonic weighting
    of the distance, as in GloVe)."""
    ids = _check_ids(token_ids, V).astype(np.int32)
    C = sp.csr_matrix((V, V), dtype=np.float32)
    for o in range(1, int(window) + 1):
        if ids.size <= o:
            break
        a, b = ids[:-o], ids[o:]
        w = np.full(a.size, 1.0 / o, dtype=np.float32)
        C = C + sp.csr_matrix((w, (a, b)), shape=(V, V), dtype=np.float32)
    C = (C + C.T).tocsr()
    C.sum_duplicates()
    return C


def ppmi(C: sp.csr_matrix, alpha: float = 0.75) -> sp.csr_matrix:
    """Positive PMI with context-distribution smoothing (Levy et al. 2015):
    ``PPMI[w, c] = max(0, log(C[w, c] / (C[w, :].sum() * P_alpha(c))))`` with
    ``P_alpha(c) = C[:, c].sum()^alpha / sum_c' C[:, c'].sum()^alpha``."""
    C = C.tocsr().astype(np.float64)
    row = np.asarray(C.sum(axis=1)).ravel()
    col = np.asarray(C.sum(axis=0)).ravel() ** alpha
    pc = col / max(col.sum(), 1e-300)
    r_idx = np.repeat(np.arange(C.shape[0]), np.diff(C.indptr))
    with np.errstate(divide="ignore"):
        val = np.log(C.data) - np.log(row[r_idx]) - np.log(pc[C.indices])
    P = sp.csr_matrix((np.maximum(val, 0.0).astype(np.float32), C.indices.copy(),
                       C.indptr.copy()), shape=C.shape)
    P.eliminate_zeros()
    return P


def randomized_svd(A, k: int, n_oversample: int = 10, n_power: int = 4, seed: int = 0):
    """Truncated SVD ``A ~ U diag(S) Vt`` (Halko, Martinsson & Tropp 2011): range finder on
    ``A @ Omega`` with ``n_power`` re-orthonormalised power iterations. Deterministic in seed."""
    m, n = A.shape
    p = min(n, k + n_oversample)
    rng = np.random.default_rng(seed)
    Q = np.asarray(A @ rng.standard_normal((n, p), dtype=np.float32))
    Q, _ = np.linalg.qr(Q)
    for _ in range(n_power):
        Z, _ = np.linalg.qr(np.asarray(A.T @ Q))
        Q, _ = np.linalg.qr(np.asarray(A @ Z))
    B = np.asarray(A.T @ Q).T                      # [p, n] = Q^T A
    Ub, S, Vt = np.linalg.svd(B.astype(np.float64), full_matrices=False)
    U = Q.astype(np.float64) @ Ub
    return U[:, :k], S[:k], Vt[:k]


def corpus_embeddings(token_ids: np.ndarray, V: int, dim: int = 64, window: int = 4,
                      seed: int = 0) -> np.ndarray:
    """Distributional embeddings ``[V, dim]`` from a 1-D token stream.

    ``E = U_k diag(S_k)^(1/2)`` where ``PPMI ~ U S V^T`` is the rank-``dim`` truncated SVD of
    the PPMI matrix of :func:`cooccurrence_counts` (window ``window``, both sides). Tokens
    with no co-occurrence information (never seen, or an all-zero PPMI row) get a deterministic
    random direction (from ``seed``) of the median norm, so every token is placed; such tokens
    then fill the clusters' spare capacity. Signs are fixed (largest entry of each column
    positive). About 25 s for 7M tokens, V=50,257, dim=64, window=4 on 2 cores (mostly the
    SVD's sparse products).
    """
    if int(V) < 1:
        raise DataError(f"invalid vocabulary size {V}")
    V, dim = int(V), int(dim)
    ids = _check_ids(token_ids, V)
    E = np.zeros((V, dim), dtype=np.float32)
    k = min(dim, V - 1)
    if ids.size >= 2 and k >= 1:
        P = ppmi(cooccurrence_counts(ids, V, window))
        if P.nnz:
            U, S, _ = randomized_svd(P, k, seed=seed)
            U = U * np.sqrt(S)[None, :]
            big = np.argmax(np.abs(U), axis=0)
            U = U * np.sign(U[big, np.arange(k)])[None, :]
            E[:, :k] = U.astype(np.float32)
    norms = np.linalg.norm(E, axis=1)
    empty = norms <= 1e-8 * max(float(norms.max(initial=0.0)), 1e-30)
    if empty.any():
        scale = float(np.median(norms[~empty])) if (~empty).any() else 1.0
        R = np.random.default_rng([int(seed), 1]).standard_normal((V, dim), dtype=np.float32)
        R /= np.linalg.norm(R, axis=1, keepdims=True)
        E[empty] = scale * R[empty]
    return E
