"""Likelihood-based (exchange) tree levels (tdlm.vocab_tree.exchange): the gain formula against
brute force, the objective against a direct count, capacities kept, and a planted class-bigram
corpus whose classes the exchange recovers where the embedding k-means does not."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tdlm.vocab_tree.build import build_tree, plan_groups
from tdlm.vocab_tree.embeddings import random_embeddings
from tdlm.vocab_tree.exchange import bigram_counts, class_loglik, exchange_gains
from tdlm.vocab_tree.sources import build_from_source


def brute_loglik(tokens, cls):
    """The class-bigram model's maximum-likelihood log-likelihood of the stream, directly:
    sum over bigrams (v, w) of log p(w | c(w)) + log p(c(w) | v) with p(w | c) = n(w) / N(c),
    p(c | v) = N(v, c) / N(v) (counts over bigrams), minus the partition-free part
    sum log n(w) - sum log N(v)."""
    t = list(tokens)
    big = list(zip(t[:-1], t[1:]))
    n, Ncl, Nvc, Nv = {}, {}, {}, {}
    for v, w in big:
        n[w] = n.get(w, 0) + 1
        Ncl[cls[w]] = Ncl.get(cls[w], 0) + 1
        Nvc[(v, cls[w])] = Nvc.get((v, cls[w]), 0) + 1
        Nv[v] = Nv.get(v, 0) + 1
    ll = sum(np.log(n[w] / Ncl[cls[w]]) + np.log(Nvc[(v, cls[w])] / Nv[v]) for v, w in big)
    return ll - sum(np.log(n[w]) for _, w in big) + sum(np.log(Nv[v]) for v, _ in big)


def test_objective_and_gains_match_brute_force():
    rng = np.random.default_rng(0)
    V, G = 7, 3
    tokens = rng.integers(0, V, 400)
    N = bigram_counts(tokens, V)
    n = np.asarray(N.sum(axis=0)).ravel()
    cls = np.array([0, 1, 2, 0, 1, 2, 0])
    for part in (cls, np.array([1, 1, 2, 0, 0, 2, 0]), np.array([2, 0, 1, 1, 0, 2, 2])):
        assert class_loglik(N, n, part, G) == pytest.approx(brute_loglik(tokens, part), rel=1e-10)
    # moving token w from a to b changes LL by exactly gain(w, b) - gain(w, a)
    tok = np.arange(V)
    gain = exchange_gains(N, n, tok, cls.copy(), np.zeros(V, dtype=np.int64), np.full(V, G), G)
    base = class_loglik(N, n, cls, G)
    for w, b in itertools.product(range(V), range(G)):
        moved = cls.copy()
        moved[w] = b
        assert class_loglik(N, n, moved, G) - base == pytest.approx(
            gain[w, b] - gain[w, cls[w]], rel=1e-9, abs=1e-9)


def planted(V=60, C=4, T=60_000, seed=0):
    """A class-bigram stream: class transitions from a sparse C x C matrix, tokens uniform
    within their class; classes are contiguous blocks of ids shuffled."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(V)
    cls = np.empty(V, dtype=np.int64)
    cls[perm] = np.arange(V) % C
    members = [np.flatnonzero(cls == c) for c in range(C)]
    trans = np.full((C, C), 0.02)
    trans[np.arange(C), (np.arange(C) + 1) % C] = 1.0
    trans /= trans.sum(1, keepdims=True)
    c, out = 0, np.empty(T, dtype=np.int64)
    for i in range(T):
        c = rng.choice(C, p=trans[c])
        out[i] = rng.choice(members[c])
    return out, cls


def purity(labels, truth):
    tot = 0
    for g in np.unique(labels):
        tot += np.bincount(truth[labels == g]).max()
    return tot / truth.size


def test_exchange_recovers_planted_classes_within_capacities():
    tokens, truth = planted()
    V, K, H = truth.size, 8, 2
    emb = random_embeddings(V, 16, seed=1)           # uninformative start
    plain = build_tree(emb, K, H, seed=0)
    from tdlm.vocab_tree.exchange import exchange_refiner
    refined = build_tree(emb, K, H, seed=0, refine=exchange_refiner(tokens, V))
    lab_plain, lab = plain.anc[1], refined.anc[1]             # height-1 node of each token
    st = refined.meta["levels"]["2"]
    ll = st["exchange_loglik"]
    assert ll[-1] >= ll[0] and max(ll) > ll[0]                        # the objective rose
    # capacities as planned for the root (K groups of <= K tokens here)
    g, lo, hi = plan_groups(np.array([V]), H, K)
    sizes = np.unique(lab, return_counts=True)[1]
    assert sizes.size == g[0] and sizes.max() <= hi[0] and sizes.min() >= lo[0]
    assert purity(lab, truth) > 0.95 > purity(lab_plain, truth), (purity(lab, truth),
                                                                 purity(lab_plain, truth))


def test_exchange_source_builds_a_tree(tmp_path):
    tokens, _ = planted(V=40, T=5000)
    tree = build_from_source("exchange", 40, 8, 2, tokens=tokens, dim=8)
    assert tree.meta["method"] == "balanced_kmeans+exchange"
    assert tree.meta["embedding_source"] == "exchange"
