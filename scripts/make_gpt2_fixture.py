#!/usr/bin/env python3
"""Write ``tests/fixtures/gpt2_reference.json``: GPT-2 token ids from an independent encoder.

A development-time tool, not run by the tests (``tiktoken`` is not a dependency of tdlm:
``pip install tiktoken`` to run it). It builds OpenAI tiktoken's GPT-2 encoding (r50k_base)
without network access, from the vendored ``src/tdlm/data/assets/gpt2-vocab.bpe.gz`` and
``gpt2-encoder.json.gz``:

* the mergeable ranks come from tiktoken's own ``tiktoken.load.data_gym_to_mergeable_bpe_ranks``
  (data_gym's printable-bytes mapping for the byte order, ranks in merge order, and its
  cross-check that the ranks equal encoder.json's ids), fed the local files by replacing
  ``tiktoken.load.read_file_cached`` for the call; the files' sha256 are checked against the
  hashes tiktoken's ``gpt2`` encoding pins, so they are OpenAI's published files;
* the same ranks are rebuilt here step by step and cross-checked against encoder.json again
  (every merge's parts and result present, rank == id), independently of tiktoken's assert;
* the pre-tokenisation regex is ``tiktoken_ext.openai_public.r50k_pat_str``; the one special
  token is ``<|endoftext|>`` = 50256;
* the encoding's ids for "Hello world" and ``r50k_base``'s published vocabulary size are
  checked before anything is written.

Cases: hand-written strings (markdown, code, URLs, numbers, unicode, whitespace and
punctuation runs, every merge that starts with ``#``, contractions, ``<|endoftext|>`` in
text) plus passages drawn deterministically from the bundled corpus. ``<|endoftext|>`` is
encoded as the special token (``allowed_special``), as tdlm's tokenizer maps the literal text
to id 50256.

Usage::

    python scripts/make_gpt2_fixture.py [--out tests/fixtures/gpt2_reference.json]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import sys

import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "src", "tdlm", "data", "assets")
CORPUS = os.path.join(ROOT, "src", "tdlm", "data", "corpus", "bundled.jsonl.xz")
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "gpt2_reference.json")
EOT = "<|endoftext|>"
EOT_ID = 50256
# sha256 of OpenAI's GPT-2 vocab.bpe / encoder.json, as pinned in tiktoken_ext.openai_public.gpt2
VOCAB_BPE_SHA = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
N_PARAGRAPHS = 90
N_MULTI = 10


# ---- the encoding --------------------------------------------------------------------------
def _data_gym_byte_map() -> dict[str, int]:
    """data_gym's (GPT-2's bytes_to_unicode) character -> byte, as in tiktoken.load."""
    rank_to_intbyte = [b for b in range(2**8) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in rank_to_intbyte}
    n = 0
    for b in range(2**8):
        if b not in rank_to_intbyte:
            rank_to_intbyte.append(b)
            char_to_byte[chr(2**8 + n)] = b
            n += 1
    assert len(char_to_byte) == 256
    return char_to_byte


def _own_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """The mergeable ranks rebuilt step by step, cross-checked against encoder.json."""
    char_to_byte = _data_gym_byte_map()
    enc = json.loads(encoder_json)

    def raw(token: str) -> bytes:
        return bytes(char_to_byte[c] for c in token)

    lines = vocab_bpe.decode("utf-8").split("\n")
    assert lines[0].startswith("#version"), lines[0]
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    assert len(merges) == 50000, len(merges)
    ranks = {raw(c): enc[c] for c in char_to_byte}             # the 256 single bytes
    assert sorted(ranks.values()) == list(range(256))
    for n, (a, b) in enumerate(merges, 256):
        assert a in enc and b in enc and a + b in enc, (a, b)
        assert enc[a + b] == n, (a, b, enc[a + b], n)
        ranks[raw(a) + raw(b)] = n
    assert len(ranks) == 50256
    assert enc[EOT] == EOT_ID and len(enc) == 50257
    return ranks


def build_encoding() -> tiktoken.Encoding:
    files = {"vocab.bpe": gzip.open(os.path.join(ASSETS, "gpt2-vocab.bpe.gz")).read(),
             "encoder.json": gzip.open(os.path.join(ASSETS, "gpt2-encoder.json.gz")).read()}
    for name, sha in (("vocab.bpe", VOCAB_BPE_SHA), ("encoder.json", ENCODER_JSON_SHA)):
        got = hashlib.sha256(files[name]).hexdigest()
        if got != sha:
            sys.exit(f"vendored {name} is not OpenAI's GPT-2 file (sha256 {got})")

    def local_read(blobpath: str, expected_hash=None) -> bytes:
        data = files[blobpath]
        if expected_hash is not None:
            assert hashlib.sha256(data).hexdigest() == expected_hash
        return data

    saved = tiktoken.load.read_file_cached
    tiktoken.load.read_file_cached = local_read
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file="vocab.bpe", encoder_json_file="encoder.json",
            vocab_bpe_hash=VOCAB_BPE_SHA, encoder_json_hash=ENCODER_JSON_SHA)
    finally:
        tiktoken.load.read_file_cached = saved
    own = _own_ranks(files["vocab.bpe"], files["encoder.json"])
    assert ranks == own, "tiktoken's ranks differ from the step-by-step ones"
    enc = tiktoken.Encoding(name="gpt2-local", pat_str=openai_public.r50k_pat_str,
                            mergeable_ranks=ranks, special_tokens={EOT: EOT_ID},
                            explicit_n_vocab=50257)
    assert enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(EOT, allowed_special={EOT}) == [EOT_ID]
    return enc


# ---- the cases -------------------------------------------------------------------------------
def handwritten() -> list[str]:
    c: list[str] = []
    # -- the merges that start with '#', and runs of '#' / '#$'
    c += ["##", "#$", "###", "####", "########", "#" * 16, "#" * 32, "#$#$", "#$#$#$#$",
          "# #", "## ##", "## #", "# $", "#$ #$", "#### ####", "######## ########",
          "#" * 16 + " " + "#" * 16]
    c += ["#" * n for n in (1, 5, 6, 7, 9, 12, 15, 17, 24, 31, 33, 40, 48, 64, 65, 100)]
    c += [" " + "#" * n for n in (1, 2, 3, 4, 8, 16, 32)]
    c += ["#!", "#!/usr/bin/env python3", "#!/bin/bash\nset -e\n", "#$%", "$#", "#$#", "$#$#",
          "##$", "#$$", "x##y", "a#b", "C#", "F# minor", "#1", "##1", "#hashtag", "##tag",
          "###tag", "#$#$ and #$", "issue #42", "see ## 2", "#$x", "(#$)", "[##]", "'##'",
          '"###"', "#\n#\n", "##\t##", "#.#", "#-#-#", "# $ #", "#$\n#$", "#" * 8 + "$",
          "$" * 8, "##" + "$" * 3 + "##", "!#!#", "#$#$#$#$#$#$#$#$"]
    # -- markdown
    c += ["# Title", "## Title", "### Subsection", "#### Deep heading", "##### 5", "###### 6",
          "## Title\n\nSome text under the title.\n",
          "# Heading 1\n## Heading 2\n### Heading 3\n#### Heading 4\n",
          "- item one\n- item two\n  - nested item\n* star item\n+ plus item\n",
          "1. first\n2. second\n10. tenth\n",
          "| col A | col B |\n|-------|:-----:|\n| 1 | 2 |\n| three | four |\n",
          "```python\ndef f(x):\n    return x * 2\n```\n",
          "```\nplain fence\n```", "~~~bash\nls -la\n~~~",
          "**bold** and *italic* and `code` and ~~strike~~",
          "> quoted line\n> > nested quote\n",
          "[link text](https://example.com/path?q=1#frag)", "![alt](img/pic.png \"title\")",
          "---\ntitle: Front matter\ntags: [a, b]\n---\n",
          "Setext heading\n==============\n\nSub\n---\n",
          "- [ ] todo\n- [x] done\n", "***\n___\n---\n",
          "Footnote[^1].\n\n[^1]: The note.", "<details><summary>More</summary>Hidden</details>",
          "\\# not a heading", "#not-a-heading-either", "## ", "##\n", "\n## Title\n"]
    # -- code
    c += ["def main():\n    # a comment\n    x = 1  # trailing comment\n    return x\n",
          "import os\nimport sys\n\n\nclass Foo(object):\n    \"\"\"Doc.\"\"\"\n\n"
          "    def __init__(self, a, b=2, *args, **kw):\n        self.a = a\n",
          "if __name__ == \"__main__\":\n\tmain()\n",
          "for i in range(10):\n        if i % 2 == 0:\n                print(f\"{i:>4}\")\n",
          "lambda x: x ** 2 // 3 != 4 and x <= 5 or x >= 6",
          "#include <stdio.h>\n#define MAX(a, b) ((a) > (b) ? (a) : (b))\n\nint main(void) {\n"
          "    printf(\"%d\\n\", MAX(1, 2));\n    return 0;\n}\n",
          "#ifdef DEBUG\n#  pragma once\n#endif  // DEBUG\n", "#pragma omp parallel for",
          "/* block\n * comment\n */\nint *p = &x; p->y = a[i++] << 2;",
          "const f = async (a, b) => { await g(a ?? b); };\n// js comment\n",
          "let s = `template ${x + 1}`; obj?.prop!.x; a === b && c !== d || e;",
          "function foo() {\n  return [1, 2, 3].map(x => x * 2);\n}\n",
          "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
          "<html>\n  <body class=\"main\">\n    <p>Hi &amp; bye</p>\n  </body>\n</html>",
          "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}",
          "x <- c(1, 2, 3)  # R code\nmean(x)", "fn main() { let v: Vec<u8> = vec![0; 4]; }",
          "echo $HOME && cd ~/src || exit 1; $((1+2)) ${VAR:-default}",
          "    indented four\n        indented eight\n\tone tab\n\t\ttwo tabs\n",
          "regex = r'^\\s*#\\s*(\\w+)$'", "a[::2], b[1:-1], c[..., None]", "@decorator\ndef g(): ...",
          "#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n##\n## Section\n##\n"]
    # -- URLs, emails, paths
    c += ["https://www.example.com/a/b/c.html?x=1&y=two#section-3",
          "http://localhost:8080/api/v2/items/42", "ftp://files.example.org/pub/file.tar.gz",
          "Mail me at john.doe+tag@example.co.uk or admin@localhost.",
          "C:\\Users\\Name\\Documents\\file.txt", "/usr/local/lib/python3.11/site-packages/",
          "git@github.com:owner/repo.git", "www.example.com", "user:pass@host:22"]
    # -- numbers
    c += ["0", "1", "42", "123456789", "3.14159265358979", "-273.15", "1e-10", "6.022E23",
          "1,000,000", "1 000 000", "0x1F3A", "0b1010", "0o777", "$19.99", "€50", "50%",
          "2024-01-31T12:34:56Z", "12:00 pm", "+1 (555) 123-4567", "v1.2.3-rc.1",
          "1st 2nd 3rd 4th", "1/2 + 3/4 = 5/4", "ⅷ Ⅻ ½ ² ³", "١٢٣٤٥", "一二三 123"]
    # -- unicode
    c += ["café", "naïve résumé", "Crème brûlée à la façon", "Ångström Øresund Æsir",
          "Straße groß", "İstanbul ılık", "Ελληνικά κείμενα", "Русский текст, ёлка.",
          "日本語のテキストです。", "中文文本，测试。", "한국어 텍스트", "ภาษาไทย",
          "हिन्दी पाठ", "עברית מימין לשמאל", "العربية من اليمين إلى اليسار",
          "mixed עברית and English", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇺🇸🇯🇵", "I ❤️ NY", "emoji 🎉🎉🎉 party",
          "e\u0301", "a\u0308o\u0308u\u0308", "Z\u0351\u0352\u0353algo", "zero\u200bwidth",
          "join\u200dner", "non\u200cjoiner", "\ufeffBOM at start", "soft\u00adhyphen",
          "nb\u00a0space", "thin\u2009space", "ideographic\u3000space", "line\u2028sep",
          "para\u2029sep", "\u202eRTL override", "tab\u000bvt\u000cff", "ctrl\x00\x01\x1f\x7f",
          "ﬁ ligature", "Ｆｕｌｌｗｉｄｔｈ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math", "∑∫∂√∞≠≤≥", "→ ← ↑ ↓ ⇒",
          "“smart quotes” and ‘single’", "em—dash en–dash", "ellipsis…", "© ® ™ § ¶ †",
          "ʻokina", "Ǆ ǅ ǆ", "\U0001F600\U0001F601 \U0001F9D1\u200d\U0001F4BB"]
    # -- whitespace
    c += ["", " ", "  ", "   ", " " * 8, " " * 33, "\t", "\t\t", "\n", "\n\n", "\n\n\n",
          "\r\n", "\r\n\r\n", " \n", "\n ", " \t \n", "a ", "a  ", "a   ", "a\n", "a \n",
          " a", "  a", "   a", "a  b", "a   b", "a\tb", "a\t\tb", "a \tb", "a\t b",
          "a\n\nb", "a \n b", "a\n \nb", "trailing spaces   ", "trailing tab\t",
          "trailing newlines\n\n\n", "   leading and trailing   ", "x" + " " * 20 + "y",
          "\n\t\n\t\tz", "word \u00a0 word", "  \n  \n  "]
    # -- punctuation
    c += ["!!", "!!!", "???", "?!", "...", "....", "…", "--", "---", "—", "==", "===",
          "!==", "->", "=>", "<=>", "::", ":::", ";;", "**", "***", "__init__", "~~",
          "@@", "$$", "%%", "&&", "||", "^^", "((()))", "[[", "]]", "{{ }}", "<<>>",
          "\"\"\"", "'''", "``", "!@#$%^&*()_+-=[]{}|;':\",./<>?", " !!", " ...", "a!!", "a...b"]
    # -- contractions
    c += ["it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S", "DON'T",
          "THEY'RE", "WE'VE", "I'M", "YOU'LL", "HE'D", "It'S", "Don'T", "'s", "'t", "'re",
          "'ve", "'m", "'ll", "'d", "'S", "'LL", "''s", "rock 'n' roll", "y'all'd've",
          "the dog's bone's", "O'Neil's", "'quoted'", "don’t (curly)", "it ' s", "we 've",
          "Shouldn't've", "'tis", "ma'am"]
    # -- long and odd words
    c += ["antidisestablishmentarianism", "pneumonoultramicroscopicsilicovolcanoconiosis",
          "Supercalifragilisticexpialidocious", "a" * 100, "ab" * 60, "xyz" * 40,
          "CamelCaseIdentifierWithManyParts", "snake_case_identifier_with_parts",
          "SCREAMING_SNAKE_CASE", "kebab-case-words-here", "Llanfairpwllgwyngyll",
          "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbbbbbbbbbbbbb",
          "ThisIsALongSentenceWithoutSpacesThatTheTokenizerMustSplitIntoManyPieces",
          "Hello world", "hello world", "HELLO WORLD", " Hello world", "Hello, World!"]
    # -- <|endoftext|> inside text, and near misses
    c += [EOT, EOT + EOT, "a" + EOT + "b", "end." + EOT, EOT + "Start", " " + EOT + " ",
          "first doc\n" + EOT + "\nsecond doc", "x " + EOT + "\n\n## Next\n",
          "<|endoftext|", "|endoftext|>", "<|endoftext |>", "<|ENDOFTEXT|>", "<|endoftext|>>",
          "<<|endoftext|>", "<|startoftext|>", "<|endoftext|>" * 3 + "tail"]
    return c


def _passages() -> list[tuple[str, list[str]]]:
    """(document id, its paragraphs) for every bundled document."""
    out = []
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.append((str(rec["id"]), rec["text"].split("\n\n")))
    return out


def _rank(*parts) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()


def corpus_cases() -> list[str]:
    """N_PARAGRAPHS single paragraphs (40..1500 characters) and N_MULTI runs of consecutive
    paragraphs (joined by their blank lines, with hard line wraps kept), picked by hash."""
    docs = _passages()
    singles = sorted(((_rank("p", d, i), p) for d, paras in docs for i, p in enumerate(paras)
                      if 40 <= len(p) <= 1500), key=lambda t: t[0])
    picked = [p for _, p in singles[:N_PARAGRAPHS]]
    multis = sorted(((_rank("m", d), paras) for d, paras in docs if len(paras) >= 3),
                    key=lambda t: t[0])
    for _, paras in multis[:N_MULTI]:
        text = ""
        for p in paras:
            if len(text) + len(p) > 1500 and text:
                break
            text += p + "\n\n"
        picked.append(text[:1800])
    return picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    enc = build_encoding()
    texts, seen = [], set()
    for t in handwritten() + corpus_cases():
        if t not in seen:
            seen.add(t)
            texts.append(t)
    cases = []
    for t in texts:
        ids = enc.encode(t, allowed_special={EOT}, disallowed_special=())
        assert enc.decode(ids) == t, repr(t)
        cases.append({"text": t, "ids": ids})
    source = (f"OpenAI tiktoken {tiktoken.__version__}: Encoding(pat_str=r50k_pat_str, "
              "mergeable_ranks=tiktoken.load.data_gym_to_mergeable_bpe_ranks(vendored "
              "gpt2-vocab.bpe, gpt2-encoder.json; sha256 checked against tiktoken's gpt2 pins), "
              "special_tokens={'<|endoftext|>': 50256}), "
              "encode(text, allowed_special={'<|endoftext|>'}); written by "
              "scripts/make_gpt2_fixture.py")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("{\"source\": " + json.dumps(source) + ",\n \"cases\": [\n")
        f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in cases))   # one per line
        f.write("\n]}\n")
    print(f"{len(cases)} cases, {os.path.getsize(args.out):,} bytes -> {args.out}")


if __name__ == "__main__":
    main()
