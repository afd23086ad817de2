"""Sequence layouts, deterministic resumable batches, and ``build_data``.

Dense layouts (batches ``{"input_ids": LongTensor[B, L], "valid": BoolTensor[B, L]}``):

* ``packed`` (MDLM "wrap"): documents joined with EOS after each one, cut into consecutive
  blocks of ``seq_len`` (the last partial block is dropped); every position is valid.
* ``packed_bos`` (DID fixed length): the same EOS-joined stream cut into consecutive blocks of
  ``seq_len - 1`` tokens, each preceded by BOS: block i is ``[BOS] + stream[i(L-1):(i+1)(L-1)]``,
  so position 0 is always BOS (with GPT-2, BOS = EOS = 50256 also occurs inside blocks, as the
  document separator); every position is valid. Needs ``seq_len >= 2``.
* ``crop_pad`` (GIDD/TDLM): one item per document, BOS + text + EOS; a longer item is cropped
  to a window of ``seq_len`` at an offset that is a pure function of (seed, epoch, index); a
  shorter one is padded with ``pad_id`` and ``valid=False`` there.

Ragged layout (batches ``{"input_ids": LongTensor[T], "cu_seqlens": LongTensor[B+1],
"valid": BoolTensor[T]}``, see ``tdlm.data.batches``):

* ``varlen`` (DID variable length): one item per document, BOS + document tokens, no EOS and
  no padding, at most ``seq_len`` tokens: a document of more than ``seq_len - 1`` tokens
  contributes a window of ``seq_len - 1`` tokens at an offset that is a pure function of
  (seed, epoch, index). An empty document is the item [BOS]. Needs ``seq_len >= 2``.

``BatchIterator`` batch k is a pure function of (seed, k), so a run resumes exactly from a
stored ``position``. With ``bucket_factor = F > 0`` (ragged datasets, which know their item
lengths) the items at the F*B consecutive positions of each window are sorted by length, cut
into F batches of similar lengths, and the F batches are taken in an order given by a
permutation seeded by (seed, window); still a pure function of (seed, k), and each item still
appears exactly once per epoch. Training buckets (``data.bucket_factor``, varlen only);
evaluation (``evaluate_nelbo``: ``shuffle=False``) does not: its batches are consecutive items,
so the result does not depend on ``bucket_factor``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import DataError
from .batches import collate_ragged
from .cache import TokenCache, build_or_load_cache, docs_fingerprint
from .histogram import length_stats, write_length_histogram
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


class PackedBosDataset:
    """The ``packed`` EOS-joined stream cut into blocks of ``seq_len - 1`` tokens, each led by
    BOS: block i = [BOS] + stream[i(L-1):(i+1)(L-1)] (the last partial block is dropped)."""

    ragged = False

    def __init__(self, cache: TokenCache, seq_len: int, bos_id: int, eos_id: int) -> None:
        if seq_len < 2:
            raise DataError(f"layout packed_bos needs seq_len >= 2 (BOS + at least one token), "
                            f"got {seq_len}")
        if bos_id is None:
            raise DataError("layout packed_bos needs a tokenizer with a BOS token")
        self.cache, self.seq_len = cache, int(seq_len)
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.stream = PackedDataset(cache, self.seq_len - 1, eos_id)   # blocks of L-1
        self.n_blocks = len(self.stream)

    def __len__(self) -> int:
        return self.n_blocks

    def get(self, i: int, epoch: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i`` as (ids LongTensor[L] with ids[0] = BOS, valid BoolTensor[L] all True)."""
        body, _ = self.stream.get(i)
        ids = torch.cat([torch.tensor([self.bos_id], dtype=torch.long), body])
        return ids, torch.ones(self.seq_len, dtype=torch.bool)

    def __getitem__(self, i: int):
        return self.get(i)


class VarLenDataset:
    """One item per document: BOS + document tokens, no EOS, no padding, at most ``seq_len``
    tokens (a longer document gives a window of ``seq_len - 1`` tokens at an offset that is a
    pure function of (seed, epoch, index)). Items have different lengths: batches are ragged."""

    ragged = True

    def __init__(self, cache: TokenCache, seq_len: int, bos_id: int, seed: int = 0) -> None:
        if seq_len < 2:
            raise DataError(f"layout varlen needs seq_len >= 2 (BOS + at least one token), "
                            f"got {seq_len}")
        if bos_id is None:
            raise DataError("layout varlen needs a tokenizer with a BOS token")
        self.cache, self.seq_len = cache, int(seq_len)
        self.bos_id, self.seed = int(bos_id), int(seed)
        self._lengths: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.cache.n_docs

    def doc_length(self, i: int) -> int:
        return int(self.cache.offsets[i + 1] - self.cache.offsets[i])

    def item_lengths(self) -> np.ndarray:
        """int64[N]: the length of every item (BOS included, after capping at ``seq_len``);
        independent of the epoch (only the window's offset changes)."""
        if self._lengths is None:
            self._lengths = np.minimum(self.cache.doc_lengths().astype(np.int64) + 1,
                                       self.seq_len)
        return self._lengths

    def crop_offset(self, i: int, epoch: int = 0, seed: Optional[int] = None) -> int:
        """Start of the window of ``seq_len - 1`` tokens inside the document (0 if it fits)."""
        n, w = self.doc_length(i), self.seq_len - 1
        if n <= w:
            return 0
        s = self.seed if seed is None else seed
        return _hash_int(s, epoch, i) % (n - w + 1)

    def get(self, i: int, epoch: int = 0, seed: Optional[int] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i`` as (ids LongTensor[n] = BOS + tokens, valid BoolTensor[n] all True)."""
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        o = self.crop_offset(i, epoch, seed)
        doc = self.cache.doc(i)[o:o + self.seq_len - 1]
        ids = np.empty(len(doc) + 1, dtype=np.int64)
        ids[0] = self.bos_id
        ids[1:] = doc
        return torch.from_numpy(ids), torch.ones(len(ids), dtype=torch.bool)

    def __getitem__(self, i: int):
        return self.get(i)


class BatchIterator:
    """Deterministic, exactly resumable batches. Batch k takes global sample positions
    k*B .. k*B+B-1; position g is item ``perm(seed, g // N)[g % N]`` (or ``g % N`` without
    shuffling) of epoch ``g // N``, so batches may straddle epochs. ``position`` counts the
    batches produced (plus ``start_batch``): store it and resume with
    ``start_batch=position``.

    ``bucket_factor = F > 0`` (datasets with ``item_lengths()``, i.e. ``varlen``): the F*B
    positions of window w = k // F are sorted by item length (ties: by position) and cut into
    F batches; batch k is cut number ``pi_w[k % F]`` of its window, with ``pi_w`` a permutation
    seeded by (seed, w) (identity when ``shuffle=False``: the cuts in increasing length).
    Batch k stays a pure function of (seed, k) and every item still appears once per epoch
    (a window may straddle two epochs, like a batch). Ragged datasets give ragged batches."""

    def __init__(self, dataset, batch_size: int, seed: int, start_batch: int = 0,
                 shuffle: bool = True, bucket_factor: int = 0) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise DataError("dataset has no items (corpus too small for the sequence length?)")
        if bucket_factor < 0:
            raise DataError(f"bucket_factor must be >= 0, got {bucket_factor}")
        if bucket_factor and not hasattr(dataset, "item_lengths"):
            raise DataError(f"length bucketing needs a variable-length dataset (layout varlen), "
                            f"not {type(dataset).__name__}")
        if start_batch < 0:
            raise DataError(f"start_batch must be >= 0, got {start_batch}")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.shuffle, self.position = shuffle, int(start_batch)
        self.bucket_factor = int(bucket_factor)
        self.ragged = bool(getattr(dataset, "ragged", False))
        self._perms: dict[int, np.ndarray] = {}
        self._windows: dict[int, list] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perms[epoch] = rng.permutation(len(self.dataset))
        return self._perms[epoch]

    def _item(self, g: int) -> tuple[int, int]:
        """(epoch, item index) at global sample position g."""
        e, r = divmod(g, len(self.dataset))
        return e, (int(self._perm(e)[r]) if self.shuffle else r)

    def _window(self, w: int) -> list[list[tuple[int, int]]]:
        """The F batches (lists of (epoch, index)) of bucketing window w, in batch order."""
        if w not in self._windows:
            if len(self._windows) >= 2:
                self._windows.pop(min(self._windows))
            F, B = self.bucket_factor, self.batch_size
            items = [self._item(g) for g in range(w * F * B, (w + 1) * F * B)]
            lengths = np.asarray(self.dataset.item_lengths())[[i for _, i in items]]
            order = np.argsort(lengths, kind="stable")
            cuts = [[items[j] for j in order[c * B:(c + 1) * B]] for c in range(F)]
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(
                    np.random.SeedSequence([self.seed, w, 0x6275636B])))
                cuts = [cuts[c] for c in rng.permutation(F)]
            self._windows[w] = cuts
        return self._windows[w]

    def indices(self, k: int) -> list[tuple[int, int]]:
        """(epoch, item index) of each row of batch k."""
        if self.bucket_factor:
            w, c = divmod(k, self.bucket_factor)
            return list(self._window(w)[c])
        return [self._item(g) for g in range(k * self.batch_size, (k + 1) * self.batch_size)]

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """Batch k: dense {"input_ids": LongTensor[B, L], "valid": BoolTensor[B, L]}, or for a
        ragged dataset {"input_ids": LongTensor[T], "cu_seqlens": LongTensor[B+1],
        "valid": BoolTensor[T]}."""
        rows = [self.dataset.get(i, epoch=e, seed=self.seed) for e, i in self.indices(k)]
        if self.ragged:
            return collate_ragged(rows)
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


def layout_dataset(cfg, cache: TokenCache, tok: Tokenizer):
    """The items of a token cache in the DataConfig's layout (``cfg.layout``, ``seq_len``;
    crop_pad and varlen draw their crops from ``split_seed``)."""
    if cfg.layout == "packed":
        return PackedDataset(cache, cfg.seq_len, tok.eos_id)
    if cfg.layout == "crop_pad":
        return CropPadDataset(cache, cfg.seq_len, tok.bos_id, tok.eos_id, tok.pad_id,
                              seed=cfg.split_seed)
    if cfg.layout == "packed_bos":
        return PackedBosDataset(cache, cfg.seq_len, tok.bos_id, tok.eos_id)
    if cfg.layout == "varlen":
        return VarLenDataset(cache, cfg.seq_len, tok.bos_id, seed=cfg.split_seed)
    raise DataError(f"unknown layout {cfg.layout!r}; allowed: packed, crop_pad, "
                    "packed_bos, varlen")


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
    train = layout_dataset(cfg, train_cache, tok) if train_cache is not None else None
    val = layout_dataset(cfg, val_cache, tok)
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
    if cfg.layout == "varlen":
        provenance["bucket_factor"] = cfg.bucket_factor
        provenance["item_lengths"] = {
            split: length_stats(ds.item_lengths(), cfg.seq_len)
            for split, ds in (("train", train), ("val", val)) if ds is not None}
    bundle = DataBundle(tok, train, val, provenance, train_cache, val_cache)
    if run_dir is not None:
        write_length_report(bundle, run_dir)
    return bundle


def write_length_report(bundle: DataBundle, run_dir: str) -> Optional[tuple[str, str]]:
    """For a variable-length layout, write ``length_histogram.json`` / ``.png`` (item lengths
    after capping, train and val) into ``run_dir``; returns the two paths (None for fixed-length
    layouts, where every item has length seq_len)."""
    splits = {name: ds.item_lengths() for name, ds in (("train", bundle.train),
                                                        ("val", bundle.val))
              if ds is not None and hasattr(ds, "item_lengths")}
    if not splits:
        return None
    prov = bundle.provenance
    seq_len = prov.get("seq_len")
    return write_length_histogram(
        splits, os.path.join(str(run_dir), "length_histogram"),
        f"item lengths (BOS + text, capped at {seq_len}): {prov.get('source')}",
        cap=seq_len, extra={"source": prov.get("source"), "layout": prov.get("layout"),
                            "seq_len": seq_len, "tokenizer": prov.get("tokenizer")})
