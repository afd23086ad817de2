"""Tokenise once into memory-mapped files that later runs reuse.

A cache is three files in ``cache_dir`` named by a key (a hash of the caller's key parts,
the tokenizer's vocab_hash, and the number, total size and hash of the documents):

* ``<key>.tokens.bin``: all documents' token ids, concatenated (uint16 when the vocabulary
  has at most 65,536 entries, else uint32);
* ``<key>.offsets.npy``: int64 document starts, length n_docs + 1;
* ``<key>.meta.json``: counts and checksums, written last.

Each file is written to a temporary name and moved into place with ``os.replace``; the
metadata comes last and is checked against the other files on load, so an interrupted build
never loads as a valid cache (it is rebuilt).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..utils.io import atomic_write

CACHE_VERSION = 1
BATCH_CHARS = 4_000_000        # characters per encode_batch call
BATCH_DOCS = 4096


@dataclass
class TokenCache:
    """Token ids of a list of documents: ``tokens[offsets[i]:offsets[i+1]]`` is document i."""
    tokens: np.ndarray
    offsets: np.ndarray
    meta: dict = field(default_factory=dict)
    key: str = ""
    reused: bool = False        # True when loaded from an existing cache

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def token_counts(self, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
        """Occurrences of each token id (int64[vocab_size]), e.g. for unigram statistics."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for start in range(0, self.n_tokens, chunk):
            part = np.bincount(np.asarray(self.tokens[start:start + chunk]), minlength=vocab_size)
            counts += part[:vocab_size]
        return counts


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def docs_fingerprint(docs: Iterable[str]) -> dict:
    """Number, total UTF-8 size and sha256 of the documents (length-prefixed)."""
    h = hashlib.sha256()
    n = size = 0
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        n += 1
        size += len(b)
    return {"n_docs": n, "n_bytes": size, "sha256": h.hexdigest()}


def cache_key(key_parts: dict, vocab_hash: str, fingerprint: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "parts": key_parts, "vocab": vocab_hash,
                       "docs": fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _paths(cache_dir: str, key: str) -> tuple[str, str, str]:
    base = os.path.join(cache_dir, key)
    return base + ".tokens.bin", base + ".offsets.npy", base + ".meta.json"


from ..utils import sha256_file as _file_sha  # noqa: E402


def load_cache(cache_dir: str, key: str, verify: bool = True) -> Optional[TokenCache]:
    """The cache for ``key`` if complete and consistent, else None."""
    tok_path, off_path, meta_path = _paths(cache_dir, key)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
            return None
        dtype = np.dtype(meta["dtype"])
        n_tokens, n_docs = int(meta["n_tokens"]), int(meta["n_docs"])
        if os.path.getsize(tok_path) != n_tokens * dtype.itemsize:
            return None
        offsets = np.load(off_path, allow_pickle=False)
        if offsets.dtype != np.int64 or offsets.shape != (n_docs + 1,) or \
                int(offsets[0]) != 0 or int(offsets[-1]) != n_tokens:
            return None
        if verify and _file_sha(off_path) != meta.get("offsets_sha256"):
            return None
        if verify and meta.get("tokens_sha256") and n_tokens * dtype.itemsize <= (1 << 30) \
                and _file_sha(tok_path) != meta["tokens_sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    tokens = (np.memmap(tok_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens
              else np.zeros(0, dtype=dtype))
    return TokenCache(tokens, offsets, meta, key, reused=True)


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def build_cache(docs: Iterable[str], tokenizer, cache_dir: str, key: str,
                info: Optional[dict] = None) -> TokenCache:
    """Tokenise ``docs`` in batches and write the cache files for ``key``."""
    os.makedirs(cache_dir, exist_ok=True)
    tok_path, off_path, meta_path = _paths(cache_dir, key)
    if os.path.exists(meta_path):                 # invalidate first, then rewrite
        os.remove(meta_path)
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    lengths: list[int] = []
    h = hashlib.sha256()
    t0 = time.perf_counter()

    def write_tokens(f):
        for batch in _batches(docs):
            for ids in tokenizer.encode_batch(batch):
                arr = np.asarray(ids, dtype=dtype)
                b = arr.tobytes()
                h.update(b)
                f.write(b)
                lengths.append(len(ids))

    atomic_write(tok_path, write_tokens, binary=True)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    atomic_write(off_path, lambda f: np.save(f, offsets, allow_pickle=False), binary=True)
    meta = {"version": CACHE_VERSION, "key": key, "dtype": dtype.name,
            "n_docs": len(lengths), "n_tokens": int(offsets[-1]),
            "tokens_sha256": h.hexdigest(), "offsets_sha256": _file_sha(off_path),
            "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "vocab_hash": tokenizer.vocab_hash(),
            "seconds": round(time.perf_counter() - t0, 3), **(info or {})}
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2, sort_keys=True,
                                                         default=str).encode("utf-8")), binary=True)
    cache = load_cache(cache_dir, key, verify=False)
    if cache is None:
        raise DataError(f"token cache {os.path.join(cache_dir, key)} could not be read back")
    cache.reused = False
    return cache


def build_or_load_cache(docs: Sequence[str], tokenizer, cache_dir: str,
                        key_parts: dict) -> TokenCache:
    """Load the cache for these documents and tokenizer, or build it."""
    fp = docs_fingerprint(docs)
    key = cache_key(key_parts, tokenizer.vocab_hash(), fp)
    cache = load_cache(cache_dir, key)
    if cache is not None:
        return cache
    try:
        return build_cache(docs, tokenizer, cache_dir, key, {"key_parts": key_parts, "docs": fp})
    except OSError as e:
        raise DataError(f"cannot write token cache in {cache_dir}: {e.strerror or e}") from None
