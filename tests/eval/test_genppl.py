"""Generative perplexity: an AR checkpoint trained with ``tdlm train`` (exact NLL in ``tdlm
eval``) and a local Hugging Face GPT-2 (tiny, random, saved to tmp_path; never downloaded) as
judges; token-pooled NLL against a direct computation, first-EOS counting, windows longer than
the judge's context, retokenisation, entropy, and the ``tdlm genppl`` command."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tdlm.cli import main
from tdlm.data.tokenizer import gpt2_tokenizer
from tdlm.errors import ConfigError
from tdlm.eval.genppl import (generative_perplexity, load_judge, pooled_nll_se, unigram_entropy,
                              vocab_ids_hash)
from text_corpus import write_corpus


def tiny_sets(corpus, cache, *extra):
    sets = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.cond_dim=16",
            "model.max_seq_len=32", "data.seq_len=32", "data.tokenizer=bpe-512",
            f"data.source={corpus}", f"data.cache_dir={cache}", "train.global_batch=4",
            "train.max_steps=3", "train.warmup_steps=1", "train.log_every=1",
            "train.eval_every=3", "train.eval_batches=1", *extra]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("genppl")
    corpus, cache = write_corpus(root / "corpus"), root / "cache"
    for name, preset in (("ar", "ar-tiny"), ("mdlm", "tiny")):
        assert main(["train", "--preset", preset, "--out", str(root / name), "--no-progress",
                     *tiny_sets(corpus, cache)]) == 0
    return {"root": root, "ar": root / "ar", "mdlm": root / "mdlm"}


@pytest.fixture(scope="module")
def hf_judge_dir(tmp_path_factory):
    """A tiny randomly initialised GPT2LMHeadModel + GPT-2 tokenizer files (built from the
    vendored vocabulary and merges), saved locally."""
    transformers = pytest.importorskip("transformers")
    import gzip
    from tdlm.data.tokenizer import ASSETS
    d = tmp_path_factory.mktemp("hf")
    for src, dst in (("gpt2-encoder.json.gz", "vocab.json"), ("gpt2-vocab.bpe.gz", "merges.txt")):
        with gzip.open(Path(ASSETS) / src, "rt", encoding="utf-8") as f:
            (d / dst).write_text(f.read(), encoding="utf-8")
    tok = transformers.GPT2TokenizerFast(str(d / "vocab.json"), str(d / "merges.txt"))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_positions=24, n_embd=16, n_layer=1, n_head=2))
    out = d / "gpt2-tiny"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_ar_checkpoint_trains_evaluates_and_judges(runs, capsys):
    assert main(["eval", str(runs["ar"]), "--json", "--batches", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["family"] == "ar" and res["bound"] == "exact NLL"
    j = load_judge(runs["ar"])
    assert j.kind == "tdlm-ar" and j.context == 32 and "not GPT-2" in j.label


@torch.no_grad()
def manual_nll(model, bos, ids, counted):
    seq = torch.tensor([[bos] + ids])
    logits = model(seq[:, :-1]).double()
    ce = F.cross_entropy(logits[0], seq[0, 1:], reduction="none")
    return float(ce[torch.tensor(counted)].sum())


@torch.no_grad()
def manual_nll_from(model, ids, counted):
    """As manual_nll for a sequence that already opens with the judge's BOS: no BOS added;
    ``counted`` is aligned with ids[1:]."""
    seq = torch.tensor([ids])
    logits = model(seq[:, :-1]).double()
    ce = F.cross_entropy(logits[0], seq[0, 1:], reduction="none")
    return float(ce[torch.tensor(counted)].sum())


def test_token_pooled_nll_and_first_eos(runs):
    j = load_judge(runs["ar"])
    m, eos = j.pipe.model, j.eos_id
    g = torch.Generator().manual_seed(0)
    V = j.vocab_size
    body = lambda n: [int(v) for v in torch.randint(1, V, (n,), generator=g)]
    a = body(20)                                   # no EOS: all 20 counted
    b = body(6) + [eos] + body(9)                  # counted up to and including the EOS: 7
    c = [eos, eos] + body(5) + [eos] + body(3)     # leading EOS -> context; then 6 counted
    h = vocab_ids_hash(j.pipe.tokenizer.hf)
    res = generative_perplexity([a, b, c], j, sample_vocab_hash=h)
    assert not res["retokenised"] and res["tokens"] == 20 + 7 + 6
    assert res["leading_eos_moved_to_context"] == 2
    nll = (manual_nll(m, j.bos_id, a, [True] * 20)
           + manual_nll(m, j.bos_id, b, [True] * 7 + [False] * 9)
           + manual_nll_from(m, c, [False] + [True] * 6 + [False] * 3))  # c opens with BOS
    assert res["nll_per_token"] == pytest.approx(nll / 33, rel=1e-6)
    assert res["gen_ppl"] == pytest.approx(math.exp(nll / 33), rel=1e-6)
    ps = res["per_sample"]
    assert res["nll_se_per_token"] == pooled_nll_se([p["nll"] for p in ps],
                                                    [p["tokens"] for p in ps])
    lo, hi = res["gen_ppl_ci95"]
    assert lo < res["gen_ppl"] < hi
    assert [p["tokens"] for p in ps] == [20, 7, 6]
    assert ps[1]["entropy"] == pytest.approx(unigram_entropy(b))
    # the entropy is taken over the tokens the judge scores as generated: c's two leading EOS
    # (a sampler's start token, moved to the context) are not part of it
    assert ps[2]["entropy"] == pytest.approx(unigram_entropy(c[2:]))
    assert ps[2]["entropy"] != pytest.approx(unigram_entropy(c))
    # the other counting rules
    r2 = generative_perplexity([b, c], j, sample_vocab_hash=h, eos="mdlm")
    assert r2["tokens"] == (15 + 1) + (8 + 1)      # non-EOS tokens + the first EOS
    r3 = generative_perplexity([b, c], j, sample_vocab_hash=h, eos="none")
    assert r3["tokens"] == 16 + 9                  # c's leading EOS are context in every mode
    assert r2["leading_eos_moved_to_context"] == r3["leading_eos_moved_to_context"] == 2
    nll_c = manual_nll_from(m, c, [False] + [True] * 9)   # the first EOS after the text counts
    assert r2["per_sample"][1]["nll"] == pytest.approx(nll_c, rel=1e-6)
    # scoring builds no autograd graph (the judge's weights require grad): the judge runs
    # with grad mode off
    assert any(q.requires_grad for q in m.parameters())
    modes, logits = [], j.logits
    j.logits = lambda *x, **k: modes.append(torch.is_grad_enabled()) or logits(*x, **k)
    try:
        generative_perplexity([a], j, sample_vocab_hash=h)
    finally:
        del j.logits
    assert modes and not any(modes)


@torch.no_grad()
def test_windows_longer_than_the_judge_context(runs):
    j = load_judge(runs["ar"])           # context 32
    g = torch.Generator().manual_seed(1)
    ids = [int(v) for v in torch.randint(1, j.vocab_size, (80,), generator=g)]
    h = vocab_ids_hash(j.pipe.tokenizer.hf)
    # batches of 2 windows sorted by length: sample 0's last window (16 targets) is scored
    # beside sample 1's only one, before sample 0's first two
    res = generative_perplexity([ids, ids[:10]], j, sample_vocab_hash=h, batch_size=2,
                                per_token=True)
    assert res["tokens"] == 90
    seq = [j.bos_id] + ids
    per_tok = []
    for a in range(0, 80, 32):           # windows of 32 inputs, each scoring its next tokens
        inp = torch.tensor([seq[a:a + 32]])[:, :len(seq[a + 1:a + 33])]
        tgt = torch.tensor(seq[a + 1:a + 33])
        per_tok += F.cross_entropy(j.pipe.model(inp).double()[0], tgt, reduction="none").tolist()
    ps = res["per_sample"]
    assert ps[0]["nll"] == pytest.approx(sum(per_tok), rel=1e-6)
    # per token, in the sample's order, across windows and batches
    assert len(ps[0]["token_nll"]) == 80 and len(ps[1]["token_nll"]) == 10
    assert ps[0]["token_nll"] == pytest.approx(per_tok, rel=1e-5, abs=1e-5)
    assert ps[1]["token_nll"] == pytest.approx(per_tok[:10], rel=1e-5, abs=1e-5)
    assert sum(ps[1]["token_nll"]) == pytest.approx(ps[1]["nll"], rel=1e-12)
    assert "token_nll" not in generative_perplexity([ids], j, sample_vocab_hash=h)[
        "per_sample"][0]
    # a sample that opens with its sampler's BOS (= EOS): that BOS is the judge's context and no
    # second one is added, so the windows and every token's NLL are the ones above
    assert j.bos_id == j.eos_id
    lead = generative_perplexity([[j.bos_id] + ids], j, sample_vocab_hash=h, per_token=True)
    assert lead["tokens"] == 80 and lead["leading_eos_moved_to_context"] == 1
    assert lead["per_sample"][0]["token_nll"] == pytest.approx(per_tok, rel=1e-5, abs=1e-5)


def brute_position_matched(a, b):
    """Transcription of position_matched's point estimates with loops over positions."""
    pooled = lambda sets: sum(map(sum, sets)) / sum(map(len, sets))       # noqa: E731
    num = den = wsum = 0.0
    for j in range(max(map(len, a))):
        at_a = [x[j] for x in a if len(x) > j]
        at_b = [x[j] for x in b if len(x) > j]
        if at_a and at_b:
            num += sum(at_a)
            den += len(at_a) * sum(at_b) / len(at_b)
            wsum += len(at_a)
    return math.exp(pooled(a) - pooled(b)), math.exp(num / wsum - den / wsum), \
        wsum / sum(map(len, a))


def test_position_matched_removes_the_length_confound():
    from tdlm.eval.genppl import position_matched
    rng = np.random.default_rng(0)
    prof = lambda j: 6.0 + 4.0 / (1 + j)          # noqa: E731  NLL falls with context
    # the same per-position NLLs on both sides; a's samples are short, b's long
    a = [[prof(j) for j in range(n)] for n in rng.integers(3, 20, 12)]
    b = [[prof(j) for j in range(n)] for n in rng.integers(30, 60, 9)]
    r = position_matched(a, b, rounds=200)
    assert r["ratio"] > 1.1                        # pooled: short samples look worse
    assert r["matched_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert r["matched_ratio_ci95"] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert r["covered"] == 1.0
    # random NLLs, b shorter than some of a: against the loop transcription
    a = [list(rng.normal(7, 1, n)) for n in rng.integers(1, 25, 10)]
    b = [list(rng.normal(6, 1, n)) for n in rng.integers(1, 15, 7)]
    r = position_matched(a, b, rounds=300, seed=3)
    want = brute_position_matched(a, b)
    assert (r["ratio"], r["matched_ratio"], r["covered"]) == pytest.approx(want, rel=1e-12)
    assert r["covered"] < 1
    for k in ("ratio", "matched_ratio"):
        lo, hi = r[k + "_ci95"]
        assert lo < r[k] < hi
    with pytest.raises(ConfigError):
        position_matched([[]], b)
    # mostly empty samples: resamplings that draw no token on a side have no ratio and are
    # left out, not turned into a NaN interval; the full sets give the loop's figures
    a, b = [[1.0, 2.0], [], [], [], []], [[1.5], [2.5, 3.0]]
    r = position_matched(a, b, rounds=400)
    assert 0 < r["rounds_used"] < 400
    assert all(math.isfinite(x) for k in ("ratio_ci95", "matched_ratio_ci95") for x in r[k])
    assert (r["ratio"], r["matched_ratio"], r["covered"]) == pytest.approx(
        brute_position_matched(a, b), rel=1e-12)


def test_retokenises_text_when_tokenizers_differ(runs, hf_judge_dir):
    j = load_judge(runs["ar"])
    text = "The small bird runs.<|endoftext|>A red tree"
    res = generative_perplexity([{"text": text}], j)          # tokenizer unknown: retokenise
    toks = j.pipe.tokenizer.encode("The small bird runs.")
    assert res["retokenised"] and res["tokens"] == len(toks) + 1
    # same ids scored directly when the vocabularies agree
    res2 = generative_perplexity([{"text": text, "ids": toks + [j.eos_id]}], j,
                                 sample_vocab_hash=vocab_ids_hash(j.pipe.tokenizer.hf))
    assert not res2["retokenised"]
    assert res2["nll_per_token"] == pytest.approx(res["nll_per_token"], rel=1e-6)
    # prefix-conditioned records: the prefix is context only
    res3 = generative_perplexity([{"text": text, "ids": toks + [j.eos_id], "prefix_len": 2}], j,
                                 sample_vocab_hash=vocab_ids_hash(j.pipe.tokenizer.hf))
    assert res3["tokens"] == len(toks) + 1 - 2


def test_hugging_face_gpt2_judge(hf_judge_dir):
    import transformers
    j = load_judge(hf_judge_dir)
    assert j.kind == "hf" and j.eos_id == 50256 and j.context == 24
    tok = gpt2_tokenizer()
    assert j.vocab_hash() == vocab_ids_hash(tok.hf)            # GPT-2 ids mean the same
    texts = ["Hello world, this is a sample.", "Another one<|endoftext|>ignored tail"]
    ids = [tok.encode(t) for t in texts]
    res = generative_perplexity([{"text": t, "ids": i} for t, i in zip(texts, ids)], j,
                                sample_vocab_hash=vocab_ids_hash(tok.hf))
    assert not res["retokenised"] and res["tokens"] == len(ids[0]) + len(tok.encode("Another one")) + 1
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_judge_dir, local_files_only=True)
    nll = 0.0
    for i, t in zip(ids, texts):
        n = (i.index(50256) + 1) if 50256 in i else len(i)
        x = torch.tensor([[50256] + i[:n]])
        with torch.no_grad():
            logits = ref(x).logits.double()
        nll += float(F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
    assert res["nll_per_token"] == pytest.approx(nll / res["tokens"], rel=1e-5)
    res_t = generative_perplexity(texts, j)                    # text only: retokenised
    assert res_t["retokenised"] and res_t["tokens"] == res["tokens"]
    assert res_t["nll_per_token"] == pytest.approx(res["nll_per_token"], rel=1e-5)


def test_generated_ids_skip_the_prefix_and_leading_eos_by_ids_or_by_text():
    from tdlm.eval.genppl import EOT, generated_ids, leading_eos, sample_entropy
    # a clamped 2-token prefix, then the sampler's BOS (= EOS, id 0) and a document boundary
    r = {"ids": [5, 6, 0, 0, 7, 8, 0, 9], "prefix_len": 2, "prefix_text": "ab",
         "text": "ab" + EOT + EOT + "cd" + EOT + "e"}
    assert leading_eos(r, eos=0) == leading_eos(r) == 2     # by ids / by the text's markers
    assert generated_ids(r, eos=0) == generated_ids(r) == [7, 8, 0, 9]
    assert sample_entropy(r) == pytest.approx(unigram_entropy([7, 8, 0, 9]))
    # an EOS inside the generated text is text; no prefix, no leading EOS: all ids
    assert generated_ids({"ids": [7, 0, 0], "text": "c" + EOT + EOT}) == [7, 0, 0]
    assert leading_eos({"ids": [0, 7]}) == 0 and leading_eos({"ids": [0, 7]}, eos=0) == 1
    assert generated_ids({"text": "x"}) is None and sample_entropy({"text": "x"}) is None
    # a prefix whose text is not the start of the sample's (it ends inside a multi-byte
    # character), or a prefix without its text: the generated part is not located in the
    # text, so nothing is skipped (the ids, given eos, still tell)
    r2 = {"ids": [0, 5, 0, 7], "prefix_len": 2, "prefix_text": EOT + "\ufffd",
          "text": EOT + "\u65e5" + EOT + "x"}
    assert leading_eos(r2) == 0 and leading_eos(r2, eos=0) == 1
    assert leading_eos({"ids": [0, 5, 7], "prefix_len": 1, "text": EOT + "ab"}) == 0


def test_unigram_entropy():
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([5, 5, 5]) == 0.0 and unigram_entropy([]) == 0.0
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))


def test_cli_genppl(runs, hf_judge_dir, capsys):
    samples = runs["root"] / "s" / "samples.jsonl"
    assert main(["sample", str(runs["mdlm"]), "--num", "3", "--steps", "6",
                 "--out", str(samples)]) == 0
    capsys.readouterr()
    assert main(["genppl", str(samples), "--judge", str(runs["ar"])]) == 0
    out = capsys.readouterr().out
    assert "gen PPL" in out and "entropy" in out
    m = json.loads((samples.parent / "metrics.json").read_text())
    for k in ("judge", "sampler", "steps", "precision", "num_samples", "gen_ppl", "entropy",
              "tokens", "eos", "retokenised"):
        assert k in m, k
    assert m["steps"] == 6 and m["num_samples"] == 3 and m["precision"] == "fp32"
    assert m["judge"]["kind"] == "tdlm-ar" and not m["retokenised"]
    assert m["sampler"]["checkpoint"] and m["gen_ppl"] > 1 and m["entropy"] > 0
    # scheduled samples record their schedule; an HF judge retokenises bpe-512 samples
    sched = runs["root"] / "s" / "sched.jsonl"
    assert main(["sample", "--model", f"H={runs['mdlm']}", "--model", f"L={runs['mdlm']}",
                 "--schedule", "sandwich:0.5", "--num", "2", "--steps", "4",
                 "--out", str(sched)]) == 0
    assert main(["genppl", str(sched), "--judge", str(hf_judge_dir), "--json",
                 "--out", str(runs["root"] / "g")]) == 0
    m2 = json.loads((runs["root"] / "g" / "metrics.json").read_text())
    assert m2["sampler"]["schedule"]["run_length"] == "L1,H2,L1" and m2["retokenised"]
    assert m2["judge"]["kind"] == "hf"


def one_error_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])


def test_cli_genppl_errors(runs, tmp_path, capsys):
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"text": "a small bird"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    one_error_line(capsys, main(["genppl", str(good), "--judge", str(runs["mdlm"])]),
                   "autoregressive")
    one_error_line(capsys, main(["genppl", str(good), "--judge", str(tmp_path / "none")]),
                   "judge not found")
    one_error_line(capsys, main(["genppl", str(tmp_path / "missing.jsonl"), "--judge",
                                 str(runs["ar"])]), "not found")
    one_error_line(capsys, main(["genppl", str(bad), "--judge", str(runs["ar"])]), "not JSON")
    one_error_line(capsys, main(["genppl", str(good), "--judge", str(tmp_path)]),
                   "neither a tdlm")
    one_error_line(capsys, main(["genppl", str(good), "--judge", str(runs["ar"]),
                                 "--batch-size", "0"]), "batch_size")
    with pytest.raises(ConfigError, match="MASK"):
        generative_perplexity([[1, 2, 10 ** 6]], load_judge(runs["ar"]),
                              sample_vocab_hash=load_judge(runs["ar"]).vocab_hash())
    with pytest.raises(ConfigError, match="eos"):
        generative_perplexity(["x"], load_judge(runs["ar"]), eos="last")


def test_pooled_nll_se_is_the_mean_se_at_equal_lengths():
    """Every sample scoring n tokens: the ratio estimator's s.e. is the textbook s.e. of the
    mean of the per-sample NLL/token."""
    import statistics
    rng = np.random.default_rng(0)
    nll = list(rng.gamma(4.0, 1.0, 12) * 10)
    se = pooled_nll_se(nll, [10] * 12)
    ref = statistics.stdev([a / 10 for a in nll]) / math.sqrt(12)
    assert se == pytest.approx(ref, rel=1e-12)
    assert math.isnan(pooled_nll_se([3.0], [4]))
    assert pooled_nll_se([3.0, 5.0, 9.0], [4, 0, 6]) == pooled_nll_se([3.0, 9.0], [4, 6])


def test_pooled_nll_se_intervals_cover_the_true_rate():
    """Samples of random lengths (1-60 tokens) whose token NLLs are i.i.d. with a known mean
    mu, plus a per-sample offset (samples differ in difficulty): the 95% interval r -+ 1.96 se
    holds mu in 95% of 4000 simulated sets of 40 samples (binomial s.d. 0.34%)."""
    rng = np.random.default_rng(1)
    mu, hits, trials, m = 3.0, 0, 4000, 40
    for _ in range(trials):
        n = rng.integers(1, 61, m)
        off = rng.normal(0.0, 0.5, m)                   # per-sample difficulty, mean 0
        nll = [float(rng.exponential(mu, k).sum() + o * k) for k, o in zip(n, off)]
        r = sum(nll) / n.sum()
        hits += abs(r - mu) <= 1.96 * pooled_nll_se(nll, list(n))
    assert 0.93 <= hits / trials <= 0.965, hits / trials
