"""The benchmarks that time or measure training steps run the trainer's step
(``tdlm.train.step.train_step``) and ask families for what they need instead of comparing
family names (benchmarks/speed.py, memory.py, did_race.py)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import tdlm.train.step as S
from paths import REPO

BENCH = REPO / "benchmarks"
FAMILY_NAMES = ("mdlm", "tdlm", "ar", "did")


def _load(name: str):
    if not (BENCH / f"{name}.py").is_file():
        pytest.skip("no benchmarks/ folder (not a source checkout)")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def spy(monkeypatch):
    """Records every call of ``tdlm.train.step.train_step`` (the real step still runs)."""
    calls = []
    real = S.train_step

    def wrapped(ctx, batch, step, *a, **k):
        calls.append((ctx, step))
        return real(ctx, batch, step, *a, **k)
    monkeypatch.setattr(S, "train_step", wrapped)
    return calls


def test_no_family_name_comparisons_in_benchmarks():
    if not BENCH.is_dir():
        pytest.skip("no benchmarks/ folder (not a source checkout)")
    names = "|".join(FAMILY_NAMES)
    pats = [re.compile(rf"""(==|!=)\s*['"]({names})['"]"""),
            re.compile(rf"""['"]({names})['"]\s*(==|!=)"""),
            re.compile(r"family\s*(==|!=)"),
            re.compile(r"""\.family\s+(not\s+)?in\s""")]
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted(BENCH.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if any(pat.search(line) for pat in pats)]
    assert not hits, "\n".join(hits)


def test_family_for_asks_the_family_for_its_resources():
    from tdlm.config import get_preset
    fam = S.family_for(get_preset("tdlm-tiny"))          # shape-only: a frequency tree
    assert fam.describe()["tree_K"] == 256 and fam.describe()["tree_H"] == 2
    assert S.family_for(get_preset("tiny")).describe() == {}


def test_speed_times_train_step(spy):
    speed = _load("speed")
    b = speed.Bench("tiny", torch.device("cpu"), "fp32", [1, 2])
    assert b.ctx.micro == 2 and b.ctx.ema is None and b.cfg.train.precision == "fp32"
    for B in (1, 2, 1):
        assert b.train_step(B) > 0
    assert [s for _, s in spy] == [0, 1, 2] and all(c is b.ctx for c, _ in spy)
    assert b.facts()["family"] == "mdlm"
    t = speed.Bench("tdlm-tiny", torch.device("cpu"), "fp32", [1])
    assert {"tree_K", "tree_H"} <= set(t.facts())


def test_memory_worker_runs_train_step(spy):
    memory = _load("memory")
    row = memory.worker("tiny", "ckpt", 1, 2, torch.get_num_threads())
    assert [s for _, s in spy] == [0, 1]
    assert row["family"] == "mdlm" and row["activation_checkpointing"] is True
    assert len(row["losses"]) == 2 and row["peak_bytes"] > 0
    assert spy[0][0].micro == 1 and spy[0][0].ema is None


@pytest.mark.slow
def test_did_race_trains_with_train_step(spy, tmp_path):
    """One curve-run step of the fixed-length DID run (~30 s: data, evaluation, sampling)."""
    race = _load("did_race")
    rec = race.worker("fixed/did", 1, 1, 2, 1, "", str(tmp_path))
    assert [s for _, s in spy] == [0]
    ctx = spy[0][0]
    assert ctx.tc.weight_decay == 0.01 and ctx.tc.grad_clip == 1.0 and ctx.ema is None
    assert rec["steps"][0]["dp_seconds"] > 0 and rec["steps"][0]["loss"] > 0


@pytest.mark.parametrize("row,conf", [("mdlm-cpu", {"steps": 6, "cache": False}),
                                      ("did-cpu-fixed", {"steps": 6, "cache": True})])
def test_sampling_benchmark_times_the_backbone_the_samplers_run(row, conf):
    """benchmarks/sampling.py's timer sits on the DiT, which the samplers run (they call the
    model's features and output layer apart, never its ``forward``): it counts every backbone
    forward (an independent counter on the same DiT agrees; MDLM without the cache runs one
    per step) and its time is a positive share of the wall-clock."""
    from tdlm.nn.dit import DiT
    sampling = _load("sampling")
    fam, model, cfg, _ = sampling.build(row, None)
    timer = sampling.ForwardTimer(model)
    dit = next(m for m in model.modules() if isinstance(m, DiT))
    seen = []
    dit.register_forward_hook(lambda *a: seen.append(1))
    m = sampling.time_one(fam, model, cfg, timer, 1, conf, seed=0)
    assert m["forwards"] == len(seen) > 0
    if row == "mdlm-cpu":
        assert conf["steps"] <= m["forwards"] <= conf["steps"] + 1    # (+ noise removal)
    assert 0 < m["forward_s"] < m["wall_s"]


def test_search_share_counts_the_forwards_a_sampler_makes():
    """benchmarks/search_share.py's counter (on the DiT) counts each network forward of a
    sampler that calls the model's features and output layer apart: MDLM without the cache
    runs one per step."""
    from tdlm.sampling.result import build_options
    share = _load("search_share")
    fam, model, cfg, _ = _load("sampling").build("mdlm-cpu", None)
    n = share.count_forwards(model)
    opts = build_options(fam.SampleOptions, cfg.family.name, steps=5, cache=False)
    with torch.no_grad():
        fam.sample(model, 1, 32, opts, torch.Generator().manual_seed(0))
    assert 5 <= n[0] <= 6, n
