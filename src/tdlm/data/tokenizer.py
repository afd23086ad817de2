"""Tokenizers without network access.

* ``gpt2``: OpenAI's GPT-2 byte-level BPE (50,257 tokens, ``<|endoftext|>`` = 50256), from the
  vendored ``assets/gpt2-encoder.json.gz`` and ``assets/gpt2-vocab.bpe.gz``.
* ``bpe-<N>`` / ``bpe-<N>k`` (``k`` = 1024, so ``bpe-8k`` has 8,192 tokens): a byte-level BPE
  trained locally with ``tokenizers`` on the training texts; ``<|endoftext|>`` (id 0) is
  EOS, BOS and padding. Training is deterministic.

As in GIDD, BOS = EOS = PAD = ``<|endoftext|>``; padding is always excluded by masks. Ids at
or above ``vocab_size`` (e.g. a [MASK] id) decode as ``[MASK]``. The literal text
``<|endoftext|>`` encodes to the EOS id (as Hugging Face's GPT-2 tokenizer does).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from typing import Iterable, Optional, Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import ConfigError, DataError
from ..utils.io import atomic_write_json, atomic_write_text

EOT = "<|endoftext|>"
MASK_TEXT = "[MASK]"
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
_BPE_RE = re.compile(r"^bpe-(\d+)(k?)$")
MIN_BPE_VOCAB = 257 + 1          # 256 bytes + <|endoftext|> + at least one merge


class Tokenizer:
    """A named wrapper around a ``tokenizers.Tokenizer`` with EOS/BOS/PAD ids."""

    def __init__(self, hf: HFTokenizer, name: str, eos_id: Optional[int] = None,
                 bos_id: Optional[int] = None, pad_id: Optional[int] = None) -> None:
        self.hf = hf
        self.name = name
        eot = hf.token_to_id(EOT)
        self.eos_id = int(eos_id if eos_id is not None else eot)
        self.bos_id = int(bos_id if bos_id is not None else self.eos_id)
        self.pad_id = int(pad_id if pad_id is not None else self.eos_id)
        self.vocab_size = int(hf.get_vocab_size(with_added_tokens=True))
        self._hash: Optional[str] = None

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    # ---- encoding ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in the Rust library)."""
        texts = list(texts)
        fast = getattr(self.hf, "encode_batch_fast", None) or self.hf.encode_batch
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Decode a list/array/tensor of ids; ids >= vocab_size (or < 0) render as [MASK]."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if 0 <= i < self.vocab_size:
                run.append(i)
                continue
            if run:
                out.append(self.hf.decode(run, skip_special_tokens=False))
                run = []
            out.append(MASK_TEXT)
        if run:
            out.append(self.hf.decode(run, skip_special_tokens=False))
        return "".join(out)

    # ---- identity, persistence -----------------------------------------------------------
    def vocab_hash(self) -> str:
        """sha256 of the ordered vocabulary (tokens by id) followed by the BPE merges."""
        if self._hash is None:
            model = json.loads(self.hf.to_str())["model"]
            vocab = self.hf.get_vocab(with_added_tokens=True)
            ordered = sorted(vocab.items(), key=lambda kv: kv[1])
            h = hashlib.sha256()
            h.update(json.dumps([t for t, _ in ordered], ensure_ascii=False).encode("utf-8"))
            h.update(json.dumps(model.get("merges", []), ensure_ascii=False).encode("utf-8"))
            self._hash = h.hexdigest()
        return self._hash

    def meta(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "bos_id": self.bos_id, "pad_id": self.pad_id, "vocab_hash": self.vocab_hash()}

    def save(self, directory: str) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_meta.json`` (atomically) to ``directory``."""
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, "tokenizer.json"), self.hf.to_str(pretty=True))
        atomic_write_json(os.path.join(directory, "tokenizer_meta.json"), self.meta())

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        path = os.path.join(directory, "tokenizer.json")
        meta_path = os.path.join(directory, "tokenizer_meta.json")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            hf = HFTokenizer.from_file(path)
        except FileNotFoundError as e:
            raise ConfigError(f"no saved tokenizer in {directory}: missing "
                              f"{os.path.basename(e.filename or path)}") from None
        except Exception as e:  # corrupt JSON from either file
            raise ConfigError(f"saved tokenizer in {directory} is unreadable: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        tok = cls(hf, meta["name"], meta.get("eos_id"), meta.get("bos_id"), meta.get("pad_id"))
        if meta.get("vocab_hash") and meta["vocab_hash"] != tok.vocab_hash():
            raise ConfigError(f"saved tokenizer in {directory} does not match its metadata "
                              "(vocab_hash differs)")
        return tok


def _byte_level(hf: HFTokenizer) -> HFTokenizer:
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


GPT2_N_MERGES = 50_000


def _gpt2_merges(text: str, vocab: dict) -> list[tuple[str, str]]:
    """The merges of a GPT-2 ``vocab.bpe`` file, in rank order.

    Only the first line is dropped, and only when it is the ``#version`` header: merges may
    themselves start with ``#`` (``# #``, ``## ##``, ``#$ #$``, ...), so skipping every line
    that starts with ``#`` would lose real merges ("##" would encode to two tokens)."""
    lines = text.split("\n")
    first = 1 if lines and lines[0].startswith("#version") else 0
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(lines[first:], first + 1):      # n: 1-based line number
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise DataError(f"gpt2-vocab.bpe line {n} is not a merge of two tokens: {line!r}")
        a, b = parts
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise DataError(f"gpt2-vocab.bpe line {n}: merge {line!r} uses or makes a token "
                            "missing from gpt2-encoder.json")
        merges.append((a, b))
    if len(merges) != GPT2_N_MERGES:
        raise DataError(f"gpt2-vocab.bpe holds {len(merges)} merges, expected {GPT2_N_MERGES}")
    return merges


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer from the vendored files ("Hello world" -> [15496, 995])."""
    with gzip.open(os.path.join(ASSETS, "gpt2-encoder.json.gz"), "rt", encoding="utf-8") as f:
        vocab = json.load(f)
    with gzip.open(os.path.join(ASSETS, "gpt2-vocab.bpe.gz"), "rt", encoding="utf-8") as f:
        merges = _gpt2_merges(f.read(), vocab)
    hf = _byte_level(HFTokenizer(models.BPE(vocab=vocab, merges=merges)))
    hf.add_special_tokens([AddedToken(EOT, special=True)])
    return Tokenizer(hf, "gpt2")


def parse_bpe_size(name: str) -> int:
    """``bpe-8k`` -> 8192, ``bpe-5000`` -> 5000; ConfigError otherwise."""
    m = _BPE_RE.match(name)
    if not m:
        raise ConfigError(f"unknown tokenizer {name!r}; allowed: gpt2, bpe-<N>, bpe-<N>k "
                          "(e.g. bpe-8k)")
    size = int(m.group(1)) * (1024 if m.group(2) else 1)
    if size < MIN_BPE_VOCAB:
        raise ConfigError(f"tokenizer {name!r}: vocabulary size {size} is too small "
                          f"(minimum {MIN_BPE_VOCAB})")
    return size


def train_bpe(name: str, texts: Iterable[str]) -> Tokenizer:
    """Train a deterministic byte-level BPE of the size named by ``name``."""
    size = parse_bpe_size(name)
    hf = _byte_level(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=2, show_progress=False,
                                  special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, name)


def _saved_name(directory: str) -> Optional[str]:
    try:
        with open(os.path.join(directory, "tokenizer_meta.json"), encoding="utf-8") as f:
            return json.load(f).get("name")
    except (OSError, ValueError):
        return None


def get_tokenizer(name: str, train_texts: Optional[Iterable[str]] = None,
                  save_dir: Optional[str] = None) -> Tokenizer:
    """``gpt2`` (vendored) or ``bpe-<N>[k]``: loaded from ``save_dir`` when it already holds a
    tokenizer of that name, else trained on ``train_texts`` and saved to ``save_dir``."""
    if not isinstance(name, str):
        raise ConfigError(f"tokenizer name must be a string, got {name!r}")
    if name == "gpt2":
        return gpt2_tokenizer()
    parse_bpe_size(name)
    if save_dir is not None and _saved_name(save_dir) == name:
        return Tokenizer.load(save_dir)
    if train_texts is None:
        where = f" and {save_dir} holds none" if save_dir else ""
        raise ConfigError(f"tokenizer {name!r} must be trained: no training texts given{where}")
    tok = train_bpe(name, train_texts)
    if save_dir is not None:
        tok.save(save_dir)
    return tok
