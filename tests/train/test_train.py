"""Training loop, checkpoints, LR schedule and EMA (tdlm.train).

Runs are tiny (d_model 32, seq_len 32, a few steps) on a synthetic local corpus with a
locally trained bpe-512 tokenizer, so the whole file takes seconds on two CPU cores.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tdlm.config import RunConfig, get_preset
from tdlm.train.parallel import derive_micro
from tdlm.errors import CheckpointError, TdlmError
from tdlm.train import checkpoint as ckpt_mod
from tdlm.train.checkpoint import load_checkpoint, save_checkpoint
from tdlm.train.loop import EMA, lr_at, train

from test_cli import write_corpus  # noqa: E402  (one corpus writer for the tests)


def tiny_cfg(corpus: Path, cache: Path, *extra: str) -> RunConfig:
    """The `tiny` preset shrunk to a seconds-long CPU run."""
    return get_preset("tiny").override([
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.cond_dim=16",
        "model.max_seq_len=32", "data.seq_len=32", "data.tokenizer=bpe-512",
        f"data.source={corpus}", f"data.cache_dir={cache}",
        "train.global_batch=4", "train.max_steps=6", "train.warmup_steps=2",
        "train.log_every=1", "train.eval_every=3", "train.eval_batches=2",
        "train.ckpt_every=100", *extra])


# the resume configuration: accumulation, EMA, cosine LR, dropout (exercises every RNG)
RESUME_SET = ("train.micro_batch=2", "train.ema=0.9", "train.lr_schedule=cosine",
              "train.min_lr_ratio=0.2", "model.dropout=0.1", "train.ckpt_every=2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run_a(corpus, cache, tmp_path_factory):
    """The uninterrupted reference run (6 steps)."""
    cfg = tiny_cfg(corpus, cache, *RESUME_SET)
    out = tmp_path_factory.mktemp("runs") / "a"
    res = train(cfg, out, progress=False, log=lambda s: None)
    return cfg, res


def _metrics(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("tokens_per_s", None)     # wall-clock dependent
    return recs


def _assert_same_state(ck1, ck2):
    for name, a, b in (("model", ck1.model_state, ck2.model_state),
                       ("ema", ck1.ema_state, ck2.ema_state)):
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name} tensor {k} differs"
    o1, o2 = ck1.optimizer_state(), ck2.optimizer_state()
    for pid in o1["state"]:
        for k, v in o1["state"][pid].items():
            assert torch.equal(v, o2["state"][pid][k]), f"optimizer {pid}.{k} differs"


# ---- exact resume ---------------------------------------------------------------------------
def test_stop_and_resume_is_bit_exact(run_a, corpus, cache, tmp_path):
    cfg, res_a = run_a
    assert derive_micro(cfg.train.global_batch, cfg.train.micro_batch, 1)[1] == 2
    assert cfg.train.ema > 0 and cfg.backbone.dropout > 0
    k = 3
    out = tmp_path / "b"
    first = train(cfg, out, progress=False, stop_after=k, log=lambda s: None)
    assert first.step == k and first.final_checkpoint.name == f"step_{k:07d}"
    assert first.losses == res_a.losses[:k]
    second = train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert second.step == cfg.train.max_steps
    # bit for bit: every source of randomness is a function of (seed, step)
    assert second.losses == res_a.losses[k:]
    _assert_same_state(load_checkpoint(res_a.run_dir), load_checkpoint(out))
    assert _metrics(out) == _metrics(res_a.run_dir)
    # resuming a finished run does nothing and reports the final checkpoint
    again = train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert again.step == cfg.train.max_steps and again.losses == []
    assert again.final_checkpoint == load_checkpoint(out).path


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from tdlm.config import RunConfig
    from tdlm.train import checkpoint as ck
    from tdlm.train.loop import train
    real = ck.save_file
    def save_file(tensors, path, *a, **kw):
        real(tensors, path, *a, **kw)
        # hard kill (no cleanup, no exception handler) right after the model file of the
        # second checkpoint (step 4) is written
        if path.endswith("model.safetensors") and "step_0000004" in path:
            os._exit(17)
    ck.save_file = save_file
    cfg = RunConfig.from_dict(__import__("json").loads(sys.argv[1]))
    train(cfg, sys.argv[2], progress=False)
""")


def test_killed_checkpoint_write_then_resume(run_a, tmp_path):
    """A process killed while writing a checkpoint leaves the previous one as `latest`; the
    partial folder never loads; resuming reproduces the uninterrupted run exactly (and the
    metrics lines the killed process wrote after its last checkpoint are replayed)."""
    cfg, res_a = run_a
    out = tmp_path / "c"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, cfg.to_json(), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 17, proc.stderr
    ckdir = out / "checkpoints"
    partial = [p for p in ckdir.iterdir() if p.name.startswith(".tmp-step_0000004")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(partial[0])
    assert (ckdir / "latest").read_text().strip() == "step_0000002"
    assert load_checkpoint(out).trainer["step"] == 2
    # the killed process logged steps 3 and 4 past its checkpoint
    assert max(r["step"] for r in _metrics(out)) == 4

    res = train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert res.losses == res_a.losses[2:]
    _assert_same_state(load_checkpoint(res_a.run_dir), load_checkpoint(out))
    assert _metrics(out) == _metrics(res_a.run_dir)
    assert not any(p.name.startswith(".") for p in ckdir.iterdir() if p.is_dir())
    assert sorted(p.name for p in ckdir.iterdir() if p.is_dir()) == ["step_0000004", "step_0000006"]


# ---- gradient accumulation --------------------------------------------------------------------
def _first_step_grads(cfg, out, monkeypatch):
    grads = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    res = train(cfg, out, progress=False, log=lambda s: None)
    monkeypatch.undo()
    return res, grads


def test_gradient_accumulation_equivalence(corpus, cache, tmp_path, monkeypatch):
    """global_batch 8 as one micro-batch of 8 or four of 2: same loss and same gradient.
    Uses the AR family: its loss is deterministic. (MDLM draws antithetic times per
    micro-batch, so its noise, hence its loss, depends on the micro-batch size.)"""
    base = ("model.family=ar", "model.time_conditioning=false", "train.global_batch=8",
            "train.max_steps=2", "train.eval_every=100", "train.grad_clip=0")
    r8, g8 = _first_step_grads(tiny_cfg(corpus, cache, *base, "train.micro_batch=8"),
                               tmp_path / "m8", monkeypatch)
    r2, g2 = _first_step_grads(tiny_cfg(corpus, cache, *base, "train.micro_batch=2"),
                               tmp_path / "m2", monkeypatch)
    assert len(g8) == len(g2) == 2
    assert r2.losses == pytest.approx(r8.losses, rel=1e-6, abs=0)
    n_nonzero = 0
    for a, b in zip(g8[0], g2[0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
        n_nonzero += int(a.abs().sum() > 0)
    assert n_nonzero > 0
    p8, p2 = load_checkpoint(r8.run_dir).model_state, load_checkpoint(r2.run_dir).model_state
    for k in p8:
        torch.testing.assert_close(p2[k], p8[k], rtol=1e-4, atol=1e-5)


def test_train_loss_is_nll_per_scored_token(corpus, cache, tmp_path):
    """The logged loss is sum(NELBO) / sum(family n_tokens), the evaluation's normalisation
    (for AR, L-1 scored tokens per block, not L)."""
    from tdlm.data import BatchIterator, build_data
    from tdlm.families import get_family
    cfg = tiny_cfg(corpus, cache, "model.family=ar", "model.time_conditioning=false",
                   "train.max_steps=1", "train.eval_every=100")
    res = train(cfg, tmp_path / "r", progress=False, log=lambda s: None)
    ck = load_checkpoint(res.run_dir)
    fam = get_family(ck.config)
    torch.manual_seed(cfg.train.seed)
    model = fam.build_model()      # initial weights, as train() builds them
    data = build_data(ck.config.data, None)
    batch = BatchIterator(data.train, cfg.train.global_batch, cfg.train.seed).batch(0)
    model.train()
    with torch.no_grad():
        terms = fam.loss(model, batch, torch.Generator())
    assert terms.n_tokens.sum().item() == cfg.train.global_batch * (cfg.data.seq_len - 1)
    assert res.losses[0] == pytest.approx((terms.nll.sum() / terms.n_tokens.sum()).item(), rel=1e-6)


# ---- checkpoints ------------------------------------------------------------------------------
def _toy_ckpt_cfg(family="mdlm") -> RunConfig:
    return RunConfig.from_dict({
        "model": {"family": family, "vocab_size": 20, "d_model": 16, "n_layers": 1,
                  "n_heads": 2, "cond_dim": 8, "max_seq_len": 8, "dropout": 0.0},
        "data": {"seq_len": 8}})


def _toy_save(run: Path, step: int, family="mdlm", **kw) -> Path:
    from tdlm.families import get_family
    cfg = _toy_ckpt_cfg(family)
    torch.manual_seed(step)
    model = get_family(cfg).build_model()
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(run, step, cfg, model, opt, {k: v.clone() for k, v in
                                                          model.state_dict().items()}, **kw)


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    good = _toy_save(run, 1)
    real = ckpt_mod.save_file
    calls = []

    def failing(tensors, path, *a, **kw):
        calls.append(path)
        real(tensors, path, *a, **kw)
        if path.endswith("model.safetensors"):
            raise RuntimeError("simulated crash after the model file")

    monkeypatch.setattr(ckpt_mod, "save_file", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        _toy_save(run, 2)
    assert calls and "model.safetensors" in calls[-1]
    ckdir = run / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_0000001"]
    assert load_checkpoint(run).path == good

    # disk errors become a one-line CheckpointError, and nothing is left behind either
    def disk_full(tensors, path, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left") as ei:
        _toy_save(run, 3)
    _one_line(ei.value)
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_0000001"]
    assert load_checkpoint(run).path == good


def test_damaged_checkpoints_are_refused(tmp_path):
    run = tmp_path / "run"
    good = _toy_save(run, 5)
    ck = load_checkpoint(good, expect_family="mdlm")
    assert ck.trainer["step"] == 5 and ck.config.model.family == "mdlm"

    def damaged(name: str) -> Path:
        import shutil
        dst = tmp_path / name
        shutil.copytree(good, dst)
        return dst

    # truncated weights
    p = damaged("truncated")
    f = p / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors") as ei:
        load_checkpoint(p)
    assert "corrupt" in _one_line(ei.value)
    # one altered byte in the config
    p = damaged("altered")
    txt = (p / "config.json").read_text().replace('"lr": 0.0003', '"lr": 0.0004')
    assert txt != (good / "config.json").read_text()
    (p / "config.json").write_text(txt)
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(p)
    # a folder without its manifest (an interrupted write)
    p = damaged("no-manifest")
    (p / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(p)
    # a missing file
    p = damaged("missing")
    (p / "trainer.json").unlink()
    with pytest.raises(CheckpointError, match="trainer.json"):
        load_checkpoint(p)
    # garbage manifest
    p = damaged("garbage")
    (p / "manifest.json").write_bytes(b"\xff\x00not json")
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(p)
    # latest pointing nowhere
    run2 = tmp_path / "run2" / "checkpoints"
    run2.mkdir(parents=True)
    (run2 / "latest").write_text("step_0000099\n")
    with pytest.raises(CheckpointError, match="step_0000099"):
        load_checkpoint(run2.parent)
    # not a checkpoint at all
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    # another model family
    ar = _toy_save(tmp_path / "ar-run", 1, family="ar")
    with pytest.raises(CheckpointError, match="'ar' model, expected 'mdlm'") as ei:
        load_checkpoint(ar, expect_family="mdlm")
    _one_line(ei.value)
    import tdlm
    with pytest.raises(CheckpointError, match="expected 'mdlm'"):
        tdlm.load(ar, expect_family="mdlm")


def test_keep_last_checkpoints(tmp_path):
    run = tmp_path / "run"
    for s in (1, 2, 3, 10_000_000):
        last = _toy_save(run, s, keep=2)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_0000003", "step_10000000"]
    assert load_checkpoint(run).path == last


# ---- LR schedule and EMA ----------------------------------------------------------------------
def test_lr_schedule_values():
    from tdlm.config import TrainConfig
    c = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, lr_schedule="constant")
    assert [lr_at(s, c) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert all(lr_at(s, c) == 1.0 for s in (10, 50, 109))
    c = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, lr_schedule="cosine",
                    min_lr_ratio=0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.1 + 0.9 * 0.5)              # half way
    assert lr_at(35, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, c) == pytest.approx(0.1) and lr_at(500, c) == pytest.approx(0.1)
    vals = [lr_at(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    c = TrainConfig(lr=2.0, warmup_steps=0, max_steps=100, lr_schedule="cosine", min_lr_ratio=0.0)
    assert lr_at(0, c) == pytest.approx(2.0) and lr_at(100, c) == pytest.approx(0.0, abs=1e-12)


def test_ema_math():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    e0 = {k: v.clone() for k, v in m.state_dict().items()}
    ema = EMA(m, 0.9)
    target = {k: torch.randn_like(v) for k, v in e0.items()}
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(target[k])
    ema.update(m)
    for k in e0:
        torch.testing.assert_close(ema.shadow[k], 0.9 * e0[k] + 0.1 * target[k])
    for _ in range(9):
        ema.update(m)
    for k in e0:   # e_n = p + d^n (e_0 - p)
        torch.testing.assert_close(ema.shadow[k], target[k] + 0.9 ** 10 * (e0[k] - target[k]))
    other = torch.nn.Linear(3, 2)
    ema.copy_to(other)
    for k, v in other.state_dict().items():
        assert torch.equal(v, ema.shadow[k])


def test_lr_and_ema_in_training_run(run_a):
    cfg, res = run_a
    recs = [r for r in _metrics(res.run_dir) if r["split"] == "train"]
    assert [r["step"] for r in recs] == list(range(1, cfg.train.max_steps + 1))
    for r in recs:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg.train))
    ck = load_checkpoint(res.run_dir)
    assert ck.ema_state is not None
    assert any(not torch.equal(ck.ema_state[k], ck.model_state[k]) for k in ck.model_state)


# ---- run folder outputs -----------------------------------------------------------------------
def test_run_outputs(run_a):
    cfg, res = run_a
    run = res.run_dir
    recs = _metrics(run)
    assert {r["split"] for r in recs} == {"train", "val"}
    val = [r for r in recs if r["split"] == "val"]
    assert [r["step"] for r in val] == [3, 6]
    assert all(math.isfinite(r["nelbo_per_token"]) and r["tokens"] > 0 for r in val)
    assert res.val["step"] == 6
    png = (run / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    saved = json.loads((run / "config.json").read_text())
    rt = RunConfig.from_dict(saved)
    assert json.loads(rt.to_json()) == saved
    # the saved config is the resolved one: vocabulary size from the tokenizer
    tok = json.loads((run / "tokenizer_meta.json").read_text())
    assert rt.backbone.vocab_size == tok["vocab_size"] <= 512
    resolved, given = rt.to_dict(), cfg.to_dict()
    assert resolved["backbone"].pop("vocab_size") != given["backbone"].pop("vocab_size")
    assert resolved == given
    # ... while the caller's object is left alone
    assert cfg.backbone.vocab_size == get_preset("tiny").backbone.vocab_size
    assert json.loads(load_checkpoint(run).config.to_json()) == saved


def test_existing_run_is_not_overwritten(run_a, tmp_path):
    cfg, res = run_a
    before = {p: p.stat().st_mtime_ns for p in res.run_dir.rglob("*")}
    with pytest.raises(TdlmError, match="already holds a run"):
        train(cfg, res.run_dir, progress=False)
    assert {p: p.stat().st_mtime_ns for p in res.run_dir.rglob("*")} == before
    with pytest.raises(TdlmError, match="no checkpoint"):
        train(cfg, tmp_path / "empty", resume=True, progress=False)
    # a folder with someone's config.json is not a place to start a run either
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{\"mine\": 1}")
    with pytest.raises(TdlmError, match="already holds a run"):
        train(cfg, other, progress=False)
    assert [p.name for p in other.iterdir()] == ["config.json"]
    assert (other / "config.json").read_text() == "{\"mine\": 1}"


def test_failed_setup_leaves_no_folder(cache, tmp_path):
    cfg = tiny_cfg(tmp_path / "missing-corpus", cache)
    out = tmp_path / "new-run"
    with pytest.raises(TdlmError, match="not found"):
        train(cfg, out, progress=False)
    assert not out.exists()


def test_keep_every_spares_multiples(tmp_path):
    run = tmp_path / "run"
    for s in range(1, 8):
        _toy_save(run, s, keep=2, keep_every=3)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_0000003", "step_0000006", "step_0000007"]
    from tdlm.config import TrainConfig
    from tdlm.errors import ConfigError
    with pytest.raises(ConfigError, match="keep_every"):
        TrainConfig(keep_every=-1)
