"""``measure_throughput`` (tdlm info --measure) times the trainer's own step over real batches."""
import time

import pytest

import tdlm.train.step as step_mod
from tdlm.config import get_preset
from tdlm.errors import ConfigError
from tdlm.train.throughput import measure_throughput


def small(preset="tiny"):
    return get_preset(preset).override(["train.global_batch=2", "backbone.n_layers=1"])


def test_counts_the_timed_steps_and_their_data_tokens(monkeypatch):
    calls = []
    real = step_mod.train_step

    def slow_step(ctx, batch, step, *a, **k):
        calls.append(step)
        if step >= 1:                       # only timed steps are slowed down
            time.sleep(0.2)
        return real(ctx, batch, step, *a, **k)

    monkeypatch.setattr(step_mod, "train_step", slow_step)
    r = measure_throughput(small(), steps=2, warmup=1)
    assert calls == [0, 1, 2]               # warm-up step 0 untimed, then the timed ones
    assert r["tokens_per_step"] == 2 * 128  # packed rows of the preset's length
    assert r["seconds_per_step"] >= 0.2
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["seconds_per_step"])
    assert r["tokens_per_s"] <= 256 / 0.2


def test_ragged_data_counts_real_tokens():
    cfg = get_preset("did-tiny-var").override(["train.global_batch=4", "backbone.n_layers=1"])
    r = measure_throughput(cfg, steps=2, warmup=0)
    assert 0 < r["tokens_per_step"] < 4 * 128      # paragraphs are shorter than the cap


def test_rejects_bad_counts():
    with pytest.raises(ConfigError):
        measure_throughput(small(), steps=0)


def test_cli_prints_the_column(capsys):
    from tdlm.cli import main
    assert main(["info", "--preset", "tiny", "--measure", "1"]) == 0
    out = capsys.readouterr().out
    assert "train tok/s" in out and "measured now" in out


def test_public_api_takes_a_preset_name_and_overrides():
    import tdlm
    r = tdlm.measure_throughput("tiny", steps=1, warmup=0,
                                overrides=["backbone.n_layers=1", "train.global_batch=3"])
    assert r["tokens_per_step"] == 3 * 128 and r["steps"] == 1


def test_reports_forwarded_tokens_and_training_flops_as_the_trainer_counts_them():
    """Dense rows: the backbone forwards every token, and the FLOPs are 3x the analytic forward
    of B rows of L (tdlm.flops, itself checked against torch's FlopCounterMode in
    tests/scheduling/test_scheduling.py);
    DID forwards only the surviving tokens of its deleted sequences, so fewer than it reads."""
    from tdlm.flops import model_forward_flops
    from tdlm.train.throughput import build_step_context
    cfg = small()
    r = measure_throughput(cfg, steps=2, warmup=1)
    assert r["forwarded_tokens_per_step"] == 2 * 128
    model = build_step_context(cfg)[2]
    assert r["train_flops_per_step"] == pytest.approx(
        3 * model_forward_flops(model, [128, 128])["full"])
    did = measure_throughput(get_preset("did-tiny").override(
        ["train.global_batch=4", "backbone.n_layers=1"]), steps=2, warmup=0)
    assert 0 < did["forwarded_tokens_per_step"] < did["tokens_per_step"]
    assert did["train_flops_per_step"] > 0
