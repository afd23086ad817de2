"""DID data layouts (tdlm.data): packed_bos, varlen (ragged batches, length bucketing, exact
resume), batch helpers (tdlm.data.batches), the bundled:paragraphs source and length
histograms. Tiny corpora in tmp_path; seconds each."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tdlm.config import DataConfig, get_preset
from tdlm.data import (BatchIterator, PackedBosDataset, PackedDataset, VarLenDataset, build_data,
                       get_tokenizer, load_documents, write_length_histogram)
from tdlm.data.batches import (collate_ragged, is_ragged, num_rows, num_tokens, row_lengths,
                               slice_rows, split_micro, to_device)
from tdlm.data.cache import build_or_load_cache
from tdlm.data.sources import paragraphs_of
from tdlm.errors import DataError

WORDS = ("the quick brown fox jumps over lazy dog while seven wizards quietly hex "
         "bright vixens and jolly zebras run past many small yellow houses").split()


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def make_docs(n: int, seed: int = 0, lo: int = 1, hi: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[j] for j in rng.integers(0, len(WORDS), size=int(rng.integers(lo, hi))))
            .capitalize() + "." for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("varlen") / "docs.jsonl", make_docs(120, seed=1))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def data_cfg(corpus, cache_dir, **kw) -> DataConfig:
    base = dict(source=str(corpus), tokenizer="gpt2", seq_len=16, val_fraction=0.2,
                cache_dir=cache_dir)
    return DataConfig(**{**base, **kw})


def varlen_dataset(gpt2, tmp_path, docs, seq_len=16) -> VarLenDataset:
    cache = build_or_load_cache(docs, gpt2, str(tmp_path), {"source": "test-varlen"})
    return VarLenDataset(cache, seq_len, gpt2.bos_id, seed=0)


# ---- packed_bos ------------------------------------------------------------------------------
def test_packed_bos_blocks_start_with_bos_and_follow_the_packed_stream(corpus, cache_dir, gpt2):
    L = 16
    bos = build_data(data_cfg(corpus, cache_dir, layout="packed_bos", seq_len=L), None)
    packed = build_data(data_cfg(corpus, cache_dir, layout="packed", seq_len=L), None)
    assert isinstance(bos.train, PackedBosDataset) and isinstance(packed.train, PackedDataset)
    cache = bos.train_cache
    # the packed stream: every document followed by EOS
    stream = np.concatenate([np.append(cache.doc(d).astype(np.int64), gpt2.eos_id)
                             for d in range(cache.n_docs)])
    assert len(bos.train) == len(stream) // (L - 1)
    body = []
    for i in range(len(bos.train)):
        ids, valid = bos.train.get(i)
        assert ids.shape == (L,) and ids.dtype == torch.long and bool(valid.all())
        assert int(ids[0]) == gpt2.bos_id
        body.append(ids[1:].numpy())
    body = np.concatenate(body)
    assert np.array_equal(body, stream[:len(body)])
    flat_packed = np.concatenate([packed.train.get(i)[0].numpy() for i in range(len(packed.train))])
    assert np.array_equal(flat_packed, stream[:len(flat_packed)])     # same stream as packed
    batch = next(BatchIterator(bos.train, 4, seed=0))
    assert set(batch) == {"input_ids", "valid"} and batch["input_ids"].shape == (4, L)
    assert bool((batch["input_ids"][:, 0] == gpt2.bos_id).all()) and bool(batch["valid"].all())
    assert bos.provenance["layout"] == "packed_bos"


# ---- varlen items ----------------------------------------------------------------------------
def test_varlen_items_are_bos_plus_document_capped(tmp_path, gpt2):
    L = 12
    docs = ["Short one.", "word " * 40, "A medium sized document with a few more words in it.", ""]
    ds = varlen_dataset(gpt2, tmp_path, docs, seq_len=L)
    assert len(ds) == 4 and ds.ragged
    lengths = ds.item_lengths()
    offsets_seen = set()
    for i, d in enumerate(docs):
        toks = gpt2.encode(d)
        for epoch in range(4):
            ids, valid = ds.get(i, epoch=epoch, seed=5)
            assert int(ids[0]) == gpt2.bos_id and bool(valid.all())
            assert len(ids) == min(len(toks) + 1, L) == lengths[i]
            o = ds.crop_offset(i, epoch, seed=5)
            assert ids[1:].tolist() == toks[o:o + L - 1]          # a window, no EOS, no pad
            assert ds.get(i, epoch=epoch, seed=5)[0].tolist() == ids.tolist()   # deterministic
            if len(toks) > L - 1:
                assert 0 <= o <= len(toks) - (L - 1)
                offsets_seen.add(o)
            else:
                assert o == 0
    assert len(offsets_seen) > 1                                  # the window moves per epoch
    assert ds.get(3)[0].tolist() == [gpt2.bos_id]                 # empty document: just BOS


def test_varlen_ragged_batches_have_consistent_cu_seqlens(corpus, cache_dir, gpt2):
    data = build_data(data_cfg(corpus, cache_dir, layout="varlen", seq_len=16), None)
    ds = data.train
    assert isinstance(ds, VarLenDataset)
    for bf in (0, 3):
        it = BatchIterator(ds, 5, seed=2, bucket_factor=bf)
        for k in range(4):
            b = it.batch(k)
            assert set(b) == {"input_ids", "cu_seqlens", "valid"} and is_ragged(b)
            cu, ids = b["cu_seqlens"], b["input_ids"]
            assert cu.dtype == ids.dtype == torch.long and b["valid"].dtype == torch.bool
            assert cu.shape == (6,) and int(cu[0]) == 0 and int(cu[-1]) == ids.numel()
            assert bool((cu[1:] > cu[:-1]).all()) and bool(b["valid"].all())
            assert num_rows(b) == 5 and num_tokens(b) == ids.numel()
            for r, (e, i) in enumerate(it.indices(k)):
                row = ids[cu[r]:cu[r + 1]]
                assert row.tolist() == ds.get(i, epoch=e, seed=2)[0].tolist()
                assert int(row[0]) == gpt2.bos_id and len(row) == ds.item_lengths()[i]


def test_seq_len_too_small_and_bucketing_a_fixed_layout_are_data_errors(corpus, cache_dir):
    for layout in ("varlen", "packed_bos"):
        with pytest.raises(DataError) as e:
            build_data(data_cfg(corpus, cache_dir, layout=layout, seq_len=1), None)
        assert "seq_len >= 2" in one_line(e)
    packed = build_data(data_cfg(corpus, cache_dir, layout="packed"), None)
    with pytest.raises(DataError) as e:
        BatchIterator(packed.train, 4, seed=0, bucket_factor=2)
    assert "varlen" in one_line(e)
    with pytest.raises(DataError) as e:
        load_documents("bundled:nonsense")
    assert "paragraphs" in one_line(e)


# ---- length bucketing ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spread_ds(tmp_path_factory, gpt2) -> VarLenDataset:
    # 103 items with lengths spread over 2..64 tokens (103: windows straddle epochs)
    docs = make_docs(103, seed=3, lo=1, hi=70)
    return varlen_dataset(gpt2, tmp_path_factory.mktemp("spread"), docs, seq_len=64)


def test_bucketed_batches_resume_exactly(spread_ds):
    ref = BatchIterator(spread_ds, 4, seed=7, bucket_factor=5)
    seq = [next(ref) for _ in range(60)]                       # > 2 epochs
    assert ref.position == 60
    for k in (0, 1, 4, 5, 13, 26, 27, 51, 59):
        it = BatchIterator(spread_ds, 4, seed=7, start_batch=k, bucket_factor=5)
        b = next(it)
        assert it.position == k + 1
        assert torch.equal(b["input_ids"], seq[k]["input_ids"])
        assert torch.equal(b["cu_seqlens"], seq[k]["cu_seqlens"])
    # a different seed gives different batches; the same seed the same ones
    other = BatchIterator(spread_ds, 4, seed=8, bucket_factor=5)
    assert any(not torch.equal(next(other)["input_ids"], seq[k]["input_ids"]) for k in range(3))


def _spread(it: BatchIterator, n_batches: int) -> float:
    lens = it.dataset.item_lengths()
    return float(np.mean([np.ptp(lens[[i for _, i in it.indices(k)]]) for k in range(n_batches)]))


def test_bucketing_reduces_the_length_spread_within_batches(spread_ds):
    n = len(spread_ds) // 4
    plain = _spread(BatchIterator(spread_ds, 4, seed=0), n)
    bucketed = _spread(BatchIterator(spread_ds, 4, seed=0, bucket_factor=8), n)
    assert bucketed < 0.5 * plain, (bucketed, plain)
    # evaluation-style (shuffle=False) bucketing sorts too
    assert _spread(BatchIterator(spread_ds, 4, seed=0, shuffle=False, bucket_factor=8), n) \
        < 0.5 * _spread(BatchIterator(spread_ds, 4, seed=0, shuffle=False), n)


@pytest.mark.parametrize("shuffle", [True, False])
def test_bucketing_keeps_every_item_exactly_once_per_epoch(spread_ds, shuffle):
    N, B, F = len(spread_ds), 4, 3
    it = BatchIterator(spread_ds, B, seed=1, shuffle=shuffle, bucket_factor=F)
    n_batches = math.ceil(3 * N / (B * F)) * F                 # whole windows, > 3 epochs
    seen = [(e, i) for k in range(n_batches) for e, i in it.indices(k)]
    assert len(seen) == len(set(seen)) == n_batches * B
    for epoch in range(3):
        assert sorted(i for e, i in seen if e == epoch) == list(range(N))
    # within each window the batches are sorted cuts: no two batches of a window interleave
    lens = spread_ds.item_lengths()
    for w in range(n_batches // F):
        cuts = sorted((sorted(lens[[i for _, i in it.indices(w * F + c)]]) for c in range(F)))
        for a, b in zip(cuts, cuts[1:]):
            assert a[-1] <= b[0]


# ---- batch helpers ---------------------------------------------------------------------------
def ragged_example(lengths=(3, 1, 5, 2, 4)):
    rows, start = [], 100
    for n in lengths:
        rows.append((torch.arange(start, start + n), torch.ones(n, dtype=torch.bool)))
        start += 100
    return collate_ragged(rows), rows


def test_slice_rows_dense_and_ragged():
    dense = {"input_ids": torch.arange(20).view(4, 5),
             "valid": torch.tensor([[1, 1, 1, 0, 0]] * 4, dtype=torch.bool)}
    s = slice_rows(dense, 1, 3)
    assert torch.equal(s["input_ids"], dense["input_ids"][1:3]) and num_rows(s) == 2
    assert num_tokens(dense) == 12 and num_tokens(s) == 6
    assert row_lengths(dense).tolist() == [3, 3, 3, 3]
    batch, rows = ragged_example()
    assert batch["cu_seqlens"].tolist() == [0, 3, 4, 9, 11, 15]
    assert num_rows(batch) == 5 and num_tokens(batch) == 15
    s = slice_rows(batch, 2, 4)
    assert s["cu_seqlens"].tolist() == [0, 5, 7]                # re-based
    assert s["input_ids"].tolist() == rows[2][0].tolist() + rows[3][0].tolist()
    assert s["valid"].shape == (7,) and num_tokens(s) == 7
    assert slice_rows(batch, 3, 99)["cu_seqlens"].tolist() == [0, 2, 6]   # clipped
    empty = slice_rows(batch, 2, 2)
    assert num_rows(empty) == 0 and empty["input_ids"].numel() == 0
    moved = to_device(batch, torch.device("cpu"))
    assert all(torch.equal(moved[k], batch[k]) for k in batch)


def test_split_micro_rows_and_token_budget():
    dense = {"input_ids": torch.arange(24).view(6, 4), "valid": torch.ones(6, 4, dtype=torch.bool)}
    parts = split_micro(dense, 2)
    assert [p["input_ids"].tolist() for p in parts] == \
        [dense["input_ids"][i:i + 2].tolist() for i in range(0, 6, 2)]
    assert len(split_micro(dense, 0)) == 1 and len(split_micro(dense, 2, max_tokens=3)) == 3
    batch, rows = ragged_example((3, 1, 5, 2, 4, 9, 1, 1))

    def check(parts, micro, budget):
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
        assert sum(num_rows(p) for p in parts) == 8
        for p in parts:
            n = num_rows(p)
            assert n >= 1 and (not micro or n <= micro)
            assert int(p["cu_seqlens"][0]) == 0 and int(p["cu_seqlens"][-1]) == p["input_ids"].numel()
            if budget and n > 1:
                assert num_tokens(p) <= budget
        return [num_rows(p) for p in parts]

    assert check(split_micro(batch, 3), 3, 0) == [3, 3, 2]          # rows only
    assert check(split_micro(batch, 0, max_tokens=6), 0, 6) == [2, 1, 2, 1, 2]  # 9 > 6 alone
    assert check(split_micro(batch, 2, max_tokens=100), 2, 100) == [2, 2, 2, 2]
    assert check(split_micro(batch, 8, max_tokens=10), 8, 10) == [3, 2, 2, 1]
    # greedy groups are maximal: adding the next row would break the budget or the row cap
    lens = row_lengths(batch).tolist()
    parts = split_micro(batch, 0, max_tokens=7)
    start = 0
    for p in parts[:-1]:
        n = num_rows(p)
        assert num_tokens(p) + lens[start + n] > 7
        start += n


# ---- paragraphs source -----------------------------------------------------------------------
def test_paragraphs_of_joins_wraps_and_merges_short_paragraphs():
    text = ("TITLE\n\nCHAPTER 1\n\nA line that wraps\nonto the next line and then\ncontinues " +
            "for a while. " * 20 + "\n\nShort tail.")
    out = paragraphs_of(text, min_chars=200, max_chars=2000)
    assert out[0].startswith("TITLE\n\nCHAPTER 1\n\nA line that wraps onto the next line")
    assert len(out) == 1 and out[0].endswith("\n\nShort tail.")   # tail joins the previous
    long = "This is a sentence. " * 300
    pieces = paragraphs_of(long, min_chars=200, max_chars=500)
    assert all(len(p) <= 500 for p in pieces) and all(p.endswith(".") for p in pieces)
    assert " ".join(pieces) == long.strip()


def test_bundled_paragraphs_source_is_deterministic():
    docs, prov = load_documents("bundled:paragraphs")
    docs2, prov2 = load_documents("bundled:paragraphs")
    assert docs == docs2 and prov == prov2 and "paragraphs" in prov
    assert len(docs) > 10_000 and all(d.strip() for d in docs)
    lengths = np.array([len(d) for d in docs])
    assert np.mean(lengths >= 200) > 0.99                          # merged up to >= 200 chars
    assert lengths.max() <= 2000 + 200 + 2
    assert all("\n" not in d.replace("\n\n", "") for d in docs[:2000])   # no hard wraps left


# ---- length histograms -----------------------------------------------------------------------
def test_length_histogram_files(tmp_path, corpus, cache_dir):
    run = tmp_path / "run"
    data = build_data(data_cfg(corpus, cache_dir, layout="varlen", seq_len=16), str(run))
    doc = json.loads((run / "length_histogram.json").read_text())
    assert (run / "length_histogram.png").stat().st_size > 1000
    for split, ds in (("train", data.train), ("val", data.val)):
        s = doc["splits"][split]
        lens = ds.item_lengths()
        assert sum(s["counts"]) == s["n"] == len(ds)
        assert s["max"] == lens.max() <= 16 and s["median"] == float(np.median(lens))
        assert abs(s["mean"] - lens.mean()) < 1e-9 and "p90" in s and s["at_cap"] == (lens >= 16).sum()
    assert len(doc["edges"]) == len(doc["splits"]["train"]["counts"]) + 1
    assert data.provenance["item_lengths"]["train"]["n"] == len(data.train)
    # fixed-length layouts write none
    run2 = tmp_path / "run2"
    build_data(data_cfg(corpus, cache_dir, layout="packed_bos"), str(run2))
    assert not (run2 / "length_histogram.json").exists()
    # the reusable writer (e.g. for generated lengths)
    j, p = write_length_histogram([3, 5, 5, 9, 40], str(tmp_path / "gen" / "lengths"),
                                  "generated", cap=40)
    g = json.loads(Path(j).read_text())
    assert g["title"] == "generated" and g["splits"]["all"]["n"] == 5
    assert g["splits"]["all"]["at_cap"] == 1 and os.path.getsize(p) > 1000


# ---- end to end: a tiny variable-length DID trains on ragged batches ---------------------------
@pytest.mark.skipif(importlib.util.find_spec("tdlm.did.dp") is None,
                    reason="the DID DP module (tdlm.did.dp) is not there yet")
def test_tiny_did_trains_on_varlen_batches(tmp_path, corpus):
    from tdlm.train.loop import train
    cfg = get_preset("did-tiny-var").override([
        "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.cond_dim=16",
        "model.max_seq_len=24", "data.seq_len=24", "data.tokenizer=gpt2",
        f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.2",
        "data.bucket_factor=2", "data.micro_tokens=40",
        "train.global_batch=4", "train.max_steps=2", "train.warmup_steps=1",
        "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
        "train.ckpt_every=100", "train.device=cpu"])
    assert cfg.data.layout == "varlen"
    res = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert res.step == 2 and len(res.losses) == 2 and all(math.isfinite(x) for x in res.losses)
    assert res.val is not None and math.isfinite(res.val["nelbo_per_token"])
    assert (tmp_path / "run" / "length_histogram.json").exists()
    assert (tmp_path / "run" / "length_histogram.png").exists()
    # exact resume on bucketed ragged batches with token-budget micro-batches
    cfg2 = type(cfg).from_dict(cfg.to_dict())
    part = train(cfg2, tmp_path / "run2", progress=False, stop_after=1, log=lambda s: None)
    assert part.step == 1
    rest = train(cfg2, tmp_path / "run2", resume=True, progress=False, log=lambda s: None)
    assert part.losses + rest.losses == res.losses
