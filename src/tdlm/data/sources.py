"""Where documents come from: the bundled corpus, local files, or Hugging Face datasets.

``load_documents(source)`` returns ``(documents, provenance)``. Sources:

* ``bundled``: ``corpus/bundled.jsonl.xz`` shipped with the package (see its PROVENANCE.md).
* ``bundled:paragraphs``: the bundled documents cut into passages (a variable-length corpus):
  paragraphs are the blocks between blank lines, hard line wraps inside a paragraph are joined
  into single spaces; a paragraph longer than 2000 characters (chiefly State of the Union
  addresses, stored without paragraph breaks) is cut at sentence ends into pieces of at most
  2000 characters; then, within each document, a paragraph shorter than 200 characters is
  merged (joined with a blank line) with the following one(s) until the passage has at least
  200 characters (a short remainder at a document's end joins the previous passage).
  Deterministic; the train/validation split is then made over passages.
* a local path: a ``.txt`` file (one file = one document), a ``.jsonl`` file (one JSON object
  per line, text in ``text_field``; also ``.jsonl.gz`` / ``.jsonl.xz``), or a folder (all
  ``*.txt`` and ``*.jsonl[.gz|.xz]`` files below it, in sorted order).
* ``hf:NAME[#split]``: ``datasets`` loading. Aliases: ``openwebtext`` ->
  ``Skylion007/openwebtext``; ``lm1b`` -> ``lm1b`` (one sentence per document);
  ``wikitext103`` -> ``Salesforce/wikitext``, config ``wikitext-103-raw-v1`` (lines regrouped
  into articles); ``text8`` -> ``afmck/text8`` (one string, cut into ~10,000-character
  documents at spaces). Any other ``hf:owner/name`` is passed to ``load_dataset``;
  ``hf:/local/dir`` uses ``load_from_disk`` for a ``save_to_disk`` folder, else
  ``load_dataset(dir)``; ``hf:file.jsonl|.json|.parquet|.csv|.txt`` loads that file with the
  matching builder. The split defaults to ``train`` (or the only split). Set
  ``HF_DATASETS_OFFLINE=1`` to use only the local cache.

``split_documents`` makes a deterministic document-level train/validation split.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
from typing import Iterator, Optional, Sequence

from ..errors import DataError

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
BUNDLED_PATH = os.path.join(CORPUS_DIR, "bundled.jsonl.xz")
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")

# alias -> (path, config name, text field, post-processing)
HF_ALIASES = {
    "openwebtext": ("Skylion007/openwebtext", None, "text", None),
    "lm1b": ("lm1b", None, "text", None),
    "wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "text", "wikitext"),
    "text8": ("afmck/text8", None, "text", "chunk"),
}
TEXT8_CHUNK_CHARS = 10_000


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


# ---- local files ---------------------------------------------------------------------------
def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        if path.endswith(".xz"):
            with lzma.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"cannot read {path}: {_first_line(e)}") from None


def _decode(path: str, raw: bytes) -> str:
    if b"\x00" in raw:
        raise DataError(f"{path} is not UTF-8 text (binary file: contains NUL bytes)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at "
                        f"offset {e.start})") from None


def _read_jsonl(path: str, text_field: str) -> list[str]:
    text = _decode(path, _read_bytes(path))
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno} is not a JSON object")
        if text_field not in obj:
            fields = ", ".join(sorted(map(str, obj))[:10]) or "none"
            raise DataError(f"{path}: line {lineno} has no '{text_field}' field "
                            f"(fields: {fields})")
        value = obj[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}: line {lineno}: field '{text_field}' is not a string")
        docs.append(value)
    return docs


def _read_path(path: str, text_field: str) -> list[str]:
    if path.endswith(JSONL_SUFFIXES):
        return _read_jsonl(path, text_field)
    return [_decode(path, _read_bytes(path))]


def _folder_files(folder: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in names:
            if not n.startswith(".") and n.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
                files.append(os.path.join(root, n))
    return sorted(files, key=lambda p: os.path.relpath(p, folder))


def _load_local(path: str, text_field: str) -> tuple[list[str], str]:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise DataError(f"data source not found: {path}")
    if os.path.isdir(path):
        files = _folder_files(path)
        if not files:
            raise DataError(f"no .txt or .jsonl files in folder {path}")
        docs = [d for f in files for d in _read_path(f, text_field)]
        return docs, f"folder:{path} ({len(files)} files)"
    if not path.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
        raise DataError(f"unsupported data file {path}: expected .txt, .jsonl, .jsonl.gz, "
                        ".jsonl.xz or a folder")
    return _read_path(path, text_field), f"file:{path}"


def load_bundled() -> list[dict]:
    """The bundled corpus as records {"id", "source", "title", "text"}."""
    if not os.path.exists(BUNDLED_PATH):
        raise DataError(f"bundled corpus missing: {BUNDLED_PATH} (rebuild with "
                        "scripts/build_corpus.py)")
    raw = _read_bytes(BUNDLED_PATH)
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line]


def _bundled_sha() -> str:
    h = hashlib.sha256()
    with open(BUNDLED_PATH, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- paragraphs ------------------------------------------------------------------------------
PARAGRAPH_MIN_CHARS = 200
PARAGRAPH_MAX_CHARS = 2000
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*\s+")


def _cut_long(text: str, max_chars: int) -> list[str]:
    """``text`` cut at sentence ends (else at spaces, else anywhere) into greedy pieces of at
    most ``max_chars`` characters."""
    if len(text) <= max_chars:
        return [text]
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    out, start, last_ok = [], 0, None
    bounds = ends + [len(text)]
    i = 0
    while start < len(text):
        if len(text) - start <= max_chars:
            out.append(text[start:].strip())
            break
        limit = start + max_chars
        cut = None
        while i < len(bounds) and bounds[i] <= limit:     # last sentence end within the limit
            if bounds[i] > start:
                cut = bounds[i]
            i += 1
        if cut is None:                                    # one over-long sentence
            sp = text.rfind(" ", start + 1, limit)
            cut = sp if sp > start else limit
        out.append(text[start:cut].strip())
        start = cut
        while start < len(text) and text[start] == " ":
            start += 1
    return [p for p in out if p]


def paragraphs_of(text: str, min_chars: int = PARAGRAPH_MIN_CHARS,
                  max_chars: int = PARAGRAPH_MAX_CHARS) -> list[str]:
    """One document's passages (see ``bundled:paragraphs`` in the module docstring)."""
    pieces = []
    for block in _BLANK_LINE.split(text):
        para = _SPACES.sub(" ", block).strip()
        if para:
            pieces.extend(_cut_long(para, max_chars))
    out: list[str] = []
    acc: list[str] = []
    size = 0
    for p in pieces:
        acc.append(p)
        size += len(p) + (2 if size else 0)
        if size >= min_chars:
            out.append("\n\n".join(acc))
            acc, size = [], 0
    if acc:
        rest = "\n\n".join(acc)
        if out:
            out[-1] = out[-1] + "\n\n" + rest
        else:
            out.append(rest)
    return out


def paragraph_documents(docs, min_chars: int = PARAGRAPH_MIN_CHARS,
                        max_chars: int = PARAGRAPH_MAX_CHARS) -> list[str]:
    """All documents' passages, in document order."""
    return [p for d in docs for p in paragraphs_of(d, min_chars, max_chars)]


# ---- Hugging Face ----------------------------------------------------------------------------
class HFDocuments(Sequence):
    """A lazy, read-only sequence of texts from one column of a ``datasets.Dataset``
    (Arrow, memory-mapped), so large corpora are not copied into Python strings at once."""

    def __init__(self, dataset, field: str, batch: int = 1000) -> None:
        self.dataset, self.field, self.batch = dataset, field, batch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        return self.dataset[int(i)][self.field] or ""

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.dataset), self.batch):
            for text in self.dataset[start:start + self.batch][self.field]:
                yield text or ""


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, n))
        for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _pick_split(ds, split: Optional[str], name: str, default: str = "train"):
    """``(dataset, split name)``: the requested split of a DatasetDict, else ``default`` or
    the only split."""
    if not hasattr(ds, "keys"):          # already a Dataset
        return ds, split
    keys = sorted(ds.keys())
    if split is None:
        split = default if default in keys else (keys[0] if len(keys) == 1 else None)
    if split is None or split not in keys:
        raise DataError(f"dataset {name!r} has splits {', '.join(keys)}; choose one with "
                        f"hf:{name}#SPLIT")
    return ds[split], split


def _wikitext_articles(lines) -> list[str]:
    """Regroup WikiText lines into articles at top-level headings (' = Title = ')."""
    articles, cur = [], []
    for line in lines:
        if re.match(r"^ = [^=].* = $", line.rstrip("\n")) and cur:
            articles.append("".join(cur).strip())
            cur = []
        cur.append(line)
    if cur:
        articles.append("".join(cur).strip())
    return [a for a in articles if a]


def _chunk_text(text: str, size: int = TEXT8_CHUNK_CHARS) -> list[str]:
    out, i = [], 0
    while i < len(text):
        j = min(len(text), i + size)
        if j < len(text):
            k = text.rfind(" ", i, j)
            j = k if k > i else j
        out.append(text[i:j].strip())
        i = j
    return [c for c in out if c]


def _load_hf(spec: str, text_field: str) -> tuple[Sequence[str], str]:
    name, _, split = spec.partition("#")
    return load_hf(name, split or None, text_field)


def load_hf(name: str, split: Optional[str] = None, text_field: str = "text",
            config: Optional[str] = None,
            default_split: str = "train") -> tuple[Sequence[str], str]:
    """``(documents, provenance)`` of one split of a Hugging Face dataset: ``name`` is an
    alias, a hub name (with its ``config``), a ``save_to_disk`` folder, a folder of data files
    or a data file, as ``hf:NAME#SPLIT`` describes in the module docstring; the texts come
    from ``text_field``. Without ``split``: ``default_split`` when the dataset has it, else
    its only split."""
    import datasets  # imported lazily: slow to import

    if not name:
        raise DataError("empty Hugging Face dataset name in 'hf:'")
    path, config, field, post = HF_ALIASES.get(name, (name, config, text_field, None))
    if text_field != "text":
        field = text_field
    local = os.path.expanduser(name)
    try:
        if _is_saved_dataset(local):
            ds = datasets.load_from_disk(local)
            where = f"hf-disk:{os.path.abspath(local)}"
        elif os.path.isfile(local):
            ext = local.split(".")[-2] if local.endswith((".gz", ".xz", ".bz2")) else \
                local.rsplit(".", 1)[-1]
            builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv",
                       "txt": "text"}.get(ext)
            if builder is None:
                raise DataError(f"unsupported dataset file {local}: expected .json, .jsonl, "
                                ".parquet, .csv or .txt")
            ds = datasets.load_dataset(builder, data_files=local)
            where = f"hf-file:{os.path.abspath(local)}"
        elif os.path.isdir(local):               # a folder of data files
            ds = datasets.load_dataset(local)
            where = f"hf-dir:{os.path.abspath(local)}"
        elif name.startswith((".", "/", "~")):
            raise DataError(f"data source not found: {os.path.abspath(local)}")
        else:
            ds = datasets.load_dataset(path, config)
            where = f"hf:{path}" + (f"/{config}" if config else "")
        ds, split = _pick_split(ds, split, name, default_split)
    except DataError:
        raise
    except Exception as e:  # hub/network/offline/format errors: one line for the user
        raise DataError(f"could not load Hugging Face dataset {name!r}: {_first_line(e)}") from None
    if field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no '{field}' column "
                        f"(columns: {', '.join(ds.column_names)})")
    split_name = str(getattr(ds, "split", None) or split or "train")
    fingerprint = getattr(ds, "_fingerprint", "?")
    prov = f"{where} split={split_name} field={field} fingerprint={fingerprint}"
    docs = HFDocuments(ds, field)
    if post == "wikitext":
        return _wikitext_articles(docs), prov + " (articles)"
    if post == "chunk":
        chunks = [c for t in docs for c in _chunk_text(t)]
        return chunks, prov + f" (chunks of {TEXT8_CHUNK_CHARS})"
    return docs, prov


# ---- public API ------------------------------------------------------------------------------
def load_documents(source: str, text_field: str = "text") -> tuple[Sequence[str], str]:
    """Return ``(documents, provenance)`` for ``source`` (see the module docstring).
    Whitespace-only documents are dropped; DataError if nothing is left."""
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"invalid data source {source!r}")
    if source == "bundled":
        docs: Sequence[str] = [r["text"] for r in load_bundled()]
        prov = f"bundled:{_bundled_sha()[:16]}"
    elif source == "bundled:paragraphs":
        records = load_bundled()
        docs = paragraph_documents(r["text"] for r in records)
        prov = (f"bundled:{_bundled_sha()[:16]} paragraphs: {len(records)} documents split at "
                f"blank lines, line wraps joined with spaces, paragraphs over "
                f"{PARAGRAPH_MAX_CHARS} chars cut at sentence ends, passages under "
                f"{PARAGRAPH_MIN_CHARS} chars merged with the next -> {len(docs)} passages")
    elif source.startswith("bundled:"):
        raise DataError(f"unknown bundled source {source!r}; allowed: bundled, "
                        "bundled:paragraphs")
    elif source.startswith("hf:"):
        docs, prov = _load_hf(source[3:], text_field)
    else:
        docs, prov = _load_local(source, text_field)
    if isinstance(docs, list):
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise DataError(f"empty corpus: no non-whitespace text in {source}")
    elif not any(d.strip() for d in _head(docs, 10_000)):
        raise DataError(f"empty corpus: no non-whitespace text in the first documents of {source}")
    return docs, prov


def _head(docs: Sequence[str], n: int) -> Iterator[str]:
    for i, d in enumerate(docs):
        if i >= n:
            return
        yield d


def _doc_key(seed: int, i: int) -> float:
    h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


class _Subset(Sequence):
    """A view of some documents of a lazy sequence."""

    def __init__(self, docs: Sequence[str], indices: list[int]) -> None:
        self.docs, self.indices = docs, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.docs[j] for j in self.indices[i]]
        return self.docs[self.indices[i]]

    def __iter__(self) -> Iterator[str]:
        for j in self.indices:
            yield self.docs[j]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Document indices (train, val): index i goes to validation when a hash of (seed, i)
    falls below ``val_fraction``; at least one document on each side."""
    if n < 2:
        raise DataError(f"need at least 2 documents to make a train/validation split, got {n}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    keys = [_doc_key(seed, i) for i in range(n)]
    val = [i for i in range(n) if keys[i] < val_fraction]
    if not val:                                   # smallest key goes to validation
        val = [min(range(n), key=keys.__getitem__)]
    if len(val) == n:                             # largest key stays in training
        val.remove(max(range(n), key=keys.__getitem__))
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val_set)


def split_documents(docs: Sequence[str], val_fraction: float,
                    seed: int) -> tuple[Sequence[str], Sequence[str]]:
    """Deterministic document-level split (stable across runs and machines)."""
    train_idx, val_idx = split_indices(len(docs), val_fraction, seed)
    if isinstance(docs, list):
        return [docs[i] for i in train_idx], [docs[i] for i in val_idx]
    return _Subset(docs, train_idx), _Subset(docs, val_idx)
