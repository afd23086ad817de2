"""Sequence layouts, deterministic resumable batches, and ``build_data``.

* ``packed`` (MDLM "wrap"): documents joined with EOS after each one, cut into consecutive
  blocks of ``seq_len`` (the last partial block is dropped); every position is valid.
* ``crop_pad`` (GIDD/TDLM): one item per document, BOS + text + EOS; a longer item is cropped
  to a window of ``seq_len`` at an offset that is a pure function of (seed, epoch, index); a
  shorter one is padded with ``pad_id`` and ``valid=False`` there.

``BatchIterator`` batch k is a pure function of (seed, k), so a run resumes exactly from a
stored ``position``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import DataError
from .cache import TokenCache, build_or_load_cache, docs_fingerprint
from .sources import load_documents, split_documents
from .tokenizer import Tokenizer, get_tokenizer

BPE_TRAIN_MAX_CHARS = 200_000_000     # a bpe tokenizer is trained on at most this much text


def _hash_int(*parts: int) -> int:
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


class PackedDataset:
    """Documents joined with EOS (after each document), cut into blocks of ``seq_len``."""

    def __init__(self, cache: TokenCache, seq_len: int, eos_id: int) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.cache, self.seq_len, self.eos_id = cache, int(seq_len), int(eos_id)
        n_docs = cache.n_docs
        # stream position of the EOS that follows document d
        self.eos_pos = cache.offsets[1:] + np.arange(1, n_docs + 1, dtype=np.int64) - 1
        self.stream_len = cache.n_tokens + n_docs
        self.n_blocks = self.stream_len // self.seq_len

    def __len__(self) -> int:
        return self.n_blocks

    def get(self, i: int, epoch: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i`` as (ids LongTensor[L], valid BoolTensor[L] all True)."""
        if not 0 <= i < self.n_blocks:
            raise IndexError(f"block {i} out of range [0, {self.n_blocks})")
        pos = np.arange(i * self.seq_len, (i + 1) * self.seq_len, dtype=np.int64)
        k = np.searchsorted(self.eos_pos, pos, side="left")     # EOS strictly before pos
        is_eos = self.eos_pos[np.minimum(k, len(self.eos_pos) - 1)] == pos
        tok_idx = np.minimum(pos - k, max(self.cache.n_tokens - 1, 0))
        ids = np.where(is_eos, self.eos_id,
                       self.cache.tokens[tok_idx].astype(np.int64) if self.cache.n_tokens
                       else self.eos_id)
        return (torch.from_numpy(ids.astype(np.int64)),
                torch.ones(self.seq_len, dtype=torch.bool))

    def __getitem__(self, i: int):
        return self.get(i)


class CropPadDataset:
    """One item per document: BOS + text + EOS, randomly cropped or padded to ``seq_len``."""

    def __init__(self, cache: TokenCache, seq_len: int, bos_id: int, eos_id: int, pad_id: int,
                 seed: int = 0) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.cache, self.seq_len = cache, int(seq_len)
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.cache.n_docs

    def crop_offset(self, i: int, epoch: int = 0, seed: Optional[int] = None) -> int:
        """Start of the window in BOS + doc + EOS (0 when the item fits)."""
        n = int(self.cache.offsets[i + 1] - self.cache.offsets[i]) + 2
        if n <= self.seq_len:
            return 0
        s = self.seed if seed is None else seed
        return _hash_int(s, epoch, i) % (n - self.seq_len + 1)

    def get(self, i: int, epoch: int = 0, seed: Optional[int] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        L = self.seq_len
        doc = self.cache.doc(i)
        n = len(doc) + 2
        ids = np.full(L, self.pad_id, dtype=np.int64)
        valid = np.zeros(L, dtype=bool)
        o = self.crop_offset(i, epoch, seed)
        end = min(n, o + L)                      # window [o, end) of BOS + doc + EOS
        lo, hi = max(o, 1), min(end, n - 1)      # part of the window inside the document
        if o == 0:
            ids[0] = self.bos_id
        if hi > lo:
            ids[lo - o:hi - o] = doc[lo - 1:hi - 1]
        if end == n:
            ids[n - 1 - o] = self.eos_id
        valid[:end - o] = True
        return torch.from_numpy(ids), torch.from_numpy(valid)

    def __getitem__(self, i: int):
        return self.get(i)


class BatchIterator:
    """Deterministic, exactly resumable batches. Batch k takes global sample positions
    k*B .. k*B+B-1; position g is item ``perm(seed, g // N)[g % N]`` (or ``g % N`` without
    shuffling) of epoch ``g // N``, so batches may straddle epochs. ``position`` counts the
    batches produced (plus ``start_batch``): store it and resume with
    ``start_batch=position``."""

    def __init__(self, dataset, batch_size: int, seed: int, start_batch: int = 0,
                 shuffle: bool = True) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise DataError("dataset has no items (corpus too small for the sequence length?)")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.shuffle, self.position = shuffle, int(start_batch)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perms[epoch] = rng.permutation(len(self.dataset))
        return self._perms[epoch]

    def indices(self, k: int) -> list[tuple[int, int]]:
        """(epoch, item index) of each row of batch k."""
        n = len(self.dataset)
        out = []
        for g in range(k * self.batch_size, (k + 1) * self.batch_size):
            e, r = divmod(g, n)
            out.append((e, int(self._perm(e)[r]) if self.shuffle else r))
        return out

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """Batch k: {"input_ids": LongTensor[B, L], "valid": BoolTensor[B, L]}."""
        rows = [self.dataset.get(i, epoch=e, seed=self.seed) for e, i in self.indices(k)]
        return {"input_ids": torch.stack([r[0] for r in rows]),
                "valid": torch.stack([r[1] for r in rows])}

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        b = self.batch(self.position)
        self.position += 1
        return b

    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self.position * self.batch_size / len(self.dataset)


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: Any
    val: Any
    provenance: dict = field(default_factory=dict)
    train_cache: Optional[TokenCache] = None
    val_cache: Optional[TokenCache] = None


def _first_docs(docs: Sequence[str], max_chars: int):
    total = 0
    for d in docs:
        yield d
        total += len(d)
        if total >= max_chars:
            return


def _resolve_tokenizer(cfg, train_docs, prov: str, run_dir: Optional[str]) -> Tokenizer:
    if cfg.tokenizer == "gpt2":
        return get_tokenizer("gpt2")
    if run_dir is not None and os.path.exists(os.path.join(run_dir, "tokenizer_meta.json")):
        try:
            saved = Tokenizer.load(run_dir)
            if saved.name == cfg.tokenizer:          # resuming: keep the run's tokenizer
                return saved
        except Exception:
            pass
    fp = docs_fingerprint(_first_docs(train_docs, BPE_TRAIN_MAX_CHARS))
    tag = hashlib.sha256(f"{prov}|{fp['sha256']}|{BPE_TRAIN_MAX_CHARS}".encode()).hexdigest()[:16]
    save_dir = os.path.join(cfg.cache_path, "tokenizers", f"{cfg.tokenizer}-{tag}")
    return get_tokenizer(cfg.tokenizer, _first_docs(train_docs, BPE_TRAIN_MAX_CHARS), save_dir)


def build_data(cfg, run_dir: Optional[str] = None,
               tokenizer: Optional[Tokenizer] = None, need_train: bool = True) -> DataBundle:
    """Load, split, tokenise (cached) and lay out the data described by a DataConfig.
    ``need_train=False`` (evaluation with a given tokenizer) skips tokenising the train split;
    the bundle's ``train`` and ``train_cache`` are then None.

    The tokenizer is ``tokenizer`` when given (e.g. a checkpoint's), else gpt2 or a bpe
    tokenizer trained on the training split (reused from ``run_dir`` or the cache folder).
    With ``run_dir`` the tokenizer is saved there (tokenizer.json, tokenizer_meta.json)."""
    docs, prov = load_documents(cfg.source, cfg.text_field)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split_seed)
    if cfg.max_train_docs and len(train_docs) > cfg.max_train_docs:
        train_docs = train_docs[:cfg.max_train_docs]
    tok = tokenizer if tokenizer is not None else _resolve_tokenizer(cfg, train_docs, prov,
                                                                     run_dir)
    if run_dir is not None:
        tok.save(run_dir)
    if not need_train and tokenizer is None:
        raise ValueError("need_train=False requires a tokenizer")
    common = {"source": prov, "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}
    train_cache = (build_or_load_cache(train_docs, tok, cfg.cache_path,
                                       {**common, "split": "train",
                                        "max_train_docs": cfg.max_train_docs})
                   if need_train else None)
    val_cache = build_or_load_cache(val_docs, tok, cfg.cache_path, {**common, "split": "val"})
    if cfg.layout == "packed":
        def make(cache):
            return PackedDataset(cache, cfg.seq_len, tok.eos_id)
    elif cfg.layout == "crop_pad":
        def make(cache):
            return CropPadDataset(cache, cfg.seq_len, tok.bos_id, tok.eos_id, tok.pad_id,
                                  seed=cfg.split_seed)
    else:
        raise DataError(f"unknown layout {cfg.layout!r}; allowed: packed, crop_pad")
    train = make(train_cache) if train_cache is not None else None
    val = make(val_cache)
    for split, ds, cache in (("train", train, train_cache), ("validation", val, val_cache)):
        if ds is not None and len(ds) == 0:
            raise DataError(f"the {split} split of {cfg.source} has {cache.n_tokens} tokens, "
                            f"fewer than one block of seq_len={cfg.seq_len}")
    provenance = {
        "source": prov, "layout": cfg.layout, "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed,
        "max_train_docs": cfg.max_train_docs,
        "n_train_docs": train_cache.n_docs if train_cache else len(train_docs),
        "n_val_docs": val_cache.n_docs,
        "n_train_tokens": train_cache.n_tokens if train_cache else None,
        "n_val_tokens": val_cache.n_tokens,
        "n_train_items": len(train) if train is not None else None, "n_val_items": len(val),
        "tokenizer": tok.name, "vocab_size": tok.vocab_size, "vocab_hash": tok.vocab_hash(),
        "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id,
        "train_cache": train_cache.key if train_cache else None, "val_cache": val_cache.key,
    }
    return DataBundle(tok, train, val, provenance, train_cache, val_cache)
