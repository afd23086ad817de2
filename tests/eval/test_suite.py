"""Zero-shot tables (``tdlm eval --dataset/--suite``): MDLM's detokenisers, the suite over
small local fixtures in the Hugging Face formats (``save_to_disk`` folders, parquet, JSON
lines, a folder of split files; never the network), one metrics.json row per dataset, the
markdown table, and the equivalence with evaluating the preprocessed text directly."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tdlm.cli import main
from tdlm.data.eval_sets import (KNOWN_SETS, SUITES, lambada_detokenize, lm1b_detokenize,
                                 ptb_detokenize, resolve_eval_sets, scientific_detokenize,
                                 wikitext_detokenize)
from tdlm.errors import DataError
from text_corpus import WORDS, write_corpus


# ---- detokenisers --------------------------------------------------------------------------
def test_wikitext_detokenizer():
    raw = (' = = Early life = = \n The 1 @,@ 000 @-@ year old town ( founded 1 @.@ 5 ) was '
           '" big " , and the team \'s " The Sun " ; see [ 2 ] . \n')
    assert wikitext_detokenize(raw) == (
        ' == Early life ==\nThe 1,000-year old town (founded 1.5) was "big", and the '
        "team's \"The Sun\"; see [2].\n")


def test_ptb_detokenizer():
    raw = "the company 's N N shares rose \\/ fell to $ N million <unk> it does n't"
    assert ptb_detokenize(raw) == ("the company's 1 1 shares rose / fell to $1 million ? "
                                   "it doesn't")


def test_lm1b_detokenizer():
    raw = 'He said , " it is great " ( really ) at http : / / x.com and it \'s $ 5 .'
    assert lm1b_detokenize(raw) == 'He said, "it is great" (really) at http://x.com and it\'s $5.'


def test_lambada_and_scientific_detokenizers():
    assert lambada_detokenize("  \u201cHi,\u201d she said.  ") == '\n"Hi," she said.'
    assert scientific_detokenize("a ( b ) @-@ c , d .") == "a (b)-c, d."


# ---- resolving requests ------------------------------------------------------------------------
def test_suite_and_dataset_resolution(tmp_path):
    assert SUITES["mdlm-zero-shot"] == ("ptb", "wikitext103", "lm1b", "lambada", "ag_news",
                                        "pubmed", "arxiv")
    (tmp_path / "x.jsonl").write_text('{"text": "a b"}\n')
    got = resolve_eval_sets(["ptb", f"mine={tmp_path / 'x.jsonl'}", str(tmp_path / "x.jsonl")])
    assert [(g.label, g.known is not None, g.source) for g in got] == [
        ("ptb", True, None), ("mine", False, str(tmp_path / "x.jsonl")),
        ("x.jsonl", False, str(tmp_path / "x.jsonl"))]
    with pytest.raises(DataError, match="neither a known set"):
        resolve_eval_sets(["nosuchset"])
    with pytest.raises(DataError, match="given twice"):
        resolve_eval_sets(["ptb"], suite="mdlm-zero-shot")
    with pytest.raises(DataError, match="not found in --data-root"):
        resolve_eval_sets([], suite="mdlm-zero-shot", data_root=str(tmp_path))


# ---- the suite on local fixtures ---------------------------------------------------------------
def _sentences(rng, n, style=""):
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        if style == "ptb":
            s = s.replace("the ", "the N ", 1) + " 's <unk>"
        elif style == "wiki":
            s = s + " @-@ " + rng.choice(WORDS) + " , ( " + rng.choice(WORDS) + " ) ."
        elif style == "lm1b":
            s = s + " , \" " + rng.choice(WORDS) + " \" ."
        out.append(s)
    return out


def write_fixtures(root: Path) -> dict:
    """The seven collections, tiny, each in one of the formats a user would have."""
    import datasets
    rng = random.Random(1)
    text = {}

    def dd(field, splits, **extra):
        return datasets.DatasetDict({k: datasets.Dataset.from_dict({field: v, **extra.get(k, {})})
                                     for k, v in splits.items()})

    text["ptb"] = _sentences(rng, 30, "ptb")
    dd("sentence", {"train": _sentences(rng, 5), "validation": text["ptb"],
                    "test": _sentences(rng, 5)}).save_to_disk(str(root / "ptb"))
    text["wikitext103"] = [" = Title = \n", ""] + [s + " \n" for s in _sentences(rng, 30, "wiki")]
    dd("text", {"validation": text["wikitext103"], "test": ["x"]}).save_to_disk(
        str(root / "wikitext103"))
    text["lm1b"] = _sentences(rng, 30, "lm1b")
    datasets.Dataset.from_dict({"text": text["lm1b"]}).to_parquet(str(root / "lm1b.parquet"))
    text["lambada"] = ["\u201c" + s + "\u201d " for s in _sentences(rng, 20)]
    (root / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                for t in text["lambada"]))
    (root / "ag_news").mkdir()
    text["ag_news"] = _sentences(rng, 30)
    for split, rows in (("train", _sentences(rng, 5)), ("test", text["ag_news"])):
        (root / "ag_news" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": 0}) + "\n" for t in rows))
    for name in ("pubmed", "arxiv"):
        arts = [" ".join(_sentences(rng, 6, "wiki")) for _ in range(6)]
        text[name] = arts
        dd("article", {"validation": arts},
           validation={"abstract": ["short"] * 6}).save_to_disk(str(root / name))
    return text


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    corpus = write_corpus(root / "corpus")
    run = root / "run"
    sets = ["backbone.d_model=32", "backbone.n_layers=1", "backbone.n_heads=2",
            "backbone.cond_dim=16", "backbone.max_seq_len=32", "data.seq_len=32",
            "data.tokenizer=bpe-512", f"data.source={corpus}", f"data.cache_dir={root / 'cache'}",
            "train.global_batch=4", "train.max_steps=2", "train.warmup_steps=1",
            "train.eval_every=2", "train.eval_batches=1"]
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    data = root / "data"
    data.mkdir()
    return {"run": run, "data": data, "text": write_fixtures(data), "root": root}


def test_mdlm_zero_shot_suite_on_local_fixtures(env, capsys):
    capsys.readouterr()
    out = env["root"] / "zs"
    assert main(["eval", str(env["run"]), "--suite", "mdlm-zero-shot", "--data-root",
                 str(env["data"]), "--batches", "2", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads((out / "metrics.json").read_text())
    rows = res["datasets"]
    assert [r["dataset"] for r in rows] == list(SUITES["mdlm-zero-shot"])
    for r in rows:
        s = KNOWN_SETS[r["dataset"]]
        assert r["tokens"] > 0 and r["nelbo_per_token"] > 0 and r["batches"] >= 1
        assert r["field"] == s.field and r["preprocessing"] == s.preprocessing
        assert r["ppl_bound"] == pytest.approx(2.718281828459045 ** r["nelbo_per_token"])
    by = {r["dataset"]: r for r in rows}
    assert by["wikitext103"]["documents"] == 31          # the blank row is dropped
    assert by["ptb"]["documents"] == 30 and "validation" in by["ptb"]["source"]
    assert by["ag_news"]["documents"] == 30               # the test split, not train
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| dataset | split | PPL (≤) |")
    assert by["lm1b"]["split"] == "train"          # a parquet file holds one split
    for r, line in zip(rows, table[2:9]):
        assert line.startswith(f"| {r['title']} | {r['split']} | {r['ppl_bound']:.2f} |")
    assert "mdlm checkpoint" in table[-1]


def test_a_known_set_equals_its_preprocessed_text(env, tmp_path, capsys):
    """ptb=<folder> is PTB's validation split detokenised: the same numbers as evaluating
    the detokenised sentences from a plain JSONL file."""
    clean = tmp_path / "ptb_clean.jsonl"
    clean.write_text("".join(json.dumps({"text": ptb_detokenize(t)}) + "\n"
                             for t in env["text"]["ptb"]))
    capsys.readouterr()
    assert main(["eval", str(env["run"]), "--dataset", f"ptb=hf:{env['data'] / 'ptb'}",
                 "--dataset", f"plain={clean}", "--batches", "3", "--json",
                 "--out", str(tmp_path / "o")]) == 0
    a, b = json.loads(capsys.readouterr().out)["datasets"]
    assert a["preprocessing"] == "ptb_detokenize" and b["preprocessing"] == "none"
    for k in ("nelbo_per_token", "tokens", "documents", "stderr_per_token"):
        assert a[k] == b[k], k
    # the default folder is <run>/eval/datasets, and the plain table is printed
    assert main(["eval", str(env["run"]), "--dataset", f"plain={clean}", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "| plain | - |" in out
    assert (env["run"] / "eval" / "datasets" / "table.md").is_file()


def test_bad_dataset_requests_are_one_line_errors(env, capsys):
    capsys.readouterr()
    rc = main(["eval", str(env["run"]), "--dataset", "nosuchset"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "neither a known set" in err[0]
    tiny = env["root"] / "tiny.jsonl"
    tiny.write_text('{"text": "one"}\n')
    rc = main(["eval", str(env["run"]), "--dataset", f"t={tiny}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "fewer than one block" in err[0]
    rc = main(["eval", str(env["run"]), "--suite", "nosuchsuite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "unknown suite" in err[0]
    rc = main(["eval", str(env["run"]), "--data-root", str(env["data"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--data-root" in err[0]
