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


def test_compare_times_round_robin_and_states_ratios_to_the_first(monkeypatch):
    """One step of each config in turn (every round, every other round reversed), the step
    ratio as mean step time over mean step time, and the median of the per-round ratios
    beside it: a stand-in step sleeps 0.05 s for config a
    and 0.2 s for b (no real training, so the load of the machine cannot move the ratio
    much), so b's ratio is about 4."""
    from tdlm.train.throughput import compare_throughput
    order = []
    a, b = small(), small().override(["train.seed=1"])

    def fake_step(ctx, batch, step, *args, **k):
        who = "b" if ctx.tc.seed == 1 else "a"
        order.append((who, step))
        time.sleep(0.2 if who == "b" else 0.05)

    monkeypatch.setattr(step_mod, "train_step", fake_step)
    r = compare_throughput({"a": a, "b": b}, steps=3, warmup=1)
    assert order == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert r["a"]["step_ratio"] == 1.0 and len(r["b"]["step_s"]) == 3
    assert 3.0 < r["b"]["step_ratio"] < 4.2, r["b"]["step_ratio"]
    # step_ratio: mean over mean (the time both take); the per-round median beside it
    assert r["b"]["step_ratio"] == pytest.approx(sum(r["b"]["step_s"]) / sum(r["a"]["step_s"]))
    per = sorted(x / y for x, y in zip(r["b"]["step_s"], r["a"]["step_s"]))
    assert r["b"]["step_ratio_median"] == per[1]
    lo, hi = r["b"]["step_ratio_range"]
    assert [lo, hi] == [per[0], per[-1]] and lo <= r["b"]["step_ratio_median"] <= hi
    assert r["b"]["flops_ratio"] is None           # nothing forwarded: no FLOPs to compare


def test_compare_gives_each_config_the_steps_it_has_alone():
    """Interleaving does not disturb any config's batches or noise: DID's forwarded tokens and
    FLOPs (random deletions) equal those of the trainer's own steps of the same config run
    alone (built independently, FLOPs from the analytic count of the lengths its backbone
    saw), and the ratios are the quotients of the per-config figures."""
    import tdlm
    from tdlm.flops import model_forward_flops
    from tdlm.nn.dit import backbone_of
    from tdlm.train.throughput import build_step_context
    did = get_preset("did-tiny").override(["train.global_batch=4", "backbone.n_layers=1"])
    mdlm = small()
    both = tdlm.compare_throughput({"mdlm": mdlm, "did": did}, steps=2, warmup=1)
    _, _, model, ctx, it = build_step_context(did)
    seen = []
    backbone_of(model).register_forward_pre_hook(
        lambda mod, a, k: seen.append(k["packing"].lengths.tolist()), with_kwargs=True)
    step_mod.train_step(ctx, next(it), 0)                  # the warm-up step, not counted
    seen.clear()
    for i in (1, 2):
        step_mod.train_step(ctx, next(it), i)
    assert both["did"]["forwarded_tokens_per_step"] == sum(map(sum, seen)) / 2
    assert both["did"]["train_flops_per_step"] == pytest.approx(
        sum(3 * model_forward_flops(model, lens, True)["full"] for lens in seen) / 2)
    m = both["mdlm"]
    assert both["did"]["flops_ratio"] == pytest.approx(
        both["did"]["train_flops_per_step"] / m["train_flops_per_step"])
    assert both["did"]["tokens_ratio"] == pytest.approx(
        both["did"]["forwarded_tokens_per_step"] / m["forwarded_tokens_per_step"])
    with pytest.raises(ConfigError):
        tdlm.compare_throughput(["tiny", "tiny"], steps=1)


def test_cli_measures_several_presets_round_robin(capsys):
    from tdlm.cli import main
    assert main(["info", "--preset", "tiny", "--preset", "did-tiny", "--measure", "1"]) == 0
    out = capsys.readouterr().out
    assert "step x" in out and "FLOPs x" in out and "round-robin" in out
    rows = [ln for ln in out.splitlines() if ln.startswith(("tiny ", "did-tiny"))]
    assert len(rows) == 2 and rows[0].split()[-3:] == ["1.000", "1.000", "1.000"]
    step_x, tok_x, flops_x = map(float, rows[1].split()[-3:])
    assert 0 < step_x and 0 < tok_x < 1.0 and flops_x > 0     # DID forwards fewer tokens
    assert main(["info", "--preset", "tiny", "--measure", "1"]) == 0
    one = capsys.readouterr().out
    row = next(ln for ln in one.splitlines() if ln.startswith("tiny "))
    assert row.split()[-3:] == ["-", "-", "-"]      # nothing to compare with
