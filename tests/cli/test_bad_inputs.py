"""The bad-input matrix: every user error of issue #6, one parametrised test.

For each row the command must exit with status 2 (the CLI's user-error code), print exactly
one non-empty line on stderr that starts with ``error:`` and names the problem (the row's
keywords), print no traceback, and leave earlier outputs untouched: the shared trained run
(always), plus each row's own protected files; a failed ``train`` leaves no new run folder.
Rows marked ``SUB`` run the real interpreter (``python -m tdlm.cli``) in a subprocess, the
rest call ``tdlm.cli.main`` in-process (fast; the full-disk rows need monkeypatching).
Full-disk rows also check that the previous checkpoint still loads.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch

from tdlm.cli import main
from tdlm.train import checkpoint as ckpt_mod
from tdlm.train.checkpoint import load_checkpoint

from test_cli import tiny_sets, tree_hash, write_corpus  # noqa: E402

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    corpus = write_corpus(root / "corpus", n_docs=12)
    cache = root / "cache"
    run = root / "run"              # the shared tiny MDLM run (seq_len = max_seq_len = 32)
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress",
                 *tiny_sets(corpus, cache)]) == 0
    other = root / "run-bpe300"     # the same model on another vocabulary
    assert main(["train", "--preset", "tiny", "--out", str(other), "--no-progress",
                 *tiny_sets(corpus, cache, "data.tokenizer=bpe-300", "train.max_steps=1")]) == 0
    return {"root": root, "corpus": corpus, "cache": cache, "run": run, "other": other}


@dataclass
class Case:
    argv: list
    needles: tuple
    protect: list = field(default_factory=list)     # paths whose content must not change
    absent: list = field(default_factory=list)      # paths that must not exist afterwards
    post: Optional[Callable[[], None]] = None       # further checks after the command


def _train(env, out: Path, *sets: str, preset: str = "tiny") -> list:
    return ["train", "--preset", preset, "--out", str(out), "--no-progress",
            *tiny_sets(env["corpus"], env["cache"], *sets)]


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _corpus_with(tmp: Path, name: str, content: bytes) -> Path:
    d = write_corpus(tmp / "docs", n_docs=2)
    (d / name).write_bytes(content)
    return d


# ---- the rows ------------------------------------------------------------------------------------
def corpus_missing(env, tmp, mp):
    out = tmp / "out"
    return Case(_train(env, out, f"data.source={tmp / 'nope'}"), ("not found", "nope"),
                absent=[out])


def corpus_empty(env, tmp, mp):
    d = tmp / "empty"
    d.mkdir()
    (d / "a.txt").write_text("  \n\n")
    out = tmp / "out"
    return Case(_train(env, out, f"data.source={d}"), ("empty corpus",), absent=[out])


def corpus_binary(env, tmp, mp):
    d = _corpus_with(tmp, "img.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    out = tmp / "out"
    return Case(_train(env, out, f"data.source={d}"), ("binary", "img.txt"), absent=[out])


def corpus_wrong_encoding(env, tmp, mp):
    d = _corpus_with(tmp, "latin.txt", "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("latin-1"))
    out = tmp / "out"
    return Case(_train(env, out, f"data.source={d}"), ("not UTF-8", "latin.txt"), absent=[out])


def tree_file_other_vocab(env, tmp, mp):
    from tdlm.tree import VocabTree
    tree = VocabTree.from_assignment([np.arange(512) // 32, np.zeros(16, dtype=np.int64)], K=32,
                                     vocab_hash="built-for-another-vocabulary")
    f = tree.save(tmp / "other.safetensors")
    out = tmp / "out"
    return Case(_train(env, out, 'model.family="tdlm"', 'model.tree_source="file"',
                       f'model.tree_path="{f}"'), ("another tokenizer", str(f)), [f], [out])


def tree_checkpoint_other_vocab(env, tmp, mp):
    """Embeddings of a checkpoint with a larger, different vocabulary (446 > 301 tokens)
    used to be cut to the first V rows silently; now the tokenizers are compared."""
    out = tmp / "out"
    return Case(_train(env, out, "data.tokenizer=bpe-300", 'model.family="tdlm"',
                       "model.tree_K=16", "model.tree_H=3", 'model.tree_source="checkpoint"',
                       f'model.tree_path="{env["run"]}"'),
                ("another tokenizer", str(env["run"])), absent=[out])


def checkpoint_other_family(env, tmp, mp):
    samples = tmp / "s.jsonl"
    samples.write_text(json.dumps({"id": 0, "text": "a bird", "ids": [5, 6]}) + "\n")
    return Case(["genppl", str(samples), "--judge", str(env["run"])],
                ("'mdlm' model", "autoregressive"), [samples], [tmp / "s.genppl.json"])


def checkpoint_other_vocab(env, tmp, mp):
    return Case(["sample", "--model", f"H={env['run']}", "--model", f"L={env['other']}",
                 "--schedule", "H2,L2", "--steps", "4", "--out", str(tmp / "s.jsonl")],
                ("cannot be mixed", "vocab_size"), [env["other"]], [tmp / "s.jsonl"])


def unknown_preset(env, tmp, mp):
    out = tmp / "out"
    return Case(["train", "--preset", "no-such-preset", "--out", str(out)],
                ("unknown preset", "no-such-preset"), absent=[out])


def unknown_field(env, tmp, mp):
    out = tmp / "out"
    return Case(_train(env, out, "train.no_such_field=1"),
                ("unknown config field", "train.no_such_field"), absent=[out])


def negative_size(env, tmp, mp):
    out = tmp / "out"
    return Case(_train(env, out, "model.d_model=-32"), ("d_model", "> 0"), absent=[out])


def zero_size(env, tmp, mp):
    out = tmp / "out"
    return Case(_train(env, out, "train.global_batch=0"), ("global_batch", "> 0"), absent=[out])


def seq_len_above_model(env, tmp, mp):
    out = tmp / "out"
    return Case(_train(env, out, "data.seq_len=64"), ("seq_len", "max_seq_len"), absent=[out])


def sample_seq_len_above_model(env, tmp, mp):
    return Case(["sample", str(env["run"]), "--seq-len", "64", "--out", str(tmp / "s.jsonl")],
                ("--seq-len 64", "max_seq_len 32"), absent=[tmp / "s.jsonl"])


def train_zero_steps(env, tmp, mp):
    out = tmp / "out"
    return Case(_train(env, out, "train.max_steps=0"), ("max_steps", "> 0"), absent=[out])


def sample_zero_steps(env, tmp, mp):
    return Case(["sample", str(env["run"]), "--steps", "0", "--out", str(tmp / "s.jsonl")],
                ("--steps", ">= 1"), absent=[tmp / "s.jsonl"])


def schedule_wrong_total(env, tmp, mp):
    return Case(["sample", "--model", f"H={env['run']}", "--model", f"L={env['run']}",
                 "--schedule", "L10,H10", "--steps", "30", "--out", str(tmp / "s.jsonl")],
                ("L10,H10", "sum", "30"), absent=[tmp / "s.jsonl"])


def _ckpt_copy(env, tmp) -> Path:
    dst = tmp / "ckpt"
    shutil.copytree(_latest(env["run"]), dst)
    return dst


def checkpoint_truncated(env, tmp, mp):
    ck = _ckpt_copy(env, tmp)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    return Case(["eval", str(ck), "--batches", "1"], ("corrupt", "model.safetensors"), [ck],
                [tmp / "eval"])


def checkpoint_altered(env, tmp, mp):
    ck = _ckpt_copy(env, tmp)
    f = ck / "config.json"
    f.write_text(f.read_text().replace('"lr": ', '"lr": 1'))
    return Case(["sample", str(ck), "--steps", "2", "--num", "1"],
                ("corrupt", "config.json", "hash"), [ck], [tmp / "samples"])


def checkpoint_unlisted_file(env, tmp, mp):
    """A weights file the manifest does not cover (here: EMA weights slipped in) is refused,
    not loaded unverified."""
    ck = _ckpt_copy(env, tmp)
    shutil.copy(ck / "model.safetensors", ck / "ema.safetensors")
    return Case(["sample", str(ck), "--steps", "2", "--num", "1"],
                ("ema.safetensors", "not listed in manifest.json"), [ck], [tmp / "samples"])


def foreign_safetensors_file(env, tmp, mp):
    from safetensors.torch import save_file
    f = tmp / "model.safetensors"
    save_file({"weight": torch.randn(4, 4)}, str(f))
    return Case(["eval", str(f)], ("not a tdlm checkpoint", "model.safetensors"), [f])


def foreign_library_folder(env, tmp, mp):
    """A Hugging Face-style folder: config.json + model.safetensors, no tdlm manifest."""
    from safetensors.torch import save_file
    d = tmp / "hf-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    save_file({"wte.weight": torch.randn(8, 4)}, str(d / "model.safetensors"))
    return Case(["sample", str(d), "--steps", "2"], ("not a tdlm checkpoint", "hf-model"), [d])


class _Tripwire:
    """Unpickling this object creates a marker file: loading the .pt must never do that."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def foreign_torch_pickle(env, tmp, mp):
    f = tmp / "model.pt"
    marker = tmp / "UNPICKLED"
    f.write_bytes(pickle.dumps({"state_dict": _Tripwire(str(marker))}))
    return Case(["eval", str(f)], ("not a tdlm checkpoint", "model.pt"), [f], [marker])


def foreign_torch_pickle_folder(env, tmp, mp):
    d = tmp / "torch-run"
    d.mkdir()
    marker = tmp / "UNPICKLED"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(str(marker))))
    (d / "config.json").write_text("{}")
    return Case(["sample", str(d)], ("no checkpoint found", "torch-run"), [d], [marker])


def foreign_manifest(env, tmp, mp):
    ck = _ckpt_copy(env, tmp)
    m = json.loads((ck / "manifest.json").read_text())
    m["format"] = "other-lib-v3"
    (ck / "manifest.json").write_text(json.dumps(m))
    return Case(["eval", str(ck)], ("not a tdlm-checkpoint-v1", "other-lib-v3"), [ck])


def output_folder_unwritable(env, tmp, mp):
    """A --out below a regular file cannot be created, even by root (chmod does not stop
    root; the chmod variant is in tests/cli/test_cli.py)."""
    f = tmp / "afile"
    f.write_text("keep me")
    return Case(_train(env, f / "run"), ("not writable", str(f / "run")), [f])


def eval_output_unwritable(env, tmp, mp):
    f = tmp / "afile"
    f.write_text("keep me")
    return Case(["eval", str(env["run"]), "--batches", "1", "--out", str(f / "ev")],
                (str(f),), [f])


def existing_run_folder(env, tmp, mp):
    return Case(_train(env, env["run"]), ("already holds a run", "--resume"))


def disk_full_checkpoint(env, tmp, mp):
    """ENOSPC while writing the second checkpoint: the first one stays loadable."""
    out = tmp / "out"
    real = ckpt_mod.save_file

    def save_file(tensors, path, *a, **kw):
        if (out / "checkpoints" / "latest").exists() and path.endswith("model.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *a, **kw)
    mp.setattr(ckpt_mod, "save_file", save_file)

    def post():
        ck = load_checkpoint(out)
        assert ck.trainer["step"] == 1 and ck.path.name == "step_0000001"
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000001"]
    return Case(_train(env, out, "train.ckpt_every=1"),
                ("could not write checkpoint", "no space left"), post=post)


def disk_full_metrics(env, tmp, mp):
    """ENOSPC appending to metrics.jsonl after the first checkpoint: it stays loadable and
    the metrics written so far stay valid JSON lines."""
    import builtins

    from tdlm.train import loop as loop_mod
    out = tmp / "out"

    def fake_open(file, mode="r", *a, **kw):
        if Path(file).name == "metrics.jsonl" and "a" in mode \
                and (out / "checkpoints" / "latest").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return builtins.open(file, mode, *a, **kw)
    mp.setattr(loop_mod, "open", fake_open, raising=False)

    def post():
        assert load_checkpoint(out).trainer["step"] == 1
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == [1]
    return Case(_train(env, out, "train.ckpt_every=1"), ("no space left", "metrics.jsonl"),
                post=post)


def disk_full_eval_metrics(env, tmp, mp):
    """ENOSPC writing eval/metrics.json: the previous metrics.json is kept as it was."""
    ev = tmp / "ev"
    ev.mkdir()
    (ev / "metrics.json").write_text('{"previous": true}')

    def atomic_write(path, write, binary=False):        # the one atomic-write helper
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    from tdlm.utils import io as io_mod
    mp.setattr(io_mod, "atomic_write", atomic_write)
    return Case(["eval", str(env["run"]), "--batches", "1", "--out", str(ev)],
                ("no space left", "metrics.json"), [ev])


def export_disk_full(env, tmp, mp):
    """ENOSPC while exporting: no folder (nor temporary folder) is left behind."""
    from tdlm.store import export as ex

    def card(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    mp.setattr(ex, "_model_card", card)
    out = tmp / "exp"

    def post():
        assert [p.name for p in tmp.iterdir()] == []
    return Case(["export", str(env["run"]), "--out", str(out)],
                ("could not export", "no space left"), absent=[out], post=post)


def export_into_existing_folder(env, tmp, mp):
    d = tmp / "taken"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return Case(["export", str(env["run"]), "--out", str(d)], ("not empty", str(d)), [d])


SUB = "subprocess"
ROWS = [
    # data
    (corpus_missing, None), (corpus_empty, None), (corpus_binary, None),
    (corpus_wrong_encoding, SUB),
    # tokenizer / tree / checkpoint mismatches
    (tree_file_other_vocab, None), (tree_checkpoint_other_vocab, None),
    (checkpoint_other_family, None), (checkpoint_other_vocab, None),
    # configuration
    (unknown_preset, None), (unknown_field, None), (negative_size, None), (zero_size, None),
    (seq_len_above_model, None), (sample_seq_len_above_model, SUB),
    (train_zero_steps, None), (sample_zero_steps, None), (schedule_wrong_total, SUB),
    # damaged and foreign checkpoints (nothing is unpickled)
    (checkpoint_truncated, SUB), (checkpoint_altered, None), (checkpoint_unlisted_file, None),
    (foreign_safetensors_file, None),
    (foreign_library_folder, None), (foreign_torch_pickle, None),
    (foreign_torch_pickle_folder, None), (foreign_manifest, None),
    # outputs
    (output_folder_unwritable, None), (eval_output_unwritable, None),
    (existing_run_folder, None), (export_into_existing_folder, None),
    (disk_full_checkpoint, None), (disk_full_metrics, None), (disk_full_eval_metrics, None),
    (export_disk_full, None),
]


def _cli(argv: list, cwd: Path) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "tdlm.cli", *argv], capture_output=True,
                       text=True, cwd=cwd, env=env, timeout=120)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("row,how", ROWS, ids=[f.__name__ for f, _ in ROWS])
def test_bad_input(env, tmp_path, monkeypatch, capsys, row, how):
    work = tmp_path / "w"
    work.mkdir()
    case = row(env, work, monkeypatch)
    protected = [env["run"], *case.protect]
    before = {str(p): tree_hash(p) if p.is_dir() else p.read_bytes() for p in protected}
    if how == SUB:
        rc, out, err = _cli(case.argv, cwd=tmp_path)
        assert out == "", out           # nothing printed before the error
    else:
        capsys.readouterr()
        rc = main(case.argv)
        err = capsys.readouterr().err
    monkeypatch.undo()
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in case.needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    for p in protected:
        assert (tree_hash(p) if p.is_dir() else p.read_bytes()) == before[str(p)], f"{p} changed"
    for p in case.absent:
        assert not p.exists(), f"{p} was left behind"
    print("error line:", lines[0])         # shown by pytest -rA
    if case.post is not None:
        case.post()


def test_library_never_unpickles():
    """Only JSON and safetensors are read from user files: no pickle loads, no
    ``np.load(..., allow_pickle=True)``, and ``torch.load`` only with ``weights_only=True``."""
    import re

    import tdlm
    src = Path(tdlm.__file__).parent
    files = sorted(src.rglob("*.py"))
    assert len(files) > 20
    bad = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        for m in re.finditer(r"pickle\.loads?\(|allow_pickle\s*=\s*True|torch\.load\([^)]*\)|"
                             r"np\.load\([^)]*\)", text):
            call = m.group(0)
            if call.startswith("torch.load") and "weights_only=True" in call:
                continue
            if call.startswith("np.load") and "allow_pickle=False" in call:
                continue
            bad.append(f"{f.relative_to(src)}: {call}")
    assert bad == []
