"""The DID subsequence-count DP and the deletion process against brute force (spec DID.md §9,
checks 1, 2, 3, 8): exact Fractions from enumerating index sets and alignments, the worked
example of §4, forward marginals by enumeration and by simulation, float32 vs float64 at
L = 1024 on the worst case (one repeated token), edge cases."""
import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from tdlm.did.dp import (count_subsequences_python, insertion_targets, log_count, log_prefix_suffix,
                         rho_python)
from tdlm.did.process import delete, log_marginal

# (log_space, table_dtype, output dtype, relative tolerance)
MODES = [(None, None, torch.float64, 1e-12),               # exact float64 counts (the default)
         (True, torch.float64, torch.float64, 1e-9),       # log space, float64 tables
         (True, torch.float32, torch.float32, 1e-5),       # log space, float32 tables
         (None, None, torch.float32, 1e-5)]                # default tables, float32 outputs


def pad(rows, fill=0):
    L = max([len(r) for r in rows] + [0])
    return torch.tensor([list(r) + [fill] * (L - len(r)) for r in rows], dtype=torch.long).view(len(rows), L)


def lengths(rows):
    return torch.tensor([len(r) for r in rows], dtype=torch.long)


def targets_dict(tg, b):
    sel = tg.seq == b
    return {(int(g), int(v)): float(r) for g, v, r in zip(tg.gap[sel], tg.token[sel], tg.rho[sel])}


def count_enumerate(a, b):
    """N(b, a): the index sets of a at which b occurs."""
    return sum(all(a[i] == c for i, c in zip(S, b)) for S in itertools.combinations(range(len(a)), len(b)))


def rho_by_counts(a, b):
    """rho[g, v] = N(Ins(b, g, v), a) / N(b, a) by the definition, every count enumerated."""
    N = count_enumerate(a, b)
    out = {}
    for g in range(len(b) + 1):
        for v in set(a):
            c = count_enumerate(a, b[:g] + [v] + b[g:])
            if c:
                out[(g, v)] = Fraction(c, N)
    return N, out


def rho_by_alignments(a, b):
    """rho[g, v] = mean over alignments (index sets) of the number of deleted v's in gap g."""
    A = [S for S in itertools.combinations(range(len(a)), len(b)) if all(a[i] == c for i, c in zip(S, b))]
    out = {}
    for S in A:
        for i, v in enumerate(a):
            if i not in S:
                k = (sum(1 for s in S if s < i), v)
                out[k] = out.get(k, 0) + Fraction(1, len(A))
    return out


def random_case(rng, max_m=8):
    alphabet = rng.choice([1, 2, 3])
    m = rng.randint(0, max_m)
    a = [rng.randint(0, alphabet - 1) for _ in range(m)]
    keep = sorted(rng.sample(range(m), rng.randint(0, m)))
    return a, [a[i] for i in keep]


def test_python_references_match_enumeration():
    rng = random.Random(1)
    for _ in range(60):
        a, b = random_case(rng)
        N, rho = rho_by_counts(a, b)
        assert count_subsequences_python(a, b) == N
        assert rho_python(a, b) == rho == rho_by_alignments(a, b)
        assert sum(rho.values()) == len(a) - len(b)


@pytest.mark.parametrize("log_space,table_dtype,dtype,tol", MODES)
def test_dp_matches_enumeration_with_exact_fractions(log_space, table_dtype, dtype, tol):
    rng = random.Random(0)
    for _ in range(10):                                  # ragged batches of mixed m and n
        cases = [random_case(rng) for _ in range(8)]
        A, Bs = [c[0] for c in cases], [c[1] for c in cases]
        tg = insertion_targets(pad(A, 7), lengths(A), pad(Bs, 9), lengths(Bs), dtype=dtype,
                               log_space=log_space, table_dtype=table_dtype)
        assert tg.rho.dtype == dtype and tg.log_count.dtype == dtype
        for k, (a, b) in enumerate(cases):
            N, rho = rho_by_counts(a, b)
            assert math.isclose(float(tg.log_count[k]), math.log(N), rel_tol=tol, abs_tol=tol)
            got = targets_dict(tg, k)
            assert set(got) == set(rho), (a, b)
            for key, fr in rho.items():
                assert math.isclose(got[key], float(fr), rel_tol=tol), (a, b, key)
            assert math.isclose(sum(got.values()), len(a) - len(b), rel_tol=tol, abs_tol=tol)
        key = (tg.seq * 100 + tg.gap) * 10 + tg.token    # sorted by (seq, gap, token), unique
        assert bool((key[1:] > key[:-1]).all())
        assert torch.allclose(log_count(pad(A), lengths(A), pad(Bs), lengths(Bs)),
                              torch.tensor([math.log(count_enumerate(a, b)) for a, b in cases],
                                           dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_prefix_suffix_tables_match_the_recursions():
    rng = random.Random(2)
    cases = [random_case(rng) for _ in range(8)]
    A, Bs = [c[0] for c in cases], [c[1] for c in cases]
    logP, logS = log_prefix_suffix(pad(A, 5), lengths(A), pad(Bs, 6), lengths(Bs))
    for k, (a, b) in enumerate(cases):
        m, n = len(a), len(b)
        for i in range(m + 1):
            for j in range(n + 1):
                assert math.isclose(math.exp(logP[k, i, j]), count_subsequences_python(a[:i], b[:j]))
        for i in range(1, m + 2):
            for j in range(1, n + 2):
                assert math.isclose(math.exp(logS[k, i, j]),
                                    count_subsequences_python(a[i - 1:], b[j - 1:]))


def test_rho_is_posterior_mean_gap_count():
    """For every xt reachable from x0 (all deletion masks), rho = the mean deleted-token count
    per gap over the masks that give xt (each mask is an alignment, all equally likely)."""
    a = [0, 1, 0, 1, 1, 0]
    results = {}
    for mk in itertools.product((0, 1), repeat=len(a)):
        xt = tuple(c for c, k in zip(a, mk) if k)
        cnt, kept = results.setdefault(xt, [{}, 0]), 0
        cnt[1] += 1
        for c, k in zip(a, mk):
            if k:
                kept += 1
            else:
                cnt[0][(kept, c)] = cnt[0].get((kept, c), 0) + 1
    keys = sorted(results)
    tg = insertion_targets(pad([a] * len(keys)), lengths([a] * len(keys)), pad(keys), lengths(keys),
                           dtype=torch.float64)
    for k, xt in enumerate(keys):
        counts, total = results[xt]
        expect = {key: v / total for key, v in counts.items()}
        assert tg.log_count[k].exp().item() == pytest.approx(total)
        got = targets_dict(tg, k)
        assert set(got) == set(expect)
        for key, v in expect.items():
            assert math.isclose(got[key], v, rel_tol=1e-12)


def test_worked_example():
    """x0 = BOS a b a b, xt = BOS a (spec §4)."""
    a_, b_ = 1, 2
    x0, xt = torch.tensor([[a_, b_, a_, b_]]), torch.tensor([[a_]])
    m, n = torch.tensor([4]), torch.tensor([1])
    for log_space in (None, True):
        tg = insertion_targets(x0, m, xt, n, dtype=torch.float64, log_space=log_space)
        assert math.isclose(float(tg.log_count[0].exp()), 2.0)
        assert targets_dict(tg, 0) == pytest.approx({(0, a_): 0.5, (0, b_): 0.5, (1, a_): 0.5, (1, b_): 1.5})
        assert float(tg.rho.sum()) == pytest.approx(3.0)
    logP, logS = log_prefix_suffix(x0, m, xt, n)
    assert logP[0, :, 1].exp().tolist() == pytest.approx([0, 1, 1, 2, 2])        # i = 0..4
    assert logS[0, 1:, 1].exp().tolist() == pytest.approx([2, 1, 1, 0, 0])       # i = 1..5
    alpha = torch.tensor([0.3], dtype=torch.float64)
    assert math.isclose(float(log_marginal(xt, n, x0, m, alpha).exp()), 2 * 0.3 * 0.7 ** 3, rel_tol=1e-12)


def test_forward_marginal_enumeration_and_simulation():
    a = [0, 1, 0, 0, 2]
    for alpha in (0.35, 0.8):
        probs = {}
        for mk in itertools.product((0, 1), repeat=len(a)):
            xt = tuple(c for c, k in zip(a, mk) if k)
            probs[xt] = probs.get(xt, 0.0) + alpha ** sum(mk) * (1 - alpha) ** (len(a) - sum(mk))
        keys = sorted(probs)
        lq = log_marginal(pad(keys), lengths(keys), torch.tensor([a] * len(keys)), lengths([a] * len(keys)),
                          torch.full((len(keys),), alpha, dtype=torch.float64))
        for k, v in zip(keys, lq.exp().tolist()):
            assert math.isclose(v, probs[k], rel_tol=1e-12)
        assert math.isclose(float(lq.exp().sum()), 1.0, rel_tol=1e-12)
        # simulation: chi-square goodness of fit, fixed seed
        S = 20000
        g = torch.Generator().manual_seed(0)
        x0 = torch.tensor([a + [9]] * S)                 # a padded column that must never survive
        xt, n, keep = delete(x0, torch.full((S,), len(a)), torch.full((S,), alpha), g)
        assert torch.equal(keep.sum(1), n) and not keep[:, -1].any()
        counts = {}
        for row, nn in zip(xt.tolist(), n.tolist()):
            counts[tuple(row[:nn])] = counts.get(tuple(row[:nn]), 0) + 1
        assert set(counts) <= set(probs)
        chi2 = sum((counts.get(k, 0) - S * p) ** 2 / (S * p) for k, p in probs.items())
        dof = len(probs) - 1
        assert chi2 < dof + 4 * math.sqrt(2 * dof), (alpha, chi2, dof)


def test_delete_keeps_order_per_row_alpha_and_lengths():
    g = torch.Generator().manual_seed(1)
    x0 = torch.arange(1, 31).view(3, 10)
    xt, n, keep = delete(x0, torch.tensor([10, 4, 10]), torch.tensor([0.5, 1.0, 0.0]), g)
    assert int(n[1]) == 4 and xt[1, :4].tolist() == [11, 12, 13, 14] and not keep[1, 4:].any()
    assert int(n[2]) == 0
    row = xt[0, :int(n[0])].tolist()
    assert row == sorted(row) and row == x0[0][keep[0]].tolist()
    assert (xt[0, int(n[0]):] == 0).all()


@pytest.mark.parametrize("log_space,table_dtype", [(True, torch.float32), (None, None)])
def test_all_one_token_L1024_float32_matches_float64(log_space, table_dtype):
    """Worst case for range and precision: x0 = 1023 copies of one token, N up to
    C(1023, 511) ~ 1e306. Float32 results (float32 log tables, or the default float64 count
    tables with float32 outputs) within 1e-4 relative of the float64 reference."""
    m = 1023
    x0 = torch.full((2, m), 7)
    xt = torch.full((2, 511), 7)
    n = torch.tensor([511, 100])
    lens = torch.tensor([m, m])
    ref = insertion_targets(x0, lens, xt, n, dtype=torch.float64, log_space=True)
    t32 = insertion_targets(x0, lens, xt, n, dtype=torch.float32, log_space=log_space, table_dtype=table_dtype)
    assert torch.isfinite(t32.rho).all() and torch.isfinite(t32.log_count).all()
    exact = [math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) for k in (511, 100)]
    assert ref.log_count.tolist() == pytest.approx(exact, rel=1e-12)
    assert exact[0] > 700
    assert torch.equal(t32.seq, ref.seq) and torch.equal(t32.gap, ref.gap)
    torch.testing.assert_close(t32.log_count.double(), ref.log_count, rtol=1e-4, atol=0)
    torch.testing.assert_close(t32.rho.double(), ref.rho, rtol=1e-4, atol=0)
    for b in range(2):                                   # symmetry: (m - n)/(n + 1) in every gap
        k = int(n[b])
        torch.testing.assert_close(ref.rho[ref.seq == b], torch.full((k + 1,), (m - k) / (k + 1), dtype=torch.float64))


def test_edge_cases_and_sentinels():
    # padding value 5 is a real token of the batch: padded positions must never match
    x0 = pad([[], [5], [5, 5], [3, 4], [5, 3, 5]], fill=5)
    m = torch.tensor([0, 1, 2, 2, 3])
    xt = pad([[], [], [5, 5], [4], [3]], fill=5)
    n = torch.tensor([0, 0, 2, 1, 1])
    for log_space in (None, True):
        tg = insertion_targets(x0, m, xt, n, dtype=torch.float64, log_space=log_space)
        assert targets_dict(tg, 0) == {}                     # m = 0
        assert targets_dict(tg, 1) == {(0, 5): 1.0}          # n = 0
        assert targets_dict(tg, 2) == {}                     # n = m: nothing deleted
        assert targets_dict(tg, 3) == {(0, 3): 1.0}
        assert targets_dict(tg, 4) == {(0, 5): 1.0, (1, 5): 1.0}
        assert tg.log_count.exp().tolist() == pytest.approx([1, 1, 1, 1, 1])
    # n = 0 everywhere (xt = BOS only): rho[0, v] = count of v
    tg = insertion_targets(pad([[1, 2, 1]]), torch.tensor([3]), torch.zeros((1, 0), dtype=torch.long), torch.tensor([0]))
    assert targets_dict(tg, 0) == {(0, 1): 2.0, (0, 2): 1.0}
    # no deletions at all, and an empty batch
    tg = insertion_targets(pad([[1, 2]]), torch.tensor([2]), pad([[1, 2]]), torch.tensor([2]))
    assert tg.rho.numel() == 0 and float(tg.log_count[0]) == 0.0
    tg = insertion_targets(torch.zeros((0, 3), dtype=torch.long), torch.zeros(0), torch.zeros((0, 2), dtype=torch.long),
                           torch.zeros(0))
    assert tg.rho.numel() == 0 and tg.log_count.numel() == 0
    # xt not a subsequence of x0: no targets, log N = -inf
    tg = insertion_targets(pad([[1, 2], [1, 2]]), torch.tensor([2, 2]), pad([[2, 1], [2]]), torch.tensor([2, 1]))
    assert tg.seq.tolist() == [1] and tg.log_count[0] == float("-inf")


def test_linear_space_beyond_float64_is_refused_not_silently_wrong():
    """All-equal tokens: N(xt, x0) = C(m, n) exactly. C(1200, 600) = e^828.4 is past float64:
    forced linear space must raise, the default switches to log space and is exact."""
    import math
    from tdlm.did.dp import insertion_targets, log_count
    m, n = 1200, 600
    x0 = torch.full((1, m), 3)
    xt = torch.full((1, n), 3)
    M, N = torch.tensor([m]), torch.tensor([n])
    exact = math.lgamma(m + 1) - math.lgamma(n + 1) - math.lgamma(m - n + 1)
    assert exact > 709.8
    with pytest.raises(ValueError, match="log_space=False"):
        log_count(x0, M, xt, N, log_space=False)
    with pytest.raises(ValueError, match="log_space=False"):
        insertion_targets(x0, M, xt, N, log_space=False)
    got = float(log_count(x0, M, xt, N))
    assert abs(got - exact) < 1e-6 * exact
    tg = insertion_targets(x0, M, xt, N, dtype=torch.float64)
    assert torch.isfinite(tg.rho).all() and torch.isfinite(tg.log_count).all()
