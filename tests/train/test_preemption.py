"""Preemption with real signals to real training processes (``tdlm.train.preemption``).

* Single process: ``tdlm train`` gets SIGTERM (or SIGINT) once its metrics pass a random step;
  it finishes that optimizer step, writes a checkpoint of exactly that step (not a multiple of
  ``ckpt_every``), prints one ``preempted:`` line and exits 75. ``--resume`` then ends with
  weights, EMA, AdamW state and metrics bit-identical to an uninterrupted run.
* Two processes (``python -m torch.distributed.run --nproc_per_node 2``, gloo): only rank 1
  gets SIGTERM; both ranks stop after the same step (they agree after every step), rank 0
  writes the checkpoint, both exit 75; the run resumes in one process to the uninterrupted
  run's state (allclose: DDP sums gradients in another order).
* ``train_step`` is the trainer's step: the same losses and weights as ``tdlm train`` when a
  caller drives it by hand (what the benchmarks do).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tdlm.cli import main
from tdlm.train.checkpoint import load_checkpoint
from tdlm.train.loop import train
from tdlm.train.preemption import EXIT_PREEMPTED

from test_distributed import _assert_close_states  # noqa: E402
from test_fault import _last_train_step, reference_run  # noqa: E402
from test_train import RESUME_SET, _assert_same_state, _metrics  # noqa: E402

N_STEPS = 30
CKPT_EVERY = 7
PRE_SET = (*RESUME_SET, f"train.max_steps={N_STEPS}", f"train.ckpt_every={CKPT_EVERY}",
           "train.eval_every=10")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("preempt"), *PRE_SET)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1",
                TDLM_DIST_TIMEOUT_S="120")


def _wait_for_step(run: Path, k: int, proc, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _last_train_step(run) < k and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"process ended early: {proc.stderr.read()[-2000:]}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(env, tmp_path, sig):
    root, cfg, cfg_file, ref = env
    seed = int.from_bytes(os.urandom(4), "little")
    k = random.Random(seed).randint(2, N_STEPS - 8)
    run = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, "-m", "tdlm.cli", "train", "--config", str(cfg_file),
                             "--out", str(run), "--no-progress"], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_step(run, k, proc)
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, (seed, proc.returncode, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("preempted: ") and "--resume" in lines[0], err
    assert signal.Signals(sig).name in lines[0]
    at = _last_train_step(run)
    saved = load_checkpoint(run).trainer["step"]
    assert k <= at == saved < N_STEPS, (k, at, saved, seed)      # the step it was in, no later
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    final = load_checkpoint(run)
    assert final.trainer["step"] == N_STEPS
    _assert_same_state(load_checkpoint(ref.run_dir), final)          # bit for bit
    assert _metrics(run) == _metrics(ref.run_dir), f"k={k}, seed={seed}"


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _rank_of(pid: int) -> int:
    env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_one_rank_stops_both_at_the_same_step(env, tmp_path):
    root, cfg, cfg_file, ref = env
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tdlm.cli", "train", "--config", str(cfg_file), "--out", str(run),
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _wait_for_step(run, 4, proc)
        deadline = time.monotonic() + 30
        workers = {}
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = {_rank_of(p): p for p in _children(proc.pid)}
            time.sleep(0.05)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert f"exitcode  : {EXIT_PREEMPTED}" in err, err[-3000:]      # torchrun's failure report
    assert err.count("preempted: ") == 1, err[-3000:]       # rank 0 reports, once
    at = _last_train_step(run)
    saved = load_checkpoint(run).trainer["step"]
    assert 4 <= at == saved < N_STEPS, (at, saved)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    final = load_checkpoint(run)
    assert final.trainer["step"] == N_STEPS
    _assert_close_states(final, load_checkpoint(ref.run_dir))


def test_train_step_by_hand_is_the_trainers_step(env, tmp_path):
    """A caller driving ``train_step`` (as benchmarks do) gets the trainer's losses and
    weights, bit for bit."""
    from tdlm.data import BatchIterator, build_data
    from tdlm.families import get_family
    from tdlm.train.step import single_process, train_step
    root, cfg, _, _ = env
    cfg = cfg.override(["train.max_steps=5", "train.ckpt_every=5", "train.eval_every=100",
                        "model.dropout=0.0"])
    res = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    ck = load_checkpoint(res.run_dir)
    from tdlm.data.tokenizer import Tokenizer
    data = build_data(ck.config.data, None, tokenizer=Tokenizer.load(str(ck.extra("tokenizer"))))
    fam = get_family(ck.config)
    torch.manual_seed(cfg.train.seed)
    model = fam.build_model()
    ctx = single_process(fam, model, ck.config, torch.device("cpu"))
    batches = BatchIterator(data.train, cfg.train.global_batch, cfg.train.seed)
    losses = [train_step(ctx, next(batches), s).loss for s in range(5)]
    assert losses == res.losses
    for k, v in ck.model_state.items():
        assert torch.equal(model.state_dict()[k], v), k
