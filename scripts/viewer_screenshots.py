"""Remake docs/viewer/{mdlm,tdlm,did}.png: train a small model of each family on a synthetic
word corpus (a few minutes on 2 CPU cores), sample with ``tdlm sample --html`` and take a
headless-Chromium screenshot of each viewer page part-way through the trajectory.

    PYTHONPATH=src python scripts/viewer_screenshots.py [--work /tmp/viewer-shots] [--steps 400]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))          # the synthetic corpus and the browser helper

from browser import find_chromium, screenshot  # noqa: E402
from text_corpus import write_corpus  # noqa: E402

from tdlm.cli import main  # noqa: E402

RUNS = {"mdlm": ("tiny", []), "tdlm": ("tdlm-tiny", ["family.K=24", "family.H=2"]),
        "did": ("did-tiny", [])}
AT = {"mdlm": 0.45, "tdlm": 0.7, "did": 0.6}     # where in the trajectory to take the picture


def sets(corpus: Path, cache: Path, steps: int, extra: list) -> list:
    kv = ["backbone.d_model=64", "backbone.n_layers=2", "backbone.n_heads=4",
          "backbone.cond_dim=32", "backbone.max_seq_len=48", "data.seq_len=48",
          "data.tokenizer=bpe-512", f"data.source={corpus}", f"data.cache_dir={cache}",
          "train.global_batch=16", f"train.max_steps={steps}", "train.warmup_steps=20",
          "train.lr=2e-3", f"train.eval_every={steps}", "train.eval_batches=2",
          f"train.ckpt_every={steps}", *extra]
    return [a for s in kv for a in ("--set", s)]


def main_(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/viewer-shots")
    ap.add_argument("--steps", type=int, default=400, help="training steps per model")
    ap.add_argument("--out", default=str(ROOT / "docs" / "viewer"))
    args = ap.parse_args(argv)
    exe, why = find_chromium()
    if exe is None:
        raise SystemExit(why)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / "corpus", n_docs=200)
    for fam, (preset, extra) in RUNS.items():
        run = work / fam
        if not (run / "checkpoints" / "latest").is_file():
            shutil.rmtree(run, ignore_errors=True)
            assert main(["train", "--preset", preset, "--out", str(run), "--no-progress",
                         *sets(corpus, work / "cache", args.steps, extra)]) == 0
        samples = work / f"samples-{fam}.jsonl"
        assert main(["sample", str(run), "--num", "3", "--steps", "48", "--seed", "1",
                     "--html", "--out", str(samples)]) == 0
        page = samples.with_suffix(".html")
        data = json.loads(re.search(r'id="data">(.*?)</script>', page.read_text(), re.S)
                          .group(1))
        frame = round(AT[fam] * (len(data["frames"]) - 1))
        ids = [f["ids"][0] for f in data["frames"]]
        while frame < len(ids) - 1 and ids[frame] == ids[frame - 1]:
            frame += 1                                   # a step where something happened
        screenshot(page.as_uri() + f"#frame={frame}", out / f"{fam}.png", 1000, 400)
        print(f"{fam}: {out / f'{fam}.png'} (frame {frame} of {len(data['frames'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
