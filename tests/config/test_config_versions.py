"""Config layout v2 (``RunConfig(backbone, family, data, train)``) and the reader of v1.

The fixtures in tests/fixtures/v1 were written by tdlm 37baf4c, the last version with the flat
``model``/``diffusion`` layout (``scripts/make_v1_fixture.py``): every preset's resolved
config, and for each family a run folder interrupted at step 2 of 3 and an exported model,
with the outputs that code gave (``expected.json``). The current code must load them, sample
and score the same, and resume the runs to the same step-3 records.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import tdlm
from tdlm.config import (BackboneConfig, DataConfig, RunConfig, TrainConfig, family_section,
                         field_docs, get_preset, section_names)
from tdlm.errors import ConfigError

from paths import FIXTURES, REPO

FIX = FIXTURES / "v1"
EXPECTED = json.loads((FIX / "expected.json").read_text())
TEXT = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April."


def test_every_v1_preset_reads_as_the_same_v2_preset():
    old = json.loads((FIX / "presets.json").read_text())["presets"]
    assert set(old) <= set(tdlm.config.PRESETS)
    for name, d in old.items():
        assert RunConfig.from_dict(d).to_dict() == get_preset(name).to_dict(), name


def test_v2_round_trip_and_version():
    for name in tdlm.config.preset_names():
        cfg = get_preset(name)
        d = cfg.to_dict()
        assert d["version"] == 2 and d["family"]["name"] == cfg.family.name
        assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="version 3"):
        RunConfig.from_dict({**get_preset("tiny").to_dict(), "version": 3})


@pytest.mark.parametrize("fam", ["mdlm", "tdlm", "ar", "did"])
def test_v1_export_loads_and_reproduces_its_outputs(fam):
    pipe = tdlm.load(str(FIX / f"export-{fam}"))
    assert pipe.cfg.family.name == fam
    ids = pipe.generate_ids(num=2, steps=4, seed=0, seq_len=16)
    assert [list(map(int, r)) for r in ids] == EXPECTED[fam]["sample_ids"]
    want = EXPECTED[fam]["nelbo"]
    # scored the way the fixture's code scored it (each text cut into rows and padded to L, one
    # batch), the same bound to float32 rounding: matmul kernels differ across CPUs (the
    # fixture was written on another machine), so floats agree to ~1e-7 relative, not bit for bit
    old = v1_nelbo(pipe, TEXT, seed=0, repeats=2)
    assert old == {k: pytest.approx(v, rel=1e-5) for k, v in want.items()
                   if k in ("nelbo_per_token", "tokens")}
    # Pipeline.nelbo now lays the text out as training does (no padding on packed / varlen
    # layouts since session 23): the same tokens scored, the same conventions reported
    nel = pipe.nelbo([TEXT], seed=0, repeats=2)
    assert nel["tokens"] == want["tokens"] and nel["layout"] == pipe.cfg.data.layout
    assert {k: v for k, v in nel.items() if k in want and not isinstance(v, float)} == {
        k: v for k, v in want.items() if not isinstance(v, float)}
    if pipe.cfg.data.layout == "crop_pad":      # one padded row, as before: the same bound
        assert nel["nelbo_per_token"] == pytest.approx(want["nelbo_per_token"], rel=1e-5)


def v1_nelbo(pipe, text, seed, repeats):
    """NELBO/token as tdlm 37baf4c's ``Pipeline.nelbo`` computed it (until session 23): the
    transcription benchmarks/pipeline_nelbo_layout.py compares the current method with."""
    path = REPO / "benchmarks" / "pipeline_nelbo_layout.py"
    if not path.is_file():
        pytest.skip("no benchmarks/ folder (not a source checkout)")
    spec = importlib.util.spec_from_file_location("bench_pipeline_nelbo_layout", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.padded_nelbo(pipe, [text], seed, repeats)


@pytest.mark.parametrize("fam", ["mdlm", "tdlm", "ar", "did"])
def test_v1_run_folder_resumes_to_the_same_step(fam, tmp_path):
    from tdlm.train.loop import train
    run = tmp_path / "run"
    shutil.copytree(FIX / f"run-{fam}", run)
    train(RunConfig(), run, resume=True, progress=False, log=lambda s: None)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs if r["step"] == 3]
    want = [{k: v for k, v in r.items() if k != "tokens_per_s"}
            for r in EXPECTED[fam]["step3_records"]]
    # records written since v1 may carry the loss's named parts (TDLM levels, DID terms)
    assert len(got) == len(want)
    # and the training FLOPs so far, unknown (None) for a run whose checkpoint predates them
    assert all(set(g) - set(w) <= {"parts_per_token", "train_flops"} for g, w in zip(got, want))
    assert all(g.get("train_flops") is None for g in got)
    # float values within float32 rounding (the blocks' elementwise work was fused after the
    # fixture was written: same math, rounding differs by ~1e-7); everything else exact
    assert [{k: g[k] for k in w if k in g} for g, w in zip(got, want)] == [
        {k: (pytest.approx(v, rel=1e-5) if isinstance(v, float) else v) for k, v in w.items()}
        for w in want]
    # the step-2 checkpoint keeps its verified v1 config; the run's resolved config is
    # written again in v2 and means the same
    old = json.loads((run / "checkpoints" / "step_0000002" / "config.json").read_text())
    assert "model" in old and "version" not in old
    new = json.loads((run / "config.json").read_text())
    assert new["version"] == 2 and RunConfig.from_dict(new) == RunConfig.from_dict(old)


def test_v1_override_keys_still_work_and_warn():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cfg = get_preset("tiny").override(["model.family=tdlm", "model.tree_K=64",
                                           "model.tree_H=3", "diffusion.eps=0.01",
                                           "model.activation_checkpointing=true"])
    assert any(issubclass(x.category, DeprecationWarning) for x in w)
    assert (cfg.family.name, cfg.family.K, cfg.family.H, cfg.family.eps) == ("tdlm", 64, 3, 0.01)
    assert cfg.train.activation_checkpointing
    same = get_preset("tiny").override(["family.name=tdlm", "family.K=64", "family.H=3",
                                        "family.eps=0.01", "train.activation_checkpointing=true"])
    assert same == cfg
    with pytest.raises(ConfigError, match="does not apply to the 'mdlm' family"):
        get_preset("tiny").override(["model.tree_K=3"])


def test_family_switch_keeps_shared_fields_and_drops_others():
    cfg = get_preset("tiny").override(["family.eps=0.01", "family.keep_first=true",
                                       "family.name=tdlm"])
    assert cfg.family.eps == 0.01 and not hasattr(cfg.family, "keep_first")
    with pytest.raises(ConfigError, match="family.K"):
        get_preset("tiny").override(["family.K=4"])
    with pytest.raises(ConfigError, match="'family.name'.*'nope' is not one of"):
        get_preset("tiny").override(["family.name=nope"])


def test_legacy_constructors_and_views():
    from tdlm.config import DiffusionConfig, ModelConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cfg = RunConfig(model=ModelConfig(family="tdlm", vocab_size=30, d_model=16, n_layers=1,
                                          n_heads=2, tree_K=4, tree_H=3, tree_head="per_level"),
                        diffusion=DiffusionConfig(eps=0.01), data=DataConfig(seq_len=8))
        assert cfg.model.tree_K == 4 and cfg.model.family == "tdlm"
        assert cfg.diffusion.eps == 0.01
        cfg.model.tree_head = "shared"
    assert cfg.family.head == "shared" and cfg.backbone.d_model == 16


def test_errors_name_section_and_field():
    with pytest.raises(ConfigError, match="'backbone.n_heads'"):
        BackboneConfig(d_model=10, n_heads=3)
    with pytest.raises(ConfigError, match="'family.K'"):
        family_section("tdlm")(K=1)
    with pytest.raises(ConfigError, match="'train.ema'"):
        TrainConfig(ema=1.5)
    with pytest.raises(ConfigError, match="'data.layout'.*did family needs BOS-led"):
        get_preset("did-tiny").override(["data.layout=packed"])
    with pytest.raises(ConfigError, match="unknown config field.*family.tree_K"):
        RunConfig.from_dict({"family": {"name": "tdlm", "tree_K": 3}})


def test_every_field_is_documented():
    sections = [BackboneConfig, DataConfig, TrainConfig] + [family_section(n)
                                                            for n in section_names()]
    for cls in sections:
        for row in field_docs(cls):
            assert row["doc"], f"{cls.__name__}.{row['name']} has no documentation"
    assert set(section_names()) >= {"mdlm", "tdlm", "ar", "did"}


def test_info_fields_lists_sections(capsys):
    from tdlm.cli import main
    assert main(["info", "--fields", "--family", "tdlm"]) == 0
    out = capsys.readouterr().out
    assert "family.K" in out and "backbone.d_model" in out and "train.global_batch" in out
    assert "children per internal node" in out
