"""The Kneser-Ney n-gram judge (``tdlm.eval.ngram``): every conditional distribution against a
brute-force transcription of Chen & Goodman's interpolated modified KN (dicts and loops, no
shared code), normalisation, a Markov source of known entropy rate, the judge path of
``generative_perplexity`` against the model's own probabilities, and ``tdlm ngram``."""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from tdlm.cli import main
from tdlm.errors import ConfigError
from tdlm.eval.genppl import generative_perplexity, load_judge
from tdlm.eval.ngram import KneserNey, document_stream
from text_corpus import write_corpus


def brute_kn(stream, n, V, min_discount=0.01):
    """p(w | history) by the textbook recursion over Python dicts (module docstring of
    tdlm.eval.ngram; Chen & Goodman 1999, eq. 17-19 with continuation counts below n)."""
    raw = {m: Counter(tuple(stream[i:i + m]) for i in range(len(stream) - m + 1))
           for m in range(1, n + 1)}
    level = {n: dict(raw[n])}
    for k in range(1, n):
        cont = Counter()
        for gram in raw[k + 1]:
            cont[gram[1:]] += 1
        level[k] = dict(cont)
    disc = {}
    for k in range(1, n + 1):
        nr = {r: sum(1 for c in level[k].values() if c == r) for r in (1, 2, 3, 4)}
        y = nr[1] / (nr[1] + 2 * nr[2]) if nr[1] + 2 * nr[2] else 0.0
        disc[k] = [0.0] + [min(max(r - (r + 1) * y * (nr[r + 1] / nr[r] if nr[r] else 0.0),
                                   min_discount), r) for r in (1, 2, 3)]

    def p(k, hist, w):
        if k == 0:
            return 1.0 / V
        g = tuple(hist[len(hist) - (k - 1):]) if k > 1 else ()
        row = {gram[-1]: c for gram, c in level[k].items() if gram[:-1] == g}
        S = sum(row.values())
        if S == 0:
            return p(k - 1, hist, w)
        D = disc[k]
        c = row.get(w, 0)
        gamma = sum(D[min(x, 3)] for x in row.values()) / S
        return max(c - D[min(c, 3)], 0) / S + gamma * p(k - 1, hist, w)
    return p


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_conditional_matches_brute_force(order):
    V = 5
    rng = np.random.default_rng(order)
    # a skewed source, so counts of 1, 2, 3 and more all occur at every level
    stream = rng.choice(V, size=400, p=[0.4, 0.3, 0.15, 0.1, 0.05]).tolist()
    lm = KneserNey.fit(stream, order, V)
    ref = brute_kn(stream, order, V)
    combos = list(itertools.product(range(V), repeat=order - 1))
    hists = torch.tensor(combos, dtype=torch.long).reshape(len(combos), order - 1)
    dist = lm.distribution(hists)
    want = torch.tensor([[ref(order, tuple(h.tolist()), w) for w in range(V)] for h in hists],
                        dtype=torch.float64)
    assert torch.allclose(dist, want, rtol=1e-12, atol=1e-15)
    assert torch.allclose(dist.sum(1), torch.ones(len(hists), dtype=torch.float64), atol=1e-12)
    # the one-token path gives the same numbers
    for w in range(V):
        assert torch.allclose(lm.prob(hists, torch.full((len(hists),), w)), dist[:, w],
                              rtol=1e-12, atol=1e-15)


def test_unseen_histories_back_off_and_large_vocabulary_normalises():
    V = 300
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 40, size=3000).tolist()      # ids >= 40 never occur
    lm = KneserNey.fit(stream, 3, V)
    hist = torch.tensor([[0, 1], [250, 299], [5, 260], [299, 7]])
    d = lm.distribution(hist)
    assert torch.allclose(d.sum(1), torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert (d > 0).all()
    # a history never seen at levels 3 and 2 is the unigram level's distribution
    assert torch.allclose(d[1], lm.distribution(torch.tensor([[298, 298]]))[0])


def markov(P, n, rng):
    V = len(P)
    out = np.empty(n, dtype=np.int64)
    cum = np.cumsum(P, 1)
    u = rng.random(n)
    s = 0
    for i in range(n):                 # test data only: one draw per token
        s = int(np.searchsorted(cum[s], u[i] * cum[s, -1]))
        out[i] = min(s, V - 1)
    return out


def test_a_markov_source_of_known_entropy_rate():
    """Held-out NLL of KN fitted on a first-order Markov chain -> the chain's entropy rate
    ``H = -sum_i pi_i sum_j P_ij log P_ij`` (orders 2 and 3; order 1 -> the entropy of the
    stationary distribution, a higher number)."""
    rng = np.random.default_rng(0)
    V = 8
    P = rng.dirichlet(np.full(V, 0.5), size=V)
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    pi = pi / pi.sum()
    H = float(-(pi[:, None] * P * np.log(np.where(P > 0, P, 1))).sum())
    H0 = float(-(pi * np.log(pi)).sum())
    train, test = markov(P, 200_000, rng), markov(P, 50_000, rng)
    nll = {n: KneserNey.fit(train, n, V).stream_nll(test, bos=0)[0] for n in (1, 2, 3)}
    assert nll[1] == pytest.approx(H0, abs=0.01)
    assert nll[2] == pytest.approx(H, abs=0.01)
    assert nll[3] == pytest.approx(H, abs=0.015)
    assert nll[2] < nll[1] - 0.1


def test_fit_rejects_bad_input():
    with pytest.raises(ConfigError, match="order"):
        KneserNey.fit([1, 2, 3], 0, 5)
    with pytest.raises(ConfigError, match="64-bit"):
        KneserNey.fit([1, 2, 3, 4, 5, 6], 5, 8192)
    with pytest.raises(ConfigError, match=r"\[0, 5\)"):
        KneserNey.fit([1, 2, 9], 2, 5)


def test_document_stream_separates_documents():
    class Cache:
        tokens = np.array([5, 6, 7, 8, 9, 3], dtype=np.uint16)
        offsets = np.array([0, 2, 5, 6])
        n_docs, n_tokens = 3, 6
    assert document_stream(Cache(), 0).tolist() == [0, 5, 6, 0, 7, 8, 9, 0, 3, 0]


def tiny_ngram_args(corpus, cache):
    sets = ["data.tokenizer=bpe-512", f"data.source={corpus}", f"data.cache_dir={cache}",
            "data.seq_len=32", "backbone.max_seq_len=32"]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ngram")
    corpus, cache = write_corpus(root / "corpus"), root / "cache"
    assert main(["ngram", "--preset", "ar-tiny", "--order", "3", "--out", str(root / "kn3"),
                 *tiny_ngram_args(corpus, cache)]) == 0
    return root / "kn3"


def test_judge_scores_samples_with_its_own_probabilities(judge_dir):
    j = load_judge(judge_dir)
    assert j.kind == "ngram" and "Kneser-Ney 3-gram" in j.label
    m = json.loads((judge_dir / "final_eval" / "metrics.json").read_text())
    assert 0 < m["nelbo_per_token"] < math.log(j.vocab_size) and m["order"] == 3
    g = torch.Generator().manual_seed(0)
    a = [int(t) for t in torch.randint(1, j.vocab_size, (40,), generator=g)]
    b = j.encode("the small bird walks over the river") + [j.eos_id] + [7, 8, 9]
    res = generative_perplexity([a, b], j, sample_vocab_hash=j.vocab_hash())
    # by hand: -log p(x_i | BOS-padded history) over the counted tokens (b: up to its EOS)
    want, n = 0.0, 0
    for ids, counted in ((a, len(a)), (b, b.index(j.eos_id) + 1)):
        seq = [j.bos_id] * 2 + ids
        for i in range(counted):
            hist = torch.tensor([seq[i:i + 2]])
            want -= math.log(float(j.lm.prob(hist, torch.tensor([ids[i]]))[0]))
            n += 1
    assert res["tokens"] == n
    assert res["nll_per_token"] == pytest.approx(want / n, rel=1e-10)
    # the full-vocabulary path (logits + cross-entropy) gives the same numbers
    j.target_nll = lambda x, y: None
    res2 = generative_perplexity([a, b], j, sample_vocab_hash=j.vocab_hash())
    assert res2["nll_per_token"] == pytest.approx(res["nll_per_token"], rel=1e-10)
    # fluent text of the corpus scores better than uniform noise
    assert res["per_sample"][1]["nll"] / res["per_sample"][1]["tokens"] < \
        res["per_sample"][0]["nll"] / res["per_sample"][0]["tokens"]


def test_cli_ngram_errors(judge_dir, tmp_path, capsys):
    from test_genppl import one_error_line
    capsys.readouterr()
    one_error_line(capsys, main(["ngram", "--preset", "ar-tiny", "--out", str(judge_dir)]),
                   "already holds")
    corpus = write_corpus(tmp_path / "c")
    one_error_line(capsys, main(["ngram", "--preset", "ar-tiny", "--order", "9", "--out",
                                 str(tmp_path / "j"), *tiny_ngram_args(corpus, tmp_path / "k")]),
                   "64-bit")


def test_search_columns_score_each_sample_once_and_match_per_seed_scoring(judge_dir):
    """``score_samples`` scores the pooled samples once and reads every seed's gen PPL and
    entropy off the per-sample values: each must equal scoring that seed's samples alone."""
    from tdlm.scheduling.analysis import score_samples
    j = load_judge(judge_dir)
    g = torch.Generator().manual_seed(1)
    by_seed = {s: [{"ids": [int(t) for t in torch.randint(1, j.vocab_size, (n,), generator=g)],
                    "text": "", "prefix_len": 0} for n in lens]
               for s, lens in ((0, (12, 30)), (3, (7,)), (5, (25, 9, 16)))}
    calls = []
    orig = j.target_nll
    j.target_nll = lambda x, y: calls.append(x.shape) or orig(x, y)
    row = score_samples(by_seed, j, j.vocab_hash())
    n_calls, j.target_nll = len(calls), orig
    assert n_calls and row["samples"] == 6
    ppls = []
    for s, recs in by_seed.items():
        alone = generative_perplexity(recs, j, sample_vocab_hash=j.vocab_hash())
        assert row[f"ppl_seed_{s}"] == pytest.approx(alone["gen_ppl"], rel=1e-12)
        assert row[f"entropy_seed_{s}"] == pytest.approx(alone["entropy"], rel=1e-12)
        ppls.append(alone["gen_ppl"])
    calls.clear()
    j.target_nll = lambda x, y: calls.append(x.shape) or orig(x, y)
    every = generative_perplexity([r for v in by_seed.values() for r in v], j,
                                  sample_vocab_hash=j.vocab_hash())
    j.target_nll = orig
    assert len(calls) == n_calls          # the judge ran as often as for one pooled scoring
    assert row["gen_ppl"] == pytest.approx(every["gen_ppl"], rel=1e-12)
    assert row["gen_ppl_seed_std"] == pytest.approx(float(np.std(ppls, ddof=1)), rel=1e-12)
