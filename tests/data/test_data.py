"""Tests of the data layer (tdlm.data): tokenizers, sources, caches, layouts, batches."""
from __future__ import annotations

import gzip
import json
import lzma
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tdlm.config import DataConfig
from tdlm.data import (BatchIterator, CropPadDataset, PackedDataset, Tokenizer, build_data,
                       get_tokenizer, load_documents, split_documents)
from tdlm.data import cache as cache_mod
from tdlm.data import tokenizer as tok_mod
from tdlm.data.cache import build_or_load_cache, load_cache
from tdlm.errors import ConfigError, DataError

from paths import SRC as _SRC

SRC = str(_SRC)

WORDS = ("the quick brown fox jumps over lazy dog while seven wizards quietly hex "
         "bright vixens and jolly zebras run past many small yellow houses").split()


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        k = int(rng.integers(min_words, max_words))
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=k)]
        docs.append(" ".join(words).capitalize() + ".")
    return docs


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def small_bpe():
    return get_tokenizer("bpe-320", train_texts=make_docs(200, seed=1))


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# ---- tokenizers --------------------------------------------------------------------------------
def test_gpt2_ids_and_round_trip(gpt2):
    assert gpt2.name == "gpt2"
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.eos_id, gpt2.bos_id, gpt2.pad_id) == (50257, 50256, 50256, 50256)
    text = "Héllo, wörld!\n\n  Tabs\tand émojis 🙂 — “quotes”."
    assert gpt2.decode(gpt2.encode(text)) == text
    batch = gpt2.encode_batch(["Hello world", text, ""])
    assert batch == [[15496, 995], gpt2.encode(text), []]
    # EOS renders as text; ids >= vocab_size (e.g. [MASK]) never crash; tensors accepted
    assert gpt2.decode(torch.tensor([15496, 50256, 50257, 995])) == "Hello<|endoftext|>[MASK] world"
    assert gpt2.decode(np.array([99999, -1])) == "[MASK][MASK]"
    h = gpt2.vocab_hash()
    assert len(h) == 64 and h == get_tokenizer("gpt2").vocab_hash()


def test_tokenizer_save_load(tmp_path, gpt2):
    gpt2.save(str(tmp_path))
    assert {"tokenizer.json", "tokenizer_meta.json"} <= set(os.listdir(tmp_path))
    loaded = Tokenizer.load(str(tmp_path))
    assert loaded.name == "gpt2" and loaded.vocab_hash() == gpt2.vocab_hash()
    assert loaded.encode("Hello world") == [15496, 995] and loaded.eos_id == 50256
    with pytest.raises(ConfigError) as e:
        Tokenizer.load(str(tmp_path / "nowhere"))
    one_line(e)


def test_bpe_training_deterministic_and_reused(tmp_path, monkeypatch):
    texts = make_docs(300, seed=2)
    a = get_tokenizer("bpe-300", train_texts=texts, save_dir=str(tmp_path / "a"))
    b = get_tokenizer("bpe-300", train_texts=texts)
    assert a.vocab_size == 300 and a.eos_id == a.bos_id == a.pad_id == 0
    assert a.vocab_hash() == b.vocab_hash()
    assert a.encode(texts[0]) == b.encode(texts[0])
    assert a.decode(a.encode(texts[5])) == texts[5]
    # save_dir already holds it: loaded, not retrained
    monkeypatch.setattr(tok_mod, "train_bpe", lambda *a, **k: pytest.fail("retrained"))
    c = get_tokenizer("bpe-300", train_texts=texts, save_dir=str(tmp_path / "a"))
    assert c.vocab_hash() == a.vocab_hash()
    c2 = get_tokenizer("bpe-300", save_dir=str(tmp_path / "a"))     # no texts needed
    assert c2.name == "bpe-300"
    # the same result in a fresh process (Rust hash seeds differ per process)
    path = tmp_path / "texts.json"
    path.write_text(json.dumps(texts))
    code = ("import json,sys; from tdlm.data.tokenizer import get_tokenizer; "
            f"t=get_tokenizer('bpe-300', json.load(open({str(path)!r}))); print(t.vocab_hash())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC}, check=True)
    assert out.stdout.strip() == a.vocab_hash()


def test_tokenizer_names(tmp_path):
    assert tok_mod.parse_bpe_size("bpe-8k") == 8192
    assert tok_mod.parse_bpe_size("bpe-5000") == 5000
    for bad in ("gpt3", "bpe-", "bpe-8m", "bpe-10", "BPE-8k", ""):
        with pytest.raises(ConfigError) as e:
            get_tokenizer(bad, train_texts=["x"])
        one_line(e)
    with pytest.raises(ConfigError) as e:
        get_tokenizer("bpe-8k", save_dir=str(tmp_path))     # nothing to load, nothing to train
    one_line(e)


# ---- sources -----------------------------------------------------------------------------------
def test_local_sources(tmp_path):
    (tmp_path / "one.txt").write_text("A single document.\n\nWith two paragraphs.\n")
    docs, prov = load_documents(str(tmp_path / "one.txt"))
    assert docs == ["A single document.\n\nWith two paragraphs.\n"] and "one.txt" in prov

    rows = [{"text": "first"}, {"text": "second", "x": 1}, {"text": "   "}]
    body = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    (tmp_path / "d.jsonl").write_text(body)
    assert load_documents(str(tmp_path / "d.jsonl"))[0] == ["first", "second"]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(body)
    assert load_documents(str(tmp_path / "d.jsonl.gz"))[0] == ["first", "second"]
    with lzma.open(tmp_path / "d.jsonl.xz", "wt") as f:
        f.write(json.dumps({"body": "other field"}) + "\n")
    assert load_documents(str(tmp_path / "d.jsonl.xz"), text_field="body")[0] == ["other field"]

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (folder / "a.jsonl").write_text('{"text": "ay"}\n{"text": "ay2"}\n')
    (folder / "sub" / "c.txt").write_text("sea")
    (folder / "ignored.md").write_text("not data")
    docs, prov = load_documents(str(folder))
    assert docs == ["ay", "ay2", "bee", "sea"] and prov.startswith("folder:")


def test_source_errors(tmp_path):
    def err(source, **kw) -> str:
        with pytest.raises(DataError) as e:
            load_documents(source, **kw)
        return one_line(e)

    assert "not found" in err(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n\n\t ")
    assert "empty corpus" in err(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    assert "not UTF-8" in err(str(tmp_path / "latin1.txt"))
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)
    assert "not UTF-8" in err(str(tmp_path / "blob.txt"))
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
    assert "binary" in err(str(tmp_path / "nul.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    msg = err(str(tmp_path / "bad.jsonl"))
    assert "line 2" in msg and "JSON" in msg
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    msg = err(str(tmp_path / "nofield.jsonl"))
    assert "line 2" in msg and "'text'" in msg
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    assert "not a JSON object" in err(str(tmp_path / "list.jsonl"))
    (tmp_path / "notstr.jsonl").write_text('{"text": 5}\n')
    assert "not a string" in err(str(tmp_path / "notstr.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    assert "unsupported" in err(str(tmp_path / "data.csv"))
    (tmp_path / "nothing").mkdir()
    assert "no .txt or .jsonl" in err(str(tmp_path / "nothing"))
    (tmp_path / "trunc.jsonl.xz").write_bytes(lzma.compress(b'{"text": "x"}\n')[:20])
    assert "cannot read" in err(str(tmp_path / "trunc.jsonl.xz"))
    assert "invalid data source" in err("")


def test_split_documents():
    docs = [f"doc {i}" for i in range(200)]
    tr, va = split_documents(docs, 0.1, seed=3)
    assert (tr, va) == split_documents(list(docs), 0.1, seed=3)
    assert sorted(tr + va) == sorted(docs) and not set(tr) & set(va)
    assert 5 <= len(va) <= 40
    assert split_documents(docs, 0.1, seed=4)[1] != va
    # stable across runs and machines: index i's side depends only on (seed, i)
    assert va[:3] == ["doc 26", "doc 41", "doc 61"]
    for n in (2, 3):
        tr, va = split_documents(docs[:n], 0.02, seed=0)
        assert tr and va and len(tr) + len(va) == n
        tr, va = split_documents(docs[:n], 0.49, seed=0)
        assert tr and va
    with pytest.raises(DataError) as e:
        split_documents(["only one"], 0.1, 0)
    one_line(e)


def test_bundled_corpus():
    docs, prov = load_documents("bundled")
    assert prov.startswith("bundled:")
    assert sum(len(d.encode("utf-8")) for d in docs) >= 20_000_000
    assert len(docs) > 3000 and all(d.strip() for d in docs)
    tr, va = split_documents(docs, 0.02, seed=0)
    tr2, va2 = split_documents(load_documents("bundled")[0], 0.02, seed=0)
    assert va == va2 and len(tr) == len(tr2) and len(va) > 20


# ---- Hugging Face (offline, local datasets only) -----------------------------------------------
@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache", raising=False)
    return datasets


def test_hf_offline_local_datasets(tmp_path, hf_offline):
    datasets = hf_offline
    texts = make_docs(30, seed=4)
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(30))})
    ds.save_to_disk(str(tmp_path / "saved"))
    docs, prov = load_documents(f"hf:{tmp_path / 'saved'}")
    assert len(docs) == 30 and list(docs) == texts and docs[3] == texts[3]
    assert prov.startswith("hf-disk:")
    tr, va = split_documents(docs, 0.2, seed=0)            # lazy sequence: views
    assert len(tr) + len(va) == 30 and set(tr) | set(va) == set(texts)

    dd = datasets.DatasetDict({"train": ds, "validation": ds.select(range(5))})
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    assert len(load_documents(f"hf:{tmp_path / 'saved_dict'}")[0]) == 30
    assert len(load_documents(f"hf:{tmp_path / 'saved_dict'}#validation")[0]) == 5
    with pytest.raises(DataError) as e:
        load_documents(f"hf:{tmp_path / 'saved_dict'}#nosuch")
    assert "splits" in one_line(e)

    with open(tmp_path / "local.jsonl", "w") as f:
        for t in texts[:7]:
            f.write(json.dumps({"content": t}) + "\n")
    docs, prov = load_documents(f"hf:{tmp_path / 'local.jsonl'}", text_field="content")
    assert list(docs) == texts[:7] and prov.startswith("hf-file:")
    with pytest.raises(DataError) as e:
        load_documents(f"hf:{tmp_path / 'local.jsonl'}")    # no 'text' column
    assert "'text'" in one_line(e)

    # a saved dataset drives the whole pipeline
    cfg = DataConfig(source=f"hf:{tmp_path / 'saved'}", tokenizer="gpt2", seq_len=16,
                     val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    bundle = build_data(cfg, None)
    assert bundle.provenance["n_train_docs"] + bundle.provenance["n_val_docs"] == 30


def test_hf_hub_name_offline_is_a_data_error(hf_offline):
    t = time.time()
    with pytest.raises(DataError) as e:
        load_documents("hf:no-such-owner-xyz/no-such-dataset-xyz")
    assert "could not load" in one_line(e)
    assert time.time() - t < 30
    with pytest.raises(DataError) as e:
        load_documents("hf:/definitely/not/here")
    assert "not found" in one_line(e)


# ---- token cache -------------------------------------------------------------------------------
class CountingTokenizer:
    """Wraps a Tokenizer and counts encode_batch calls."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0
        self.name, self.vocab_size = tok.name, tok.vocab_size

    def vocab_hash(self):
        return self.tok.vocab_hash()

    def encode_batch(self, texts):
        self.calls += 1
        return self.tok.encode_batch(texts)


def test_cache_build_and_reuse(tmp_path, gpt2):
    docs = make_docs(50, seed=5) + [""]
    tok = CountingTokenizer(gpt2)
    c1 = build_or_load_cache(docs, tok, str(tmp_path), {"source": "test", "split": "train"})
    assert tok.calls >= 1 and not c1.reused
    assert c1.tokens.dtype == np.uint16 and c1.offsets.dtype == np.int64
    assert c1.n_docs == 51 and len(c1.offsets) == 52 and c1.doc(50).size == 0
    for i in (0, 17, 49):
        assert c1.doc(i).tolist() == gpt2.encode(docs[i])
    files = sorted(os.listdir(tmp_path))
    mtimes = {f: os.stat(tmp_path / f).st_mtime_ns for f in files}
    calls = tok.calls
    c2 = build_or_load_cache(docs, tok, str(tmp_path), {"source": "test", "split": "train"})
    assert c2.reused and tok.calls == calls                        # not re-tokenised
    assert isinstance(c2.tokens, np.memmap)
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in files} == mtimes
    assert np.array_equal(c2.tokens, c1.tokens) and np.array_equal(c2.offsets, c1.offsets)
    counts = c2.token_counts(gpt2.vocab_size)
    assert counts.shape == (50257,) and counts.sum() == c2.n_tokens
    the = gpt2.encode(" the")[0]
    assert counts[the] > 0 and counts[the] == sum(gpt2.encode(d).count(the) for d in docs)
    # any change of key parts, documents or tokenizer gives another cache
    c3 = build_or_load_cache(docs, tok, str(tmp_path), {"source": "test", "split": "val"})
    c4 = build_or_load_cache(docs[:-2], tok, str(tmp_path), {"source": "test", "split": "train"})
    assert len({c1.key, c3.key, c4.key}) == 3 and not c3.reused and not c4.reused
    assert c1.tokens.dtype == cache_mod.token_dtype(50257)
    assert cache_mod.token_dtype(70000) == np.uint32


def test_interrupted_cache_is_not_valid(tmp_path, gpt2):
    docs = make_docs(20, seed=6)
    parts = {"source": "test"}
    c = build_or_load_cache(docs, gpt2, str(tmp_path), parts)
    tok_path, off_path, meta_path = cache_mod._paths(str(tmp_path), c.key)
    good = c.tokens.tolist()

    # 1. the build died before the metadata was written (temp file left behind)
    os.remove(meta_path)
    with open(tok_path + ".12345.tmp", "wb") as f:
        f.write(b"\x00\x01")
    assert load_cache(str(tmp_path), c.key) is None
    c2 = build_or_load_cache(docs, gpt2, str(tmp_path), parts)
    assert not c2.reused and c2.tokens.tolist() == good

    # 2. truncated token file under complete metadata
    with open(tok_path, "r+b") as f:
        f.truncate(os.path.getsize(tok_path) - 2)
    assert load_cache(str(tmp_path), c.key) is None
    c3 = build_or_load_cache(docs, gpt2, str(tmp_path), parts)
    assert not c3.reused and c3.tokens.tolist() == good

    # 3. same size, corrupted content; 4. damaged offsets; 5. garbage metadata
    with open(tok_path, "r+b") as f:
        f.write(b"\xff\xff")
    assert load_cache(str(tmp_path), c.key) is None
    build_or_load_cache(docs, gpt2, str(tmp_path), parts)
    np.save(off_path, np.zeros(3, dtype=np.int64))
    assert load_cache(str(tmp_path), c.key) is None
    build_or_load_cache(docs, gpt2, str(tmp_path), parts)
    with open(meta_path, "w") as f:
        f.write('{"version": 1, "key": ')
    assert load_cache(str(tmp_path), c.key) is None
    c6 = build_or_load_cache(docs, gpt2, str(tmp_path), parts)
    assert not c6.reused and c6.tokens.tolist() == good
    assert build_or_load_cache(docs, gpt2, str(tmp_path), parts).reused


def test_cache_write_failure_is_data_error(tmp_path, gpt2):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError) as e:
        build_or_load_cache(["a doc"], gpt2, str(blocker / "sub"), {})
    one_line(e)


# ---- layouts -----------------------------------------------------------------------------------
@pytest.fixture
def small_cache(tmp_path, small_bpe):
    docs = make_docs(40, seed=7)
    return docs, build_or_load_cache(docs, small_bpe, str(tmp_path), {"t": "layouts"})


def test_packed_layout(small_cache, small_bpe):
    docs, cache = small_cache
    eos = small_bpe.eos_id
    stream = []
    for d in docs:
        stream += small_bpe.encode(d) + [eos]
    L = 16
    ds = PackedDataset(cache, L, eos)
    assert len(ds) == len(stream) // L
    blocks = [ds.get(i) for i in range(len(ds))]
    for ids, valid in blocks:
        assert ids.dtype == torch.long and ids.shape == (L,)
        assert valid.dtype == torch.bool and bool(valid.all())
    assert torch.cat([b[0] for b in blocks]).tolist() == stream[:len(ds) * L]
    assert eos not in small_bpe.encode(docs[0])                 # EOS only between documents
    with pytest.raises(IndexError):
        ds.get(len(ds))
    assert len(PackedDataset(cache, len(stream) + 1, eos)) == 0


def test_crop_pad_layout(small_cache, small_bpe):
    docs, cache = small_cache
    bos, eos, pad = 1, small_bpe.eos_id, 2         # distinct ids to check placement
    lens = [len(small_bpe.encode(d)) for d in docs]
    L = int(np.median(lens))
    ds = CropPadDataset(cache, L, bos, eos, pad, seed=11)
    assert len(ds) == len(docs)
    n_short = n_long = 0
    for i, d in enumerate(docs):
        full = [bos] + small_bpe.encode(d) + [eos]
        ids, valid = ds.get(i)
        assert ids.shape == valid.shape == (L,)
        if len(full) <= L:
            n_short += 1
            assert ids[:len(full)].tolist() == full
            assert valid[:len(full)].all() and not valid[len(full):].any()
            assert (ids[len(full):] == pad).all()
        else:
            n_long += 1
            assert bool(valid.all())
            offsets = {ds.crop_offset(i, epoch=e) for e in range(8)}
            assert len(offsets) > 1                          # crops differ across epochs
            for e in range(3):
                o = ds.crop_offset(i, epoch=e)
                ids_e, _ = ds.get(i, epoch=e)
                assert ids_e.tolist() == full[o:o + L]       # a contiguous window
                assert torch.equal(ids_e, ds.get(i, epoch=e)[0])        # reproducible
                assert (ids_e[0] == bos) == (o == 0)
                assert (ids_e[-1] == eos) == (o + L == len(full))
            # reproducible across instances; the seed changes crops
            ds2 = CropPadDataset(cache, L, bos, eos, pad, seed=11)
            assert ds2.crop_offset(i, 3) == ds.crop_offset(i, 3)
    assert n_short and n_long
    assert any(CropPadDataset(cache, L, bos, eos, pad, seed=12).crop_offset(i, 0)
               != ds.crop_offset(i, 0) for i in range(len(docs)))
    # tiny windows and empty documents
    ids, valid = CropPadDataset(cache, 1, bos, eos, pad).get(0)
    assert ids.shape == (1,) and bool(valid.all())


def test_batch_iterator_resume(small_cache, small_bpe):
    _, cache = small_cache
    for ds in (PackedDataset(cache, 8, small_bpe.eos_id),
               CropPadDataset(cache, 24, 1, small_bpe.eos_id, 2)):
        it = BatchIterator(ds, batch_size=7, seed=5)
        first = [next(it) for _ in range(10)]
        assert it.position == 10
        assert first[0]["input_ids"].shape == (7, ds.get(0)[0].shape[0])
        assert first[0]["input_ids"].dtype == torch.long and first[0]["valid"].dtype == torch.bool
        resumed = BatchIterator(ds, batch_size=7, seed=5, start_batch=4)
        for k in range(4, 10):
            b = next(resumed)
            assert torch.equal(b["input_ids"], first[k]["input_ids"])
            assert torch.equal(b["valid"], first[k]["valid"])
        assert resumed.position == 10
        other = BatchIterator(ds, batch_size=7, seed=6)
        assert not torch.equal(next(other)["input_ids"], first[0]["input_ids"])


def test_batch_iterator_epochs():
    class Items:                                     # a dataset of known items
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def get(self, i, epoch=0, seed=0):
            return torch.tensor([i, epoch]), torch.tensor([True, True])

    n, B = 10, 3                                     # batches straddle epoch boundaries
    it = BatchIterator(Items(n), B, seed=0)
    rows = torch.cat([next(it)["input_ids"] for _ in range(20)])    # 60 rows = 6 epochs
    for e in range(6):
        chunk = rows[e * n:(e + 1) * n]
        assert sorted(chunk[:, 0].tolist()) == list(range(n))     # each item once per epoch
        assert (chunk[:, 1] == e).all()
    assert rows[:n, 0].tolist() != rows[n:2 * n, 0].tolist()       # reshuffled per epoch
    plain = BatchIterator(Items(n), B, seed=0, shuffle=False)
    assert torch.cat([next(plain)["input_ids"] for _ in range(4)])[:, 0].tolist() == \
        [i % n for i in range(12)]
    with pytest.raises(DataError):
        BatchIterator(Items(0), 2, 0)
    with pytest.raises(DataError):
        BatchIterator(Items(3), 0, 0)


# ---- build_data --------------------------------------------------------------------------------
def test_build_data_end_to_end(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(120, seed=8)))
    run_dir = tmp_path / "run"
    cfg = DataConfig(source=str(corpus), tokenizer="bpe-300", layout="crop_pad", seq_len=32,
                     val_fraction=0.1, cache_dir=str(tmp_path / "cache"), max_train_docs=90)
    b = build_data(cfg, str(run_dir))
    p = b.provenance
    assert p["tokenizer"] == "bpe-300" and p["vocab_size"] == b.tokenizer.vocab_size == 300
    assert p["vocab_hash"] == b.tokenizer.vocab_hash() and p["layout"] == "crop_pad"
    assert p["n_train_docs"] == 90 and p["n_val_docs"] >= 1 and p["seq_len"] == 32
    assert p["n_train_tokens"] > 0 and p["n_val_tokens"] > 0 and "corpus.jsonl" in p["source"]
    assert len(b.train) == 90 and isinstance(b.train, CropPadDataset)
    assert Tokenizer.load(str(run_dir)).vocab_hash() == b.tokenizer.vocab_hash()
    assert os.listdir(tmp_path / "cache" / "tokenizers")
    batch = next(BatchIterator(b.train, 4, seed=0))
    assert batch["input_ids"].shape == (4, 32) and int(batch["input_ids"].max()) < 300

    # second build: tokenizer and caches reused, nothing retrained or re-tokenised
    monkeypatch.setattr(tok_mod, "train_bpe", lambda *a, **k: pytest.fail("retrained"))
    b2 = build_data(cfg, str(tmp_path / "run2"))
    assert b2.train_cache.reused and b2.val_cache.reused
    assert b2.tokenizer.vocab_hash() == b.tokenizer.vocab_hash()

    given = build_data(cfg, None, tokenizer=b.tokenizer)        # e.g. a checkpoint's
    assert given.tokenizer is b.tokenizer and given.train_cache.reused

    packed = build_data(DataConfig(**{**cfg.__dict__, "layout": "packed"}), None)
    assert isinstance(packed.train, PackedDataset) and packed.train_cache.reused
    assert bool(packed.train.get(0)[1].all())

    with pytest.raises(DataError) as e:                  # validation split shorter than a block
        build_data(DataConfig(**{**cfg.__dict__, "layout": "packed", "seq_len": 100000}), None)
    one_line(e)


def test_build_data_bad_inputs(tmp_path):
    with pytest.raises(DataError):
        build_data(DataConfig(source=str(tmp_path / "missing"), cache_dir=str(tmp_path)), None)
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(DataError) as e:
        build_data(DataConfig(source=str(tmp_path / "one.txt"), cache_dir=str(tmp_path)), None)
    assert "at least 2 documents" in one_line(e)
    with pytest.raises(ConfigError):
        DataConfig(tokenizer="sentencepiece")


@pytest.mark.slow
def test_bundled_gpt2_tokenisation_speed(tmp_path):
    """The full bundled corpus (~6.4M GPT-2 tokens) tokenises in well under a minute."""
    docs, _ = load_documents("bundled")
    t = time.time()
    c = build_or_load_cache(docs, get_tokenizer("gpt2"), str(tmp_path), {"source": "bundled"})
    assert time.time() - t < 60 and c.n_tokens > 6_000_000


def test_validation_only_build_skips_the_train_split(tmp_path, gpt2):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60)), encoding="utf-8")
    cfg = DataConfig(source=str(src), tokenizer="gpt2", seq_len=16, val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"))
    calls = []
    real = cache_mod.build_cache

    def counting(docs, *a, **kw):
        docs = list(docs)
        calls.append(len(docs))
        return real(docs, *a, **kw)

    import tdlm.data.cache as cm
    cm.build_cache = counting
    try:
        ev = build_data(cfg, None, tokenizer=gpt2, need_train=False)
    finally:
        cm.build_cache = real
    full = build_data(cfg, None, tokenizer=gpt2)
    assert ev.train is None and ev.train_cache is None and len(calls) == 1
    assert ev.val_cache.key == full.val_cache.key and len(ev.val) == len(full.val)
    assert torch.equal(ev.val.get(0)[0], full.val.get(0)[0])
