"""Fault recovery: a training process killed with SIGKILL at a random step, checkpoint writes
killed at their most delicate points, tampered checkpoint files, and non-finite training.

What is checked:

* ``tdlm train`` in a separate process is SIGKILLed once the metrics show it has passed a
  random step; ``tdlm train --resume`` then finishes with bit-identical weights, EMA, AdamW
  state and the same loss/validation trajectory (metrics.jsonl) as an uninterrupted run.
* A process killed right after a checkpoint folder is renamed into place but before
  ``latest`` moves, or half-way through writing the manifest, leaves ``latest`` on the previous
  checkpoint; the half-written folder never loads; resuming reproduces the uninterrupted run.
* Changing one byte of any file of a checkpoint (same size) makes loading fail, naming the file
  (the sha256 manifest is verified on load).
* A non-finite loss at step k stops training with one line (``tdlm train`` exits 2) naming the
  step and the last good checkpoint, which stays ``latest`` and loadable; no checkpoint of
  step >= k is written. The same for an absurd learning rate, and for parameters that become
  non-finite with a finite loss (checked before every checkpoint write).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tdlm.cli import main
from tdlm.errors import CheckpointError, TdlmError
from tdlm.train.checkpoint import load_checkpoint
from tdlm.train.loop import train

from test_cli import write_corpus  # noqa: E402
from test_train import RESUME_SET, _assert_same_state, _metrics, _toy_save, tiny_cfg  # noqa: E402

N_STEPS = 40
CKPT_EVERY = 3
FAULT_SET = (*RESUME_SET, f"train.max_steps={N_STEPS}", f"train.ckpt_every={CKPT_EVERY}",
             "train.eval_every=10")


def reference_run(root: Path, *sets: str):
    """(root, cfg, cfg.json path, result) of an uninterrupted run of the tiny config with
    ``sets``, the reference an interrupted run must reproduce."""
    corpus = write_corpus(root / "corpus")
    cfg = tiny_cfg(corpus, root / "cache", *sets)
    ref = train(cfg, root / "ref", progress=False, log=lambda s: None)   # uninterrupted
    cfg_file = root / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    return root, cfg, cfg_file, ref


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("fault"), *FAULT_SET)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")


def _last_train_step(run: Path) -> int:
    try:
        text = (run / "metrics.jsonl").read_text()
    except OSError:
        return 0
    step = 0
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:          # a line being written
            continue
        if r.get("split") == "train":
            step = max(step, r["step"])
    return step


def test_sigkill_at_random_step_then_resume_is_exact(env, tmp_path):
    root, cfg, cfg_file, ref = env
    seed = int.from_bytes(os.urandom(4), "little")
    k = random.Random(seed).randint(CKPT_EVERY + 1, N_STEPS - 12)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tdlm.cli", "train", "--config", str(cfg_file),
                             "--out", str(run), "--no-progress"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while _last_train_step(run) < k and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    at = _last_train_step(run)
    assert proc.returncode == -signal.SIGKILL, \
        f"not killed (k={k}, seed={seed}, rc={proc.returncode}): {proc.stderr.read()[-2000:]}"
    proc.stderr.close()
    assert k <= at < N_STEPS, (k, at, seed)
    saved = load_checkpoint(run).trainer["step"]
    assert saved < N_STEPS and saved % CKPT_EVERY == 0, (saved, seed)

    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    final = load_checkpoint(run)
    assert final.trainer["step"] == N_STEPS
    _assert_same_state(load_checkpoint(ref.run_dir), final)        # bit for bit
    assert _metrics(run) == _metrics(ref.run_dir), f"k={k}, seed={seed}"
    ckdir = run / "checkpoints"
    assert not any(p.name.startswith(".") for p in ckdir.iterdir())


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, json
    from pathlib import Path
    from tdlm.config import RunConfig
    from tdlm.train import checkpoint as ck
    from tdlm.train.loop import train
    where, target = sys.argv[3], "step_%07d" % int(sys.argv[4])
    real_text, real_json = ck.atomic_write_text, ck._write_json
    def atomic_write_text(path, text):
        # the folder is complete and renamed into place, `latest` not yet moved
        if where == "before_latest" and Path(path).name == "latest" and text.strip() == target:
            os._exit(17)
        return real_text(path, text)
    def _write_json(path, obj):
        if where == "manifest" and Path(path).name == "manifest.json" and target in str(path):
            data = json.dumps(obj)
            with open(path, "w") as f:       # half a manifest reaches the disk
                f.write(data[: len(data) // 2])
            os._exit(17)
        return real_json(path, obj)
    ck.atomic_write_text, ck._write_json = atomic_write_text, _write_json
    train(RunConfig.from_dict(json.loads(Path(sys.argv[1]).read_text())), sys.argv[2],
          progress=False)
""")


@pytest.mark.parametrize("where", ["before_latest", "manifest"])
def test_killed_checkpoint_write_never_loads_and_resume_is_exact(env, tmp_path, where):
    root, cfg, cfg_file, ref = env
    small = cfg.override(["train.max_steps=9"])
    ref_small = train(small, tmp_path / "ref9", progress=False, log=lambda s: None)
    f = tmp_path / "cfg9.json"
    f.write_text(small.to_json())
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(f), str(run), where, "6"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    ckdir = run / "checkpoints"
    assert (ckdir / "latest").read_text().strip() == "step_0000003"
    assert load_checkpoint(run).trainer["step"] == 3
    if where == "before_latest":
        # complete and valid, but not `latest`: resuming starts from step 3 and rewrites it
        assert load_checkpoint(ckdir / "step_0000006").trainer["step"] == 6
    else:
        partial = [p for p in ckdir.iterdir() if p.name.startswith(".tmp-step_0000006")]
        assert len(partial) == 1 and not (ckdir / "step_0000006").exists()
        with pytest.raises(CheckpointError, match="manifest"):
            load_checkpoint(partial[0])
    res = train(small, run, resume=True, progress=False, log=lambda s: None)
    assert res.losses == ref_small.losses[3:]
    _assert_same_state(load_checkpoint(ref_small.run_dir), load_checkpoint(run))
    assert _metrics(run) == _metrics(ref_small.run_dir)
    assert not any(p.name.startswith(".") for p in ckdir.iterdir())


def test_every_checkpoint_file_is_hash_verified(tmp_path):
    good = _toy_save(tmp_path / "run", 1)
    files = json.loads((good / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json",
            "rng.safetensors", "trainer.json", "config.json"} <= set(files)
    load_checkpoint(good)
    for rel in files:
        f = good / rel
        data = bytearray(f.read_bytes())
        i = len(data) // 2
        data[i] ^= 0x01                 # one bit, same size
        orig = f.read_bytes()
        f.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=rel.replace(".", r"\.")) as ei:
            load_checkpoint(good)
        assert "\n" not in str(ei.value)
        f.write_bytes(orig)
    load_checkpoint(good)


# ---- non-finite training -----------------------------------------------------------------------
def _nan_at(monkeypatch, step_calls: int):
    """Make the loss NaN from the ``step_calls``-th micro-batch forward on."""
    from tdlm.train import parallel as P
    real = P.LossModule.forward
    calls = {"n": 0}

    def forward(self, batch, generator, exact=False):
        terms = real(self, batch, generator, exact)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= step_calls:
                terms.nll = terms.nll * float("nan")
        return terms

    monkeypatch.setattr(P.LossModule, "forward", forward)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(env, tmp_path, monkeypatch, capsys):
    root, cfg, cfg_file, ref = env
    # 2 micro-batches per step: step 5's first forward is call 9
    _nan_at(monkeypatch, 2 * 4 + 1)
    run = tmp_path / "nan"
    cfg_nan = cfg.override(["train.ckpt_every=2", "train.max_steps=8"])
    f = tmp_path / "cfg.json"
    f.write_text(cfg_nan.to_json())
    capsys.readouterr()
    assert main(["train", "--config", str(f), "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: non-finite loss at step 5"), err
    assert "step_0000004" in err
    ckdir = run / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_0000002", "step_0000004"]
    ck = load_checkpoint(run)
    assert ck.trainer["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck.model_state.values())
    # the metrics hold steps 1..4 only, all finite
    recs = _metrics(run)
    assert max(r["step"] for r in recs) == 4
    assert all(r["loss"] == r["loss"] for r in recs if r["split"] == "train")


def test_nan_before_first_checkpoint(env, tmp_path, monkeypatch):
    root, cfg, _, _ = env
    _nan_at(monkeypatch, 1)
    with pytest.raises(TdlmError, match="non-finite loss at step 1; .*no checkpoint had been "
                                        "written yet") as ei:
        train(cfg, tmp_path / "r", progress=False, log=lambda s: None)
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_absurd_lr_stops_with_one_line(env, tmp_path, capsys):
    root, cfg, _, _ = env
    bad = cfg.override(["train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0",
                        "train.ckpt_every=1", "train.max_steps=20", "train.ema=0"])
    f = tmp_path / "cfg.json"
    f.write_text(bad.to_json())
    run = tmp_path / "lr"
    capsys.readouterr()
    assert main(["train", "--config", str(f), "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "non-finite" in err, err
    # whatever was written is loadable and finite; nothing after the failure
    ckdir = run / "checkpoints"
    if (ckdir / "latest").exists():
        ck = load_checkpoint(run)
        assert all(torch.isfinite(v).all() for v in ck.model_state.values())
        assert ck.trainer["step"] < 20
        assert f"step_{ck.trainer['step']:07d}" in err
    assert all(int(p.name[5:]) < 20 for p in ckdir.glob("step_*"))


def test_nonfinite_parameters_are_never_checkpointed(env, tmp_path, monkeypatch):
    """A finite loss but parameters that become infinite in the optimizer step (step 4): the
    checkpoint due at step 4 is refused; step 2's stays."""
    root, cfg, _, _ = env
    real = torch.optim.AdamW.step
    n = {"steps": 0}

    def step(self, *a, **kw):
        out = real(self, *a, **kw)
        n["steps"] += 1
        if n["steps"] == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = tmp_path / "inf"
    with pytest.raises(TdlmError, match=r"non-finite parameters at step 4; .*step_0000002"):
        train(cfg.override(["train.ckpt_every=2"]), run, progress=False, log=lambda s: None)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    assert load_checkpoint(run).trainer["step"] == 2
