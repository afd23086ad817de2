"""Write tests/fixtures/v1: run folders, checkpoints and exported models in the version-1
config layout (flat ``model``/``diffusion`` sections), one per family, with the outputs the
code that wrote them gives (``expected.json``). Run it with a checkout of tdlm 37baf4c (the
last v1 writer):

    PYTHONPATH=<checkout of 37baf4c>/src python scripts/make_v1_fixture.py tests/fixtures/v1

Each run is a 1-block d=16 model on a 300-token BPE of the bundled corpus, trained 2 of its 3
steps (checkpoint at step 2, as if interrupted). ``expected.json`` holds, per family: token
ids sampled from the export (seed 0, 4 steps, 2 x 16 tokens), the export's NELBO of a fixed
text, and the training/validation records of step 3 after resuming a copy of the run.
``tests/config/test_config_versions.py`` checks that the current code reproduces all of them."""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)
import tdlm  # noqa: E402
from tdlm.config import get_preset  # noqa: E402
from tdlm.export import save_pretrained  # noqa: E402
from tdlm.train.loop import train  # noqa: E402

FIX = Path(sys.argv[1])
CACHE = Path(tempfile.mkdtemp()) / "cache"
TEXT = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April."
COMMON = ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.cond_dim=8",
          "model.max_seq_len=32", "data.seq_len=32", "data.tokenizer=bpe-300",
          f"data.cache_dir={CACHE}", "data.max_train_docs=200", "train.global_batch=2",
          "train.max_steps=3", "train.ckpt_every=2", "train.eval_every=2", "train.eval_batches=1",
          "train.warmup_steps=1", "train.log_every=1"]
FAMILY = {
    "mdlm": ["model.family=mdlm", "data.layout=packed"],
    "tdlm": ["model.family=tdlm", "model.tree_K=8", "model.tree_H=3", "data.layout=crop_pad",
             "diffusion.train_on_padding=true"],
    "ar": ["model.family=ar", "data.layout=packed", "model.time_conditioning=false"],
    "did": ["model.family=did", "model.did_length=variable", "data.layout=varlen",
            "data.source=bundled:paragraphs"],
}


def records(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


FIX.mkdir(parents=True, exist_ok=True)
expected = {}
for fam, extra in FAMILY.items():
    run, exp = FIX / f"run-{fam}", FIX / f"export-{fam}"
    for p in (run, exp):
        shutil.rmtree(p, ignore_errors=True)
    cfg = get_preset("tiny").override(COMMON + extra)
    train(cfg, run, progress=False, stop_after=2, log=lambda s: None)
    (run / "loss_curve.png").unlink(missing_ok=True)
    pipe = tdlm.load(str(run))
    save_pretrained(pipe, exp)
    pipe = tdlm.load(str(exp))
    ids = pipe.generate_ids(num=2, steps=4, seed=0, seq_len=16)
    nel = pipe.nelbo([TEXT], seed=0, repeats=2)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run, copy)
        train(cfg, copy, resume=True, progress=False, log=lambda s: None)
        after = [r for r in records(copy) if r["step"] == 3]
    expected[fam] = {"sample_ids": [list(map(int, r)) for r in ids], "nelbo": nel,
                     "step3_records": after}
    print(fam, nel["nelbo_per_token"], after)
(FIX / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
