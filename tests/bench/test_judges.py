"""benchmarks/judges.py (gen PPL of the committed samples under the Kneser-Ney judge): the
paired change and its Student-t interval by hand, the rank correlation against numpy, the
target verdict both ways, and the committed report matching its JSON."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from paths import REPO
from test_study import _load


def test_paired_change_by_hand():
    j = _load("judges")
    ref = {0: (100.0,), 1: (200.0,), 2: (50.0,)}
    a = {0: (110.0,), 1: (200.0,), 2: (60.0,)}           # +10%, 0%, +20%
    r = j.paired(a, ref)
    assert r["mean"] == pytest.approx(0.1)
    se = math.sqrt(((0.0) ** 2 + 0.1 ** 2 + 0.1 ** 2) / 2 / 3)
    assert r["se"] == pytest.approx(se)
    assert r["ci95"] == pytest.approx([0.1 - 4.303 * se, 0.1 + 4.303 * se], rel=1e-3)


def test_spearman_matches_ranked_pearson():
    j = _load("judges")
    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    b = a + rng.normal(size=30)
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    assert j.spearman(list(a), list(b)) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert j.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def row(saved, gen, ent=(-0.001, 0.001)):
    return {"schedule": "L1 H1", "saved_blocks": saved,
            "gen_change": {"mean": sum(gen) / 2, "ci95": list(gen)},
            "entropy_change": {"mean": sum(ent) / 2, "ci95": list(ent)}}


def test_fine_verdict_met_missed_and_gap():
    j = _load("judges")
    assert j.fine_verdict([row(0.252, (-0.01, 0.025))]).startswith("**met**")
    # the upper end counts, not the mean; entropy outside 2% fails too
    v = j.fine_verdict([row(0.252, (0.0, 0.04)), row(0.30, (0.05, 0.09))])
    assert v.startswith("**missed**") and "gap 1.00 pts" in v
    assert j.fine_verdict([row(0.26, (0.0, 0.02), (0.01, 0.03))]).startswith("**missed**")
    assert "no schedule" in j.fine_verdict([row(0.2, (0.0, 0.01))])


def test_committed_report_matches_its_json():
    res = REPO / "benchmarks" / "results" / "judges.json"
    if not res.exists():
        pytest.skip("no committed judges.json")
    j = _load("judges")
    r = json.loads(res.read_text())
    assert (REPO / "benchmarks" / "results" / "judges.md").read_text() == j.markdown(r)
    f = r["fine"]
    assert f["verdict"] == j.fine_verdict(f["rows"])
    # each change is the paired mean of the per-seed values it is reported with
    H = next(x for x in f["rows"] if set(x["mask"]) == {"H"})
    for x in f["rows"]:
        d = [x["per_seed"][s]["gen_ppl"] / H["per_seed"][s]["gen_ppl"] - 1 for s in H["per_seed"]]
        assert x["gen_change"]["mean"] == pytest.approx(sum(d) / len(d))
    # the n-gram orders improve with n and the chosen judge is the best on validation
    nll = {int(n): m["nelbo_per_token"] for n, m in r["ngram"].items()}
    assert r["judge_order"] == min(nll, key=nll.get)
    assert all(nll[n + 1] < nll[n] for n in range(1, max(nll)))


def test_doubling_ladder_and_power_law_asymptote():
    j = _load("judges")
    # L(m) = 3 + 8 m^-0.5: gains shrink by r = 2^-0.5 per doubling, asymptote 3
    nll = {m: 3 + 8 * m ** -0.5 for m in (2000, 4000, 8000)}
    lad = j.ladder(nll)
    assert [g["from"] for g in lad["gains"]] == [2000, 4000]
    assert lad["r"] == pytest.approx(2 ** -0.5)
    assert lad["asymptote"] == pytest.approx(3.0)
    # gains that grow: no asymptote
    assert j.ladder({2000: 4.0, 4000: 3.9, 8000: 3.7})["asymptote"] is None
    assert j.ladder({8000: 3.6}) is None
    # a fourth judge: the law through the three before it predicts it (exactly, on the law);
    # the asymptote comes from the last three points
    nll[16000] = 3 + 8 * 16000 ** -0.5
    lad = j.ladder(nll)
    assert lad["predicted"]["steps"] == 16000
    assert lad["predicted"]["nll"] == pytest.approx(nll[16000])
    assert lad["asymptote"] == pytest.approx(3.0)
    assert lad["last_rel"] == pytest.approx((nll[8000] - nll[16000]) / nll[8000])
    off = {**nll, 16000: nll[16000] + 0.01}
    assert j.ladder(off)["predicted"]["measured"] - j.ladder(off)["predicted"]["nll"] \
        == pytest.approx(0.01)
    assert "converged by the doubling rule" in j._ar_state(lad)        # 0.85%: under 1%
    assert "8000 -> 16000 steps 0.85% better" in j._ar_state(lad)
    assert "not converged by the doubling rule" in j._ar_state(
        j.ladder({2000: 4.0, 4000: 3.9, 8000: 3.7}))                    # 5.1%
    assert " converged by the doubling rule" in j._ar_state(
        j.ladder({2000: 4.0, 4000: 3.9, 8000: 3.89}))
    assert "not" not in j._ar_state(j.ladder({2000: 4.0, 4000: 3.9, 8000: 3.89}))
    # no power law through points whose gains do not shrink: no prediction, no asymptote
    bad = j.ladder({2000: 4.0, 4000: 3.9, 8000: 3.95, 16000: 3.96})
    assert "predicted" not in bad and bad["asymptote"] is None
    assert "0.25% worse" in j._ar_state(bad) and "overfitting" not in j._ar_state(bad)
    assert "overfitting" in j._ar_state(j.ladder({4000: 3.9, 8000: 3.8, 16000: 3.9}))
    # gains that are not consecutive doublings are not chained into a law
    gap = j.ladder({1000: 5.0, 2000: 4.5, 8000: 4.0, 16000: 3.8})
    assert [g["from"] for g in gap["gains"]] == [1000, 8000]
    assert "r" not in gap and "predicted" not in gap


def test_short_context_judge_equals_a_loop_over_truncated_prefixes():
    """judges.ShortContext(judge, k): the logits that score token t are the judge's on the k
    tokens before t alone (x[t-k:t], fewer at the start), fed as a sequence of their own
    (positions restart), checked against a loop over the truncated prefixes; a judge that
    answers how many tokens it was shown sees min(t, k); with k >= L - 1 it is the judge
    itself, and with a shorter k it differs from it (the fake judge reads its whole context,
    position-weighted)."""
    import torch
    from tdlm.eval.genppl import Judge
    j = _load("judges")
    V = 11
    E = torch.randn(V, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    class Fake(Judge):
        label, path, vocab_size, eos_id = "fake", "fake", V, 7

        def vocab_hash(self):
            return "h"

        def logits(self, x, mask):
            pos = torch.arange(1, x.shape[1] + 1, dtype=torch.float64)[None, :, None]
            return torch.cumsum(pos * E[x] * mask[..., None], dim=1)

    judge = Fake()
    x = torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[2, 12:] = False                                      # a padded row
    for k in (1, 3, 16):
        sc = j.ShortContext(judge, k, chunk=5)                # several chunks
        got = sc.logits(x, mask)
        # logits[:, t - 1] score token t, t = 1..L (the last one scores nothing)
        want = torch.stack([judge.logits(x[:, max(0, t - k):t], mask[:, max(0, t - k):t])[:, -1]
                            for t in range(1, x.shape[1] + 1)], dim=1)
        assert torch.equal(got, want)
        full = judge.logits(x, mask)
        assert torch.equal(got, full) == (k >= x.shape[1])

    class Count(Fake):                                        # logit 0 = tokens shown
        def logits(self, x, mask):
            n = torch.arange(1, x.shape[1] + 1, dtype=torch.float64)
            return n[None, :, None].expand(x.shape[0], -1, V).clone()

    for k in (1, 3):
        seen = j.ShortContext(Count(), k, chunk=4).logits(x, mask)[0, :, 0]
        assert seen.tolist() == [min(t, k) for t in range(1, x.shape[1] + 1)]
    sc = j.ShortContext(judge, 3)
    assert (sc.vocab_size, sc.eos_id, sc.vocab_hash()) == (V, 7, "h") and "3-token" in sc.label
    assert sc.target_nll(x, x) is None and sc.info()["short_context"] == 3
    with pytest.raises(ValueError):
        j.ShortContext(judge, 0)
