"""Experiment tracking (``train.tracker``): what TensorBoard and W&B receive equals
``metrics.jsonl`` (read back with TensorBoard's event reader and from the offline W&B run's
``.wandb`` log), the resolved config is logged, a missing package is a one-line error naming
the extra, and the default logs nothing."""
from __future__ import annotations

import builtins
import glob
import json
import math
import struct
from pathlib import Path

import pytest

from tdlm.config import get_preset
from tdlm.errors import ConfigError
from tdlm.train.loop import train
from tdlm.train.tracking import scalars
from text_corpus import write_corpus


def tiny_tdlm(corpus: Path, cache: Path, *extra: str):
    """A seconds-long two-level TDLM run: the records carry per-level parts."""
    return get_preset("tdlm-tiny").override([
        "backbone.d_model=32", "backbone.n_layers=1", "backbone.n_heads=2", "backbone.cond_dim=16",
        "backbone.max_seq_len=32", "data.seq_len=32", "data.tokenizer=bpe-512",
        "family.K=32", "family.H=2",
        f"data.source={corpus}", f"data.cache_dir={cache}", "train.global_batch=4",
        "train.max_steps=4", "train.warmup_steps=1", "train.log_every=1",
        "train.eval_every=2", "train.eval_batches=2", "train.ckpt_every=100", *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    return write_corpus(root / "corpus"), root / "cache"


def expected(run: Path) -> dict:
    """{(tag, step): value} of every scalar metrics.jsonl holds."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for tag, v in scalars(rec).items():
            out[(tag, rec["step"])] = v
    return out


def resolved(run: Path) -> dict:
    """The run's resolved config (vocabulary size from the tokenizer), as config.json has it."""
    from tdlm.config import RunConfig
    return json.loads(json.dumps(RunConfig.from_dict(
        json.loads((run / "config.json").read_text())).to_dict()))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_scalars_flatten_a_record():
    rec = {"step": 3, "split": "val", "nelbo_per_token": 2.5, "tokens": 10, "note": "x",
           "stderr_per_token": None, "parts_per_token": {"level_1": 1.0, "level_0": 1.5}}
    assert scalars(rec) == {"val/nelbo_per_token": 2.5, "val/tokens": 10.0,
                            "val/parts_per_token/level_0": 1.5,
                            "val/parts_per_token/level_1": 1.0}


def test_default_tracker_writes_nothing_and_records_parts(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_tdlm(*data, "train.max_steps=2"), run, progress=False, log=lambda s: None)
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in recs if r["split"] == "train"]
    va = [r for r in recs if r["split"] == "val"]
    assert tr and va
    for r in tr + va:
        parts = r["parts_per_token"]
        assert sorted(parts) == ["level_0", "level_1"]
        total = r["loss"] if r["split"] == "train" else r["nelbo_per_token"]
        assert sum(parts.values()) == pytest.approx(total, rel=1e-6)   # float32 sums


def read_tensorboard(folder: Path) -> dict:
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return {(tag, ev.step): tensor_util.make_ndarray(ev.tensor_proto)
            for tag in acc.Tags()["tensors"] for ev in acc.Tensors(tag)}


def test_tensorboard_events_equal_metrics(data, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install "
                        "\"tdlm[tensorboard]\")")
    run = tmp_path / "run"
    cfg = tiny_tdlm(*data, "train.tracker=tensorboard")
    train(cfg, run, progress=False, log=lambda s: None)
    got = read_tensorboard(run / "tensorboard")
    text = got.pop(("config/text_summary", 0)).item().decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == resolved(run)
    want = expected(run)
    assert set(got) == set(want)
    for key, v in want.items():
        assert same(float(got[key]), v), (key, float(got[key]), v)
    assert ("train/parts_per_token/level_1", 4) in got and ("val/ppl_bound", 4) in got


def test_tensorboard_after_resume_equals_metrics(data, tmp_path):
    """An interrupted run's events after its checkpoint are purged on resume."""
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install "
                        "\"tdlm[tensorboard]\")")
    run = tmp_path / "run"
    cfg = tiny_tdlm(*data, "train.tracker=tensorboard", "train.ckpt_every=2")
    train(cfg, run, progress=False, stop_after=3, log=lambda s: None)     # checkpoint at 2
    train(cfg, run, resume=True, progress=False, log=lambda s: None)
    got = read_tensorboard(run / "tensorboard")
    got.pop(("config/text_summary", 0))
    want = expected(run)
    assert set(got) == set(want)
    for key, v in want.items():
        if not key[0].endswith("tokens_per_s"):          # wall-clock: differs after resume
            assert same(float(got[key]), v), (key, float(got[key]), v)


def _wandb_records(path: str) -> list:
    """The protobuf records of a .wandb file (LevelDB-log framing: 7-byte file header, 32 KiB
    blocks of chunks with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:                     # block trailer: zero padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            pos += left - 7
            continue
        chunk, pos = raw[pos:pos + n], pos + n
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
    recs = []
    for d in out:
        r = pb.Record()
        r.ParseFromString(d)
        recs.append(r)
    return recs


def test_wandb_offline_history_equals_metrics(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install \"tdlm[wandb]\")")
    for k in ("WANDB_DIR", "WANDB_NAME", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "tdlm-tests")
    run = tmp_path / "run"
    cfg = tiny_tdlm(*data, "train.tracker=wandb")
    train(cfg, run, progress=False, log=lambda s: None)
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    history, config, project = {}, {}, None
    for r in _wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                   for i in r.history.item}
            step = row.pop("_step")
            for k, v in row.items():
                if not k.startswith("_"):
                    history[(k, step)] = float(v) if v is not None else math.nan
        elif kind == "run":
            project = r.run.project
            config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    assert project == "tdlm-tests"
    config.pop("_wandb", None)
    assert config == resolved(run)
    want = expected(run)
    assert set(history) == set(want)
    for key, v in want.items():
        assert same(history[key], v), (key, history[key], v)
    saved = json.loads((run / "wandb_run.json").read_text())
    assert saved["id"] in files[0]


def test_missing_package_is_one_line_naming_the_extra(data, tmp_path, monkeypatch):
    real = builtins.__import__

    def no_tensorboard(name, *a, **kw):
        if name.split(".")[0] == "tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as ei:
        train(tiny_tdlm(*data, "train.tracker=tensorboard"), run, progress=False,
              log=lambda s: None)
    msg = str(ei.value)
    assert "\n" not in msg and 'pip install "tdlm[tensorboard]"' in msg
    assert not run.exists()                  # nothing of the run is left behind


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="train.tracker"):
        get_preset("tiny").override(["train.tracker=mlflow"])
