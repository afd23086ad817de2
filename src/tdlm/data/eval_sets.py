"""Held-out text collections for zero-shot likelihood tables (``tdlm eval --dataset/--suite``).

The ``mdlm-zero-shot`` suite is the one of MDLM's zero-shot table (Sahoo et al. 2024, Table 3:
a model trained on OpenWebText evaluated on PTB, WikiText, LM1B, LAMBADA, AG News, PubMed and
arXiv), each split and text field as MDLM's ``dataloader.py`` reads them, with the same
detokenisation (this module's own implementation of those rules):

=============  ==============================================  ==========  =========  ==================
name           Hugging Face dataset (config)                   split       field      detokeniser
=============  ==============================================  ==========  =========  ==================
ptb            ptb-text-only/ptb_text_only                     validation  sentence   :func:`ptb_detokenize`
wikitext103    Salesforce/wikitext (wikitext-103-raw-v1)       validation  text       :func:`wikitext_detokenize`
lm1b           lm1b                                            test        text       :func:`lm1b_detokenize`
lambada        EleutherAI/lambada_openai (default)             test        text       :func:`lambada_detokenize`
ag_news        fancyzhx/ag_news                                test        text       none
pubmed         armanc/scientific_papers (pubmed)               validation  article    :func:`scientific_detokenize`
arxiv          armanc/scientific_papers (arxiv)                validation  article    :func:`scientific_detokenize`
=============  ==============================================  ==========  =========  ==================

Notes on fidelity. MDLM reads LAMBADA from OpenAI's ``lambada_test.jsonl`` (the same 5,153
passages as ``EleutherAI/lambada_openai``'s ``default`` config) and PTB / PubMed / arXiv through
the older script datasets ``ptb_text_only`` / ``scientific_papers`` (their maintained copies
are named above). PubMed and arXiv use the full ``article`` field as MDLM does (not the
abstract). Every row is one document, detokenised; rows that are empty after detokenisation
are dropped (MDLM keeps WikiText's blank lines, each of which adds one EOS token to its
stream). The token stream is then laid out as the evaluated checkpoint was trained
(``data.layout``, ``data.seq_len``: the checkpoint's tokenizer and layout; MDLM's ``wrap``
corresponds to ``packed``, with BOS/EOS framing of every block in MDLM).

A set's location can be replaced, keeping its split, field and detokeniser:
``ptb=hf:/data/ptb`` (a ``save_to_disk`` folder or a data file / folder), or, for a whole
suite, ``data_root``: the member ``NAME`` is read from ``<data_root>/NAME`` (a ``save_to_disk``
folder, a folder of data files, or ``NAME.jsonl`` / ``.json`` / ``.parquet``). Any other source
(``mytext=hf:owner/name#split``, a local ``.jsonl`` / ``.txt`` / folder) is evaluated as it is,
every document, no detokenisation.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..errors import DataError
from .sources import load_documents, load_hf

# ---- detokenisers (the rules of MDLM's dataloader.py, in its order) --------------------------

_WIKITEXT_RULES = (
    ("s '", "s'"),
    # kept for parity: the pattern matches a literal "/' D/" and writes the text "/'[0-9]/"
    (re.compile(r"/' [0-9]/"), "/'[0-9]/"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
    (" \u00b0 ", "\u00b0"),
    (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
)

_PTB_RULES = (
    (" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/"),
    (re.compile(r"(?<= )N(?= )"), "1"),       # every " N " (MDLM: replace, 10 passes)
    ("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?"),
)

_LM1B_RULES = (
    ("http : / / ", "http://"), ("https : / / ", "https://"),
    (re.compile(r" '(\w+)"), r"'\1"),
    (re.compile(r" (\w+) \. "), r" \1. "),
    (re.compile(r" (\w+) \.$"), r" \1."),
    (" ? ", "? "), (re.compile(r" \?$"), "?"),
    (" ! ", "! "), (re.compile(r" \!$"), "!"),
    (" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/"),
    (re.compile(r"\" ([^\"]+) \""), r'"\1"'),
    (re.compile(r"' ([^']+) '"), r"'\1'"),
    (re.compile(r"\( ([^\(\)]+) \)"), r"(\1)"),
    (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    ("$ ", "$"), ("\u00a3 ", "\u00a3"),
)


def _apply(rules, text: str) -> str:
    for pat, rep in rules:
        text = pat.sub(rep, text) if isinstance(pat, re.Pattern) else text.replace(pat, rep)
    return text


def wikitext_detokenize(text: str) -> str:
    """WikiText's tokenised form back to plain text (``@-@``, spaced punctuation, brackets
    and quotes, heading markers, ``N`` for numbers)."""
    return _apply(_WIKITEXT_RULES, text)


def ptb_detokenize(text: str) -> str:
    """Penn Treebank's tokenised form: clitics, ``\\/``, ``N`` -> 1, ``<unk>`` -> ``?``."""
    return _apply(_PTB_RULES, text)


def lm1b_detokenize(text: str) -> str:
    """One Billion Words' tokenised sentences: spaced punctuation, quotes, brackets, URLs."""
    return _apply(_LM1B_RULES, text)


def lambada_detokenize(text: str) -> str:
    """Curly double quotes made straight; the passage stripped and led by a newline."""
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific_detokenize(text: str) -> str:
    """PubMed / arXiv articles: the WikiText rules, then the LM1B rules."""
    return lm1b_detokenize(wikitext_detokenize(text))


# ---- sets and suites -------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSet:
    """One held-out collection: where it is (``path``, ``config``), which ``split`` and text
    ``field``, and the ``detokenize`` rule applied to every row."""
    name: str
    path: str
    config: Optional[str]
    split: str
    field: str
    detokenize: Optional[Callable[[str], str]] = None
    title: str = ""

    @property
    def preprocessing(self) -> str:
        return self.detokenize.__name__ if self.detokenize else "none"


MDLM_ZERO_SHOT = (
    EvalSet("ptb", "ptb-text-only/ptb_text_only", None, "validation", "sentence",
            ptb_detokenize, "PTB"),
    EvalSet("wikitext103", "Salesforce/wikitext", "wikitext-103-raw-v1", "validation", "text",
            wikitext_detokenize, "WikiText-103"),
    EvalSet("lm1b", "lm1b", None, "test", "text", lm1b_detokenize, "LM1B"),
    EvalSet("lambada", "EleutherAI/lambada_openai", "default", "test", "text",
            lambada_detokenize, "LAMBADA"),
    EvalSet("ag_news", "fancyzhx/ag_news", None, "test", "text", None, "AG News"),
    EvalSet("pubmed", "armanc/scientific_papers", "pubmed", "validation", "article",
            scientific_detokenize, "PubMed"),
    EvalSet("arxiv", "armanc/scientific_papers", "arxiv", "validation", "article",
            scientific_detokenize, "arXiv"),
)
KNOWN_SETS = {s.name: s for s in MDLM_ZERO_SHOT}
SUITES = {"mdlm-zero-shot": tuple(s.name for s in MDLM_ZERO_SHOT)}
_DATA_FILES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".jsonl.gz", ".jsonl.xz")


@dataclass(frozen=True)
class EvalSource:
    """A resolved request: the table label, the known set it follows (None: a plain source)
    and the location it is read from (None: the set's own)."""
    label: str
    known: Optional[EvalSet]
    source: Optional[str]

    def load(self) -> tuple[list[str], dict]:
        """``(documents, info)``: the detokenised non-empty rows and what was read."""
        s = self.known
        if s is None:
            docs, prov = load_documents(self.source)
            info = {"source": prov, "split": None, "field": "text", "preprocessing": "none"}
        else:
            docs, prov = _load_known(s, self.source)
            read = re.search(r" split=(\S+)", prov)      # the split actually read
            info = {"source": prov, "split": read.group(1) if read else None,
                    "field": s.field, "preprocessing": s.preprocessing}
            if s.detokenize is not None:
                docs = [s.detokenize(d) for d in docs]
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise DataError(f"dataset {self.label!r}: no non-empty text in {info['source']}")
        return docs, info


def _load_known(s: EvalSet, source: Optional[str]):
    if source is None:
        return load_hf(s.path, s.split, s.field, s.config)
    if source.startswith("hf:"):
        name, _, split = source[3:].partition("#")
        return load_hf(name, split or None, s.field, default_split=s.split)
    return load_documents(source, text_field=s.field)


def _in_root(root: str, name: str) -> Optional[str]:
    base = os.path.join(os.path.expanduser(root), name)
    if os.path.isdir(base):
        return "hf:" + base
    for ext in _DATA_FILES:
        if os.path.isfile(base + ext):
            return "hf:" + base + ext
    return None


def resolve_eval_sets(datasets: Sequence[str] = (), suite: Optional[str] = None,
                      data_root: Optional[str] = None) -> list[EvalSource]:
    """``--suite`` members, then ``--dataset`` items (``NAME``, ``NAME=SOURCE`` or a bare
    source), in order; a label given twice is an error. ``data_root`` relocates known sets
    found there (module docstring)."""
    items: list[tuple[str, Optional[str]]] = []
    if suite is not None:
        if suite not in SUITES:
            raise DataError(f"unknown suite {suite!r}; known: {', '.join(sorted(SUITES))}")
        items += [(n, None) for n in SUITES[suite]]
    for d in datasets:
        label, eq, src = d.partition("=")
        label = label.strip()
        if eq:
            if not label or not src:
                raise DataError(f"--dataset {d!r}: expected NAME, NAME=SOURCE or a source")
            items.append((label, src))
        elif label in KNOWN_SETS:
            items.append((label, None))
        elif label.startswith("hf:") or os.path.exists(os.path.expanduser(label)):
            name = label[3:] if label.startswith("hf:") else label
            items.append((os.path.basename(name.split("#")[0].rstrip("/")) or name, label))
        else:
            raise DataError(f"--dataset {label!r} is neither a known set "
                            f"({', '.join(KNOWN_SETS)}) nor a data source (hf:..., a file or "
                            "folder); name one with NAME=SOURCE")
    out, seen = [], set()
    for label, src in items:
        if label in seen:
            raise DataError(f"dataset {label!r} is given twice")
        seen.add(label)
        known = KNOWN_SETS.get(label)
        if src is None and known is not None and data_root is not None:
            src = _in_root(data_root, label)
            if src is None:
                raise DataError(f"{label!r} not found in --data-root {data_root} (expected "
                                f"a folder {label}/ or a file {label}.jsonl/.json/.parquet)")
        out.append(EvalSource(label, known, src))
    if not out:
        raise DataError("no dataset: give --dataset NAME[=SOURCE] or --suite")
    return out
