"""GPT-2 tokenizer against an independent reference (OpenAI tiktoken, r50k_base).

``tests/fixtures/gpt2_reference.json`` is written by ``scripts/make_gpt2_fixture.py`` (a
development tool; tiktoken is not needed to run these tests)."""
import gzip
import json
import os

import pytest

from paths import FIXTURES
from tdlm.data.cache import build_or_load_cache, cache_key, docs_fingerprint
from tdlm.data.tokenizer import (ASSETS, EOT, GPT2_N_MERGES, Tokenizer, _byte_level,
                                 _gpt2_merges, gpt2_tokenizer)
from tdlm.errors import DataError
from tokenizers import AddedToken, models
from tokenizers import Tokenizer as HFTokenizer

FIXTURE = str(FIXTURES / "gpt2_reference.json")
# the merges whose first part starts with '#': the old loader dropped them with the header
HASH_MERGES = [("#", "#"), ("##", "##"), ("####", "####"), ("########", "########"),
               ("##", "#"), ("################", "################"), ("#", "$"),
               ("#$", "#$")]


def _assets():
    with gzip.open(os.path.join(ASSETS, "gpt2-encoder.json.gz"), "rt", encoding="utf-8") as f:
        vocab = json.load(f)
    with gzip.open(os.path.join(ASSETS, "gpt2-vocab.bpe.gz"), "rt", encoding="utf-8") as f:
        text = f.read()
    return vocab, text


def _gpt2_with(merges, vocab) -> Tokenizer:
    hf = _byte_level(HFTokenizer(models.BPE(vocab=vocab, merges=merges)))
    hf.add_special_tokens([AddedToken(EOT, special=True)])
    return Tokenizer(hf, "gpt2")


def _merges(tok: Tokenizer) -> list:
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in json.loads(tok.hf.to_str())["model"]["merges"]]


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def old_gpt2():
    """The tokenizer as the old loader built it: every merge starting with '#' dropped."""
    vocab, text = _assets()
    merges = [tuple(line.split(" ")) for line in text.split("\n")[1:]
              if line and not line.startswith("#")]
    assert len(merges) == GPT2_N_MERGES - len(HASH_MERGES)
    return _gpt2_with(merges, vocab)


@pytest.fixture(scope="module")
def cases():
    with open(FIXTURE, encoding="utf-8") as f:
        data = json.load(f)
    assert "tiktoken" in data["source"]
    assert len(data["cases"]) >= 400
    return data["cases"]


def _mismatches(tok, cases):
    enc = [c for c in cases if tok.encode(c["text"]) != c["ids"]]
    dec = [c for c in cases if tok.decode(c["ids"]) != c["text"]]
    return enc, dec


def test_matches_tiktoken_reference(gpt2, cases):
    enc, dec = _mismatches(gpt2, cases)
    assert not enc and not dec, (
        f"{len(enc)} of {len(cases)} cases encode differently from tiktoken, {len(dec)} decode "
        f"differently; first: {[c['text'][:40] for c in (enc + dec)[:5]]}")


def test_batch_encoding_matches_reference(gpt2, cases):
    got = gpt2.encode_batch([c["text"] for c in cases])
    bad = [c["text"][:40] for c, ids in zip(cases, got) if ids != c["ids"]]
    assert not bad, f"{len(bad)} of {len(cases)} cases differ in encode_batch: {bad[:5]}"


def test_reference_catches_the_dropped_merges(old_gpt2, cases):
    """The fixture tells the old (merge-dropping) tokenizer apart."""
    enc, _ = _mismatches(old_gpt2, cases)
    assert len(enc) >= 50


def test_explicit_ids(gpt2, old_gpt2):
    assert gpt2.encode("##") == [2235]
    assert gpt2.encode("#$") == [29953]
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([2235]) == "##" and gpt2.decode([29953]) == "#$"
    assert old_gpt2.encode("##") == [2, 2] and old_gpt2.encode("#$") == [2, 3]


def test_all_merges_loaded(gpt2):
    merges = _merges(gpt2)
    assert len(merges) == GPT2_N_MERGES == 50000
    for m in HASH_MERGES:
        assert m in merges, m
    vocab = gpt2.hf.get_vocab()
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256


def test_merges_file_parsing():
    vocab, text = _assets()
    assert text.startswith("#version")
    merges = _gpt2_merges(text, vocab)
    assert len(merges) == GPT2_N_MERGES and merges[:1] == [("Ġ", "t")]
    assert _gpt2_merges(text.split("\n", 1)[1], vocab) == merges     # no header: nothing lost
    with pytest.raises(DataError, match="49999 merges"):
        _gpt2_merges(text.rstrip("\n").rsplit("\n", 1)[0], vocab)
    with pytest.raises(DataError, match="missing"):
        _gpt2_merges(text.replace("\nĠ t\n", "\nĠ tzzzq\n", 1), vocab)


def test_vocab_hash_covers_merges(gpt2, old_gpt2):
    assert gpt2.vocab_hash() != old_gpt2.vocab_hash()
    vocab, _ = _assets()
    merges = _merges(gpt2)
    assert _gpt2_with(list(merges), vocab).vocab_hash() == gpt2.vocab_hash()
    swapped = list(merges)
    swapped[0], swapped[1] = swapped[1], swapped[0]                 # same merges, other order
    assert _gpt2_with(swapped, vocab).vocab_hash() != gpt2.vocab_hash()


def test_cache_built_with_old_tokenizer_is_not_reused(tmp_path, gpt2, old_gpt2):
    docs = ["## Heading\n\nSome text.", "Plain words only.", "#$ and ### and ########"]
    parts = {"source": "test", "split": "train"}
    fp = docs_fingerprint(docs)
    assert cache_key(parts, gpt2.vocab_hash(), fp) != cache_key(parts, old_gpt2.vocab_hash(), fp)

    old = build_or_load_cache(docs, old_gpt2, str(tmp_path), parts)
    assert not old.reused
    assert build_or_load_cache(docs, old_gpt2, str(tmp_path), parts).reused    # sanity

    new = build_or_load_cache(docs, gpt2, str(tmp_path), parts)
    assert not new.reused and new.key != old.key
    assert new.meta["vocab_hash"] == gpt2.vocab_hash()
    for i, d in enumerate(docs):
        assert new.doc(i).tolist() == gpt2.encode(d)
    assert new.doc(0).tolist() != old.doc(0).tolist()                 # "##" is one token now
    assert new.doc(0).tolist()[0] == 2235
    assert new.doc(1).tolist() == old.doc(1).tolist()
    assert build_or_load_cache(docs, gpt2, str(tmp_path), parts).reused
