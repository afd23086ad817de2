"""``tdlm sample --html``: one self-contained page per sampling run that animates the
trajectory (MDLM unmasking, TDLM coarse to fine, DID insertions), checked in a real headless
browser (the system Chromium; skipped with the reason when there is none): the page loads
without console errors, playing it runs to the last step, whose text is the final sample,
and screenshots at a few steps are produced."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from browser import attr_of, dump_dom, find_chromium, screenshot, text_of
from tdlm.cli import main
from text_corpus import write_corpus

STEPS = 10
RUNS = {"mdlm": ("tiny", []), "tdlm": ("tdlm-tiny", ["family.K=24", "family.H=2"]),
        "did": ("did-tiny", [])}


def tiny(corpus: Path, cache: Path, *extra: str) -> list[str]:
    sets = ["backbone.d_model=32", "backbone.n_layers=1", "backbone.n_heads=2",
            "backbone.cond_dim=16", "backbone.max_seq_len=32", "data.seq_len=32",
            "data.tokenizer=bpe-512", f"data.source={corpus}", f"data.cache_dir={cache}",
            "train.global_batch=4", "train.max_steps=2", "train.warmup_steps=1",
            "train.eval_every=2", "train.eval_batches=1", *extra]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """family -> (page, samples) from `tdlm train` + `tdlm sample --html`."""
    root = tmp_path_factory.mktemp("viewer")
    corpus = write_corpus(root / "corpus")
    out = {}
    for fam, (preset, extra) in RUNS.items():
        run = root / fam
        assert main(["train", "--preset", preset, "--out", str(run), "--no-progress",
                     *tiny(corpus, root / "cache", *extra)]) == 0
        samples = root / f"s-{fam}" / "samples.jsonl"
        assert main(["sample", str(run), "--num", "2", "--steps", str(STEPS), "--html",
                     "--out", str(samples)]) == 0
        out[fam] = (samples.with_suffix(".html"),
                    [json.loads(line) for line in samples.read_text().splitlines()])
    return out


def page_data(page: Path) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', page.read_text(),
                  re.S)
    return json.loads(m.group(1))


@pytest.mark.parametrize("fam", list(RUNS))
def test_page_is_self_contained_and_holds_the_trajectory(pages, fam):
    page, samples = pages[fam]
    src = page.read_text()
    # nothing fetched: no external scripts, styles, images, fonts or imports
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)=", src)
    assert "@import" not in src and "url(" not in src
    data = page_data(page)
    meta = json.loads(page.with_suffix(".meta.json").read_text())
    assert meta["viewer"] == str(page)
    traj = [json.loads(line) for line in
            page.with_suffix(".trajectory.jsonl").read_text().splitlines()]
    frames = data["frames"]
    assert [f["ids"] for f in frames[:len(traj)]] == [r["ids"] for r in traj]
    assert frames[-1]["ids"] == [s["ids"] for s in samples]
    assert [f["text"] for f in data["final"]] == [s["text"] for s in samples]
    if fam == "mdlm":
        assert frames[0]["initial"]
        assert [v["kind"] for v in data["labels"].values()] == ["mask"]
    if fam == "tdlm":
        kinds = {v["kind"] for v in data["labels"].values()}
        assert kinds == {"root", "node"} and traj[0]["text"][0].startswith("[MASK]")
        assert any("{" in t for r in traj for t in r["text"])     # clusters by their tokens
    if fam == "did":
        lens = [len(f["ids"][0]) for f in frames]
        assert lens == sorted(lens) and lens[-1] > lens[0]          # the text grows


@pytest.fixture(scope="module")
def chromium():
    """The browser, or a skip that says why there is none (before any run is trained)."""
    exe, why = find_chromium()
    if exe is None:
        pytest.skip(f"browser test skipped: {why}")
    return exe


def test_viewer_in_a_headless_browser(chromium, pages, tmp_path):
    n = {fam: len(page_data(page)["frames"]) for fam, (page, _) in pages.items()}
    tdlm_page, m = pages["tdlm"][0], n["tdlm"]
    jobs = {  # browser runs are independent: run them side by side
        **{("play", fam): (dump_dom, page.as_uri() + "#sample=1&play", 60 * n[fam] + 2000)
           for fam, (page, _) in pages.items()},
        ("first", "mdlm"): (dump_dom, pages["mdlm"][0].as_uri() + "#frame=0", 0),
        **{("shot", k): (screenshot, tdlm_page.as_uri() + f"#frame={k}", tmp_path / f"{k}.png")
           for k in (0, m // 2, m - 1)}}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {key: pool.submit(fn, url, arg) for key, (fn, url, arg) in jobs.items()}
        got = {key: f.result() for key, f in futures.items()}
    for fam, (page, samples) in pages.items():
        # played from the first step, the page's timers running in virtual time: it stops
        # at the last step, which shows the final text of the chosen sample
        dom, console = got[("play", fam)]
        assert console == [], (fam, console)
        assert attr_of(dom, "html", "data-errors") is None, (fam, attr_of(dom, "html", "data-errors"))
        assert attr_of(dom, "body", "data-frames") == str(n[fam])
        assert attr_of(dom, "body", "data-frame") == str(n[fam] - 1), fam
        assert attr_of(dom, "body", "data-playing") == "0"
        assert text_of(dom, "text") == samples[1]["text"], fam
    dom, console = got[("first", "mdlm")]          # the first step: all [MASK]
    assert console == [] and attr_of(dom, "body", "data-frame") == "0"
    assert set(text_of(dom, "text")) == {"\u2591"}
    blobs = [got[("shot", k)].read_bytes() for k in (0, m // 2, m - 1)]
    assert all(b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) > 2000 for b in blobs)
    assert len(set(blobs)) == 3                        # three different pictures


def test_html_needs_a_family_that_records_trajectories(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "ar"
    assert main(["train", "--preset", "ar-tiny", "--out", str(run), "--no-progress",
                 *tiny(corpus, tmp_path / "cache", "train.max_steps=1")]) == 0
    capsys.readouterr()
    rc = main(["sample", str(run), "--num", "1", "--steps", "2", "--html",
               "--out", str(tmp_path / "s.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "does not record trajectories" in err[0]
    assert not (tmp_path / "s.html").exists()
