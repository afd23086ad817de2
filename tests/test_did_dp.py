"""The DID subsequence-count DP and deletion process against brute force (spec DID.md §9,
checks 1, 2, 3, 8): exact Fractions from enumerating index sets, the worked example, forward
marginals by enumeration and simulation, float32 vs float64 at L = 1024."""
import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from tdlm.did.dp import (count_subsequences_python, insertion_targets, log_prefix_counts,
                         rho_enumerate, rho_python)
from tdlm.did.process import delete, log_marginal


def pad(rows, fill=0):
    L = max([len(r) for r in rows] + [0])
    return torch.tensor([list(r) + [fill] * (L - len(r)) for r in rows], dtype=torch.long).view(len(rows), L)


def targets_dict(tg, b):
    sel = tg.seq == b
    return {(int(g), int(v)): float(r) for g, v, r in zip(tg.gap[sel], tg.token[sel], tg.rho[sel])}


def random_case(rng, alphabet=3, max_m=8):
    m = rng.randint(0, max_m)
    a = [rng.randint(0, alphabet - 1) for _ in range(m)]
    keep = sorted(rng.sample(range(m), rng.randint(0, m)))
    return a, [a[i] for i in keep]


BACKENDS = ["torch"] + (["numba"] if __import__("tdlm.did.dp_numba", fromlist=["x"]).AVAILABLE else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_dp_matches_enumeration_with_exact_fractions(dtype, tol, backend):
    rng = random.Random(0)
    for _ in range(12):                           # ragged batches of mixed m, n
        cases = [random_case(rng, alphabet=rng.choice([1, 2, 3])) for _ in range(7)]
        A = [c[0] for c in cases]
        Bs = [c[1] for c in cases]
        m = torch.tensor([len(a) for a in A])
        n = torch.tensor([len(b) for b in Bs])
        tg = insertion_targets(pad(A, 7), m, pad(Bs, 9), n, dtype=dtype, backend=backend)
        for k, (a, b) in enumerate(cases):
            N, rho = rho_enumerate(a, b)
            assert N == count_subsequences_python(a, b)
            assert rho == rho_python(a, b)            # the double loop = the definition
            assert math.isclose(float(tg.log_count[k]), math.log(N), rel_tol=tol, abs_tol=tol)
            got = targets_dict(tg, k)
            assert set(got) == set(rho), (a, b)
            for key, fr in rho.items():
                assert math.isclose(got[key], float(fr), rel_tol=tol), (a, b, key)
            assert sum(rho.values()) == len(a) - len(b)
            assert math.isclose(sum(got.values()), len(a) - len(b), rel_tol=tol, abs_tol=tol)
        # sorted by (seq, gap, token), no duplicates
        key = (tg.seq * 1000 + tg.gap) * 100 + tg.token
        assert bool((key[1:] > key[:-1]).all())


def test_rho_is_posterior_mean_gap_count():
    """rho = E over alignments (uniform posterior) of the deleted v's per gap; checked against
    an independent enumeration that builds xt from every deletion mask of x0."""
    a = [0, 1, 0, 1, 1, 0]
    for xt in {tuple(c for c, k in zip(a, mk) if k) for mk in itertools.product((0, 1), repeat=len(a))}:
        counts, total = {}, 0
        for mk in itertools.product((0, 1), repeat=len(a)):
            if tuple(c for c, k in zip(a, mk) if k) != xt:
                continue
            total += 1
            kept = 0
            for c, k in zip(a, mk):
                if k:
                    kept += 1
                else:
                    counts[(kept, c)] = counts.get((kept, c), 0) + 1
        expect = {k: Fraction(v, total) for k, v in counts.items()}
        tg = insertion_targets(torch.tensor([a]), torch.tensor([len(a)]), pad([xt]), torch.tensor([len(xt)]),
                               dtype=torch.float64)
        got = targets_dict(tg, 0)
        assert set(got) == set(expect)
        for k, v in expect.items():
            assert math.isclose(got[k], float(v), rel_tol=1e-12)


def test_worked_example():
    A, Bt = 1, 2
    a, b = [A, Bt, A, Bt], [A]
    tg = insertion_targets(torch.tensor([a]), torch.tensor([4]), torch.tensor([b]), torch.tensor([1]),
                           dtype=torch.float64)
    assert math.isclose(float(tg.log_count[0].exp()), 2.0)
    got = targets_dict(tg, 0)
    assert got == pytest.approx({(0, A): 0.5, (0, Bt): 0.5, (1, A): 0.5, (1, Bt): 1.5})
    logP = log_prefix_counts(torch.tensor([a]), torch.tensor([4]), torch.tensor([b]), torch.tensor([1]),
                             torch.float64)
    assert logP[0, :, 1].exp().tolist() == pytest.approx([0, 1, 1, 2, 2])
    # S[., 1] for i = 1..5 via the reversed problem: S[i][1] = P_rev[m - i + 1][n]
    ar = torch.tensor([a[::-1]])
    logR = log_prefix_counts(ar, torch.tensor([4]), torch.tensor([b]), torch.tensor([1]), torch.float64)
    S1 = [float(logR[0, 4 - i + 1, 1].exp()) for i in range(1, 6)]
    assert S1 == pytest.approx([2, 1, 1, 0, 0])
    alpha = torch.tensor([0.3], dtype=torch.float64)
    lq = log_marginal(torch.tensor([b]), torch.tensor([1]), torch.tensor([a]), torch.tensor([4]), alpha)
    assert math.isclose(float(lq.exp()), 2 * 0.3 * 0.7 ** 3, rel_tol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases_and_sentinels(backend):
    x0 = pad([[], [5], [5, 5], [3, 4]], fill=0)
    m = torch.tensor([0, 1, 2, 2])
    xt = pad([[], [], [5, 5], [4]], fill=0)           # padding value 0 is never a match
    n = torch.tensor([0, 0, 2, 1])
    tg = insertion_targets(x0, m, xt, n, dtype=torch.float64, backend=backend)
    assert targets_dict(tg, 0) == {}
    assert targets_dict(tg, 1) == {(0, 5): 1.0}
    assert targets_dict(tg, 2) == {}                  # n = m: nothing deleted
    assert targets_dict(tg, 3) == {(0, 3): 1.0}
    assert tg.log_count.exp().tolist() == pytest.approx([1, 1, 1, 1])
    # all rows without deletions
    tg = insertion_targets(pad([[1, 2]]), torch.tensor([2]), pad([[1, 2]]), torch.tensor([2]), backend=backend)
    assert tg.rho.numel() == 0


def test_forward_marginal_enumeration_and_simulation():
    a = [0, 1, 0, 0]
    alpha = 0.4
    probs = {}
    for mk in itertools.product((0, 1), repeat=len(a)):
        xt = tuple(c for c, k in zip(a, mk) if k)
        probs[xt] = probs.get(xt, 0.0) + alpha ** sum(mk) * (1 - alpha) ** (len(a) - sum(mk))
    assert math.isclose(sum(probs.values()), 1.0)
    keys = sorted(probs)
    lq = log_marginal(pad(keys), torch.tensor([len(k) for k in keys]), torch.tensor([a] * len(keys)),
                      torch.tensor([len(a)] * len(keys)), torch.full((len(keys),), alpha, dtype=torch.float64))
    for k, v in zip(keys, lq.exp().tolist()):
        assert math.isclose(v, probs[k], rel_tol=1e-12)
    # simulation: chi-square goodness of fit (fixed seed)
    S = 40000
    g = torch.Generator().manual_seed(0)
    xt, n, keep = delete(torch.tensor([a] * S), torch.full((S,), len(a)), torch.full((S,), alpha), g)
    counts = {}
    for row, nn in zip(xt.tolist(), n.tolist()):
        counts[tuple(row[:nn])] = counts.get(tuple(row[:nn]), 0) + 1
    assert set(counts) <= set(probs)
    chi2 = sum((counts.get(k, 0) - S * p) ** 2 / (S * p) for k, p in probs.items())
    dof = len(probs) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2
    # kept tokens compacted in order, padding beyond n is 0
    assert torch.equal(keep.sum(1), n)


def test_delete_keeps_order_and_respects_lengths():
    g = torch.Generator().manual_seed(1)
    x0 = torch.arange(1, 21).view(2, 10)
    m = torch.tensor([10, 4])
    xt, n, keep = delete(x0, m, torch.tensor([0.5, 1.0]), g)
    assert int(n[1]) == 4 and xt[1, :4].tolist() == [11, 12, 13, 14]
    row = xt[0, :int(n[0])].tolist()
    assert row == sorted(row) and set(row) <= set(range(1, 11))
    assert not keep[1, 4:].any()


@pytest.mark.parametrize("accum,rho_tol,backend", [(torch.float32, 2e-4, "torch"), (torch.float64, 1e-6, "torch")]
                         + [(None, 1e-6, b) for b in BACKENDS if b != "torch"])
def test_all_one_token_L1024_float32_matches_float64(accum, rho_tol, backend):
    """Worst case for precision (counts ~1e306). Pure float32 tables: log N within 1e-7
    relative, rho within 2e-4 relative (measured 1.1e-4); the CPU default (float64 tables,
    float32 outputs): within 1e-6."""
    m = 1023
    x0 = torch.full((2, m), 7)
    n = torch.tensor([511, 100])
    xt = torch.full((2, 511), 7)
    lens = torch.tensor([m, m])
    t64 = insertion_targets(x0, lens, xt, n, dtype=torch.float64, backend="torch")
    t32 = insertion_targets(x0, lens, xt, n, dtype=torch.float32, accum=accum, backend=backend)
    assert torch.isfinite(t32.rho).all() and torch.isfinite(t32.log_count).all()
    assert float(t64.log_count[0]) > 700                     # C(1023, 511) ~ 1e306
    torch.testing.assert_close(t32.log_count.double(), t64.log_count, rtol=1e-7, atol=0)
    assert torch.equal(t32.gap, t64.gap) and torch.equal(t32.seq, t64.seq)
    torch.testing.assert_close(t32.rho.double(), t64.rho, rtol=rho_tol, atol=1e-30)
    for b in range(2):
        assert math.isclose(float(t64.rho[t64.seq == b].sum()), m - int(n[b]), rel_tol=1e-9)
    # one-token strings: rho[g] = (m - n)/(n + 1) in every gap (symmetry)
    torch.testing.assert_close(t64.rho[t64.seq == 1], torch.full((101,), (m - 100) / 101, dtype=torch.float64))
