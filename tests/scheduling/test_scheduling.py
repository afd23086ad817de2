"""Model scheduling: schedule values, the scheduled sampler (one-model bit-identity, no cache
reuse across a model switch, compatibility checks, TDLM levels), FLOPs accounting (the
paper's 16.7% for the 250/1000 sandwich with 4 of 12 blocks) and the ``tdlm sample`` options."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tdlm.api import Pipeline
from tdlm.cli import main
from tdlm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from tdlm.errors import ConfigError
from tdlm.families import get_family
from tdlm.families.tree import TreeDiffusion
from tdlm.flops import forward_flops, model_forward_flops, train_flops
from tdlm.sampling.loop import ForwardLog
from tdlm.scheduling import ScheduledSampler, parse_schedule, resolve_schedule
from tdlm.scheduling.schedule import Schedule, split_even
from tdlm.tree import VocabTree
from text_corpus import write_corpus


# ---- schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expect", [
    ("L125,H750,L125", "L125,H750,L125"),
    ("sandwich:0.25", "L125,H750,L125"),
    ("sandwich:250", "L125,H750,L125"),
    ("sandwich:0.251", "L126,H749,L125"),          # 251 light steps: the odd one goes first
    ("light-first:0.25", "L250,H750"),
    ("light-last:0.25", "H750,L250"),
    ("light-middle:0.25", "H375,L250,H375"),
    ("L125,H,L125", "L125,H750,L125"),
    ("H", "H1000"),
    ("L:100, H:900", "L100,H900"),
    ("sandwich:0", "H1000"),
    ("sandwich:1.0", "L1000"),
])
def test_schedule_forms(text, expect):
    s = parse_schedule(text).resolve(1000, ["H", "L"])
    assert str(s) == expect
    assert s.steps == 1000 and len(s.per_step()) == 1000


def test_fraction_rounding_is_half_up():
    # n_L = floor(f T + 1/2): 0.25 * 10 = 2.5 -> 3 light steps; 0.3 * 7 = 2.1 -> 2
    assert parse_schedule("sandwich:0.25").resolve(10, ["L", "H"]).counts()["L"] == 3
    assert str(parse_schedule("sandwich:0.25").resolve(10, ["L", "H"])) == "L2,H7,L1"
    assert str(parse_schedule("sandwich:0.3").resolve(7, ["L", "H"])) == "L1,H5,L1"
    assert str(parse_schedule("light-middle:0.5").resolve(7, ["L", "H"])) == "H2,L4,H1"


def test_random_and_interleave():
    a = parse_schedule("random:0.25:7").resolve(1000, ["L", "H"])
    b = parse_schedule("random:0.25:7").resolve(1000, ["L", "H"])
    c = parse_schedule("random:0.25").resolve(1000, ["L", "H"])
    assert a.per_step() == b.per_step() != c.per_step()
    assert a.counts() == {"H": 750, "L": 250}
    light = {i for i, n in enumerate(a.per_step()) if n == "L"}
    assert light == set(random.Random(7).sample(range(1000), 250))
    s = parse_schedule("interleave:4").resolve(10, ["L", "H"]).per_step()
    assert s == ["L", "H", "H", "H", "L", "H", "H", "H", "L", "H"]


def test_light_heavy_roles():
    # named L/H by default; otherwise by cost; or explicit
    assert str(parse_schedule("light-first:0.5").resolve(4, ["big", "small"],
                                                        cost={"big": 9, "small": 3})) == "small2,big2"
    assert str(parse_schedule("light-first:0.5").resolve(4, ["a", "b"], light="b")) == "b2,a2"
    with pytest.raises(ConfigError, match="cannot tell the light"):
        parse_schedule("sandwich:0.5").resolve(4, ["a", "b"], cost={"a": 1, "b": 1})


def test_levels_schedule():
    s = parse_schedule("levels:L,H").resolve(10, ["L", "H"], level_steps=[4, 6])
    assert str(s) == "L4,H6"
    with pytest.raises(ConfigError, match="tdlm"):
        parse_schedule("levels:L,H").resolve(10, ["L", "H"])
    with pytest.raises(ConfigError, match="levels"):
        parse_schedule("levels:L,H,L").resolve(10, ["L", "H"], level_steps=[4, 6])


@pytest.mark.parametrize("text,steps,needle", [
    ("", 10, "empty"),
    ("L4,H4", 10, "sum to 8"),
    ("X5,H5", 10, "not loaded"),
    ("L5,H5,Q", 10, "not loaded"),
    ("L,H", 10, "at most one"),
    ("L0,H10", 10, "no steps"),
    ("L12,H", 10, "leaving"),
    ("sandwich", 10, "needs an argument"),
    ("sandwich:1.5", 10, "[0, 1]"),
    ("sandwich:abc", 10, "light share"),
    ("sandwich:20", 10, "exceed"),
    ("interleave:0", 10, "period"),
    ("random:0.2:x", 10, "seed"),
    ("L5;H5", 10, "cannot read"),
])
def test_schedule_errors_are_one_line(text, steps, needle):
    with pytest.raises(ConfigError) as ei:
        parse_schedule(text).resolve(steps, ["L", "H"])
    msg = str(ei.value)
    assert needle.lower() in msg.lower() and "\n" not in msg


def test_schedule_round_trip_and_split():
    s = parse_schedule("sandwich:0.25").resolve(1000, ["L", "H"])
    d = json.loads(json.dumps(s.to_dict()))
    t = Schedule.from_dict(d)
    assert t.per_step() == s.per_step() and (t.light, t.heavy) == ("L", "H")
    assert d["run_length"] == "L125,H750,L125" and d["steps_per_model"] == {"L": 250, "H": 750}
    assert split_even(10, 3) == [4, 3, 3] and split_even(1000, 8) == [125] * 8
    with pytest.raises(ConfigError):
        resolve_schedule(None, 10, ["L", "H"])


# ---- tiny models ---------------------------------------------------------------------------
class StubTok:
    name = "stub"
    bos_id = eos_id = 0

    def __init__(self, h="v1"):
        self.h = h

    def vocab_hash(self):
        return self.h

    def decode(self, ids):
        return " ".join(map(str, ids))


def mdlm_cfg(layers=1, d=16, V=11, L=8, tc=False, schedule="loglinear"):
    return RunConfig(model=ModelConfig(family="mdlm", vocab_size=V, d_model=d, n_layers=layers,
                                       n_heads=2, cond_dim=8, max_seq_len=L, dropout=0.0,
                                       time_conditioning=tc),
                     diffusion=DiffusionConfig(schedule=schedule), data=DataConfig(seq_len=L))


def pipe_of(cfg, seed=0, tok=None, family=None):
    fam = family or get_family(cfg)
    torch.manual_seed(seed)
    model = fam.build_model()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return Pipeline(cfg, fam, model.eval(), tok or StubTok())


def small_tree():
    return VocabTree.from_assignment([np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 0])],
                                     K=3).validate()


def tdlm_pipe(layers, seed, tc=True, d=16):
    cfg = RunConfig(model=ModelConfig(family="tdlm", vocab_size=6, d_model=d, n_layers=layers,
                                      n_heads=2, cond_dim=8, max_seq_len=8, dropout=0.0,
                                      time_conditioning=tc, tree_K=3, tree_H=2),
                    data=DataConfig(seq_len=8))
    return pipe_of(cfg, seed, family=TreeDiffusion(cfg, tree=small_tree()))


@pytest.mark.parametrize("tc", [False, True])
def test_one_model_schedule_is_bit_identical_to_plain_sampler(tc):
    heavy = pipe_of(mdlm_cfg(2, tc=tc), 0)
    light = pipe_of(mdlm_cfg(1, tc=tc), 1)
    plain = heavy.generate_ids(6, 20, seed=3, top_p=0.9)
    for pipes in ({"H": heavy}, {"H": heavy, "L": light}):
        s = ScheduledSampler(pipes)
        out = s.generate_ids(6, 20, schedule="H20", seed=3, top_p=0.9)
        assert torch.equal(out, plain)
        assert set(s.last_report["forward_calls"]) == {"H"}
        assert s.last_report["saved_blocks"] == 0.0
    t = tdlm_pipe(2, 0, tc=tc)
    plain = t.generate_ids(5, 9, seed=2)
    out = ScheduledSampler({"H": t, "L": tdlm_pipe(1, 1, tc=tc)}).generate_ids(
        5, 9, schedule="H", seed=2)
    assert torch.equal(out, plain)


def test_light_only_explicit_schedule_saves_against_the_heavy_loaded_model():
    """An explicit plan that uses only the light model (``"L"``, ``"L20"``) with L and H loaded
    saves 1 - blocks_L / blocks_H of the block FLOPs (2 blocks vs 1 of the same width: 1/2),
    as the named ``light-first:1.0`` does, not 0 (found by an independent check through the
    public API: the reference was picked among the models used only); ``heavy=`` names the
    reference explicitly; ``"H"`` saves nothing."""
    heavy = pipe_of(mdlm_cfg(2), 0)
    light = pipe_of(mdlm_cfg(1), 1)
    s = ScheduledSampler({"H": heavy, "L": light})
    for sched in ("L", "L20", "light-first:1.0"):
        s.generate_ids(3, 20, schedule=sched, seed=0)
        assert s.last_report["saved_blocks"] == pytest.approx(0.5), sched
        assert s.last_report["reference"]["model"] == "H"
    s.generate_ids(3, 20, schedule="H", seed=0)
    assert s.last_report["saved_blocks"] == 0.0
    s2 = ScheduledSampler({"A": light, "B": heavy})           # no L/H names: the costliest
    s2.generate_ids(3, 20, schedule="A", seed=0)
    assert s2.last_report["saved_blocks"] == pytest.approx(0.5)
    s2.generate_ids(3, 20, schedule="A", seed=0, heavy="A")    # the caller's reference
    assert s2.last_report["saved_blocks"] == 0.0


def test_no_cached_prediction_crosses_a_model_switch():
    """Two copies of one time-independent model: the output equals the plain sampler's (the
    same predictions), but every segment starts with a forward pass of its own model."""
    a = pipe_of(mdlm_cfg(1), 0)
    b = pipe_of(mdlm_cfg(1), 0)
    T = 60
    plain_log = ForwardLog()
    plain = a.generate_ids(2, T, seed=0, log=plain_log)
    s = ScheduledSampler({"H": a, "L": b})
    out = s.generate_ids(2, T, schedule="L10,H40,L10", seed=0)
    assert torch.equal(out, plain)
    calls = s.last_report["forward_calls_total"]
    assert calls < T                                       # the cache is used inside segments
    plan = s.resolve("L10,H40,L10", T).per_step()
    log = ForwardLog()
    a.generate_ids(2, T, seed=0, models={"H": a.model, "L": b.model}, plan=plan, log=log)
    steps_called = {k for k, _ in log.steps}
    assert {0, 10, 50} <= steps_called                     # a forward at every switch
    assert all(plan[k] == n for k, n in log.steps if k < T)  # each by the planned model
    assert calls >= sum(plain_log.calls.values())


def test_scheduled_sampler_uses_each_model_where_planned():
    """A model whose prediction is a fixed token: positions filled during its segment get it."""

    class Const(torch.nn.Module):
        def __init__(self, tok, V=11):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.tok, self.V = tok, V

        def forward(self, z, sigma=None):
            out = torch.full((*z.shape, self.V + 1), -30.0)
            out[..., self.tok] = 30.0
            return out

    cfg = mdlm_cfg(1, tc=True)
    fam = get_family(cfg)
    hp = Pipeline(cfg, fam, Const(3), StubTok())
    lp = Pipeline(cfg, fam, Const(7), StubTok())
    traj = []
    s = ScheduledSampler({"H": hp, "L": lp})
    out = s.generate_ids(64, 10, schedule="L3,H7", seed=0,
                         on_forward=lambda k: traj.append(k))
    assert set(out.unique().tolist()) <= {3, 7}
    assert (out == 7).any() and (out == 3).any()
    assert s.last_report["forward_calls"]["L"] == 3


def test_incompatible_models_are_refused():
    base = pipe_of(mdlm_cfg(2), 0)
    ok = pipe_of(mdlm_cfg(1, d=32), 1)                    # depth and width may differ
    ScheduledSampler({"H": base, "L": ok})
    cases = [(pipe_of(mdlm_cfg(1, V=12)), "vocab_size"),
             (pipe_of(mdlm_cfg(1, L=6)), "seq_len"),
             (pipe_of(mdlm_cfg(1, schedule="cosine")), "noise schedule"),
             (pipe_of(mdlm_cfg(1), tok=StubTok("other")), "tokenizer"),
             (tdlm_pipe(1, 0), "family")]
    for other, needle in cases:
        with pytest.raises(ConfigError, match=needle) as ei:
            ScheduledSampler({"H": base, "L": other})
        assert "\n" not in str(ei.value)
    ar_cfg = RunConfig(model=ModelConfig(family="ar", vocab_size=11, d_model=16, n_layers=1,
                                         n_heads=2, cond_dim=8, max_seq_len=8),
                       data=DataConfig(seq_len=8))
    with pytest.raises(ConfigError, match="scheduling applies"):
        ScheduledSampler({"H": base, "A": pipe_of(ar_cfg)})


class Counted(torch.nn.Module):
    """A model wrapper that counts the forward passes really made."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.n = inner, 0

    def forward(self, *a, **k):
        self.n += 1
        return self.inner(*a, **k)

    def features(self, *a, **k):            # MDLM's sampler forwards to the features
        self.n += 1
        return self.inner.features(*a, **k)

    def __getattr__(self, name):            # the rest of the model's interface (TDLM's child)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


@pytest.mark.parametrize("family", ["mdlm", "mdlm-cached", "tdlm"])
def test_shared_plan_prefixes_give_the_samples_and_counts_of_independent_runs(family):
    """Masks that share leading segments, sampled through one PrefixMemo per seed in every
    order, against each mask sampled alone: the same ids and the same forward-call report;
    the memo saves real forward passes (counted by wrapping the models)."""
    from tdlm.sampling.loop import PrefixMemo
    from tdlm.scheduling.schedule import split_even
    if family == "tdlm":
        pipes = {"H": tdlm_pipe(2, 0), "L": tdlm_pipe(1, 1)}
    else:
        tc = family == "mdlm"
        pipes = {"H": pipe_of(mdlm_cfg(2, tc=tc), 0), "L": pipe_of(mdlm_cfg(1, tc=tc), 1)}
    T, seg = 24, 4
    lens = split_even(T, seg)
    ends = [sum(lens[:i + 1]) - 1 for i in range(seg)]
    masks = ["HHHH", "HHLH", "HLHH", "LHHH", "HHHL", "LLHH", "HLLH", "LLLL"]

    def spec(mask):
        return ",".join(f"{c}{n}" for c, n in zip(mask, lens))
    alone = {}
    for m in masks:
        s = ScheduledSampler(pipes)
        alone[m] = (s.generate_ids(5, T, schedule=spec(m), seed=7, top_p=0.95),
                    s.last_report["forward_calls"])
    for order in (masks, masks[::-1]):
        for p in pipes.values():
            p.model = Counted(getattr(p.model, "inner", p.model))
        memo = PrefixMemo(ends)
        s = ScheduledSampler(pipes)
        for m in order:
            ids = s.generate_ids(5, T, schedule=spec(m), seed=7, top_p=0.95, memo=memo)
            assert torch.equal(ids, alone[m][0]), m
            assert s.last_report["forward_calls"] == alone[m][1], m
        made = sum(p.model.n for p in pipes.values())
        reported = sum(sum(c.values()) for _, c in alone.values())
        assert memo.hits > 0 and made == reported - memo.forwards_saved < reported
    with pytest.raises(ValueError, match="one sampling setting"):
        s.generate_ids(5, T, schedule=spec("HHHH"), seed=8, top_p=0.95, memo=memo)
    other = ScheduledSampler({"H": pipes["L"], "L": pipes["H"]})     # same names, other models
    with pytest.raises(ValueError, match="one sampling setting"):
        other.generate_ids(5, T, schedule=spec("HHHH"), seed=7, top_p=0.95, memo=memo)


def test_tdlm_levels_schedule_gives_whole_levels():
    h, l = tdlm_pipe(2, 0), tdlm_pipe(1, 1)
    s = ScheduledSampler({"H": h, "L": l})
    log = []
    out = s.generate_ids(4, 10, schedule="levels:L,H", seed=1, steps_split=[7, 3],
                         on_forward=log.append)
    # steps_split is leaf level first: the root level (sampled first) has 3 steps
    assert str(s.resolve("levels:L,H", 10, steps_split=[7, 3])) == "L3,H7"
    assert s.last_report["forward_calls"] == {"L": 3, "H": 7}     # time-conditioned: no cache
    assert bool((out < 6).all())


# ---- FLOPs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tc", [False, True])
def test_forward_flops_matches_flop_counter(tc):
    """Analytic forward FLOPs against torch's FlopCounterMode; without a time input the
    conditioning (time MLP, adaLN modulations) is one row for the whole batch."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = mdlm_cfg(3, d=32, V=50, L=16, tc=tc)
    m = get_family(cfg).build_model().eval()
    B, L = 3, 16
    with FlopCounterMode(display=False) as fc:
        m(torch.randint(0, 50, (B, L)), torch.rand(B))
    f = model_forward_flops(m, [L] * B)
    d, c, n, r, V1 = 32, 8, 3, 4, 50        # the head computes V outputs ([MASK] row never)
    attention = n * 4 * d * B * L * L                    # SDPA is not counted by FlopCounterMode
    Bc = B if tc else 1                                   # conditioning rows computed
    biases = (n * (2 * (r * d + d) * B * L + 2 * 6 * d * Bc)    # MLP + adaLN biases
              + 2 * V1 * B * L + 2 * 2 * d * Bc + 2 * 2 * c * Bc)  # head, final adaLN, time MLP
    assert f["full"] - f["embedding"] - attention - biases == fc.get_total_flops()
    assert f["full"] == f["blocks"] + f["embedding"] + f["head"] + f["other"]


def test_flops_of_ragged_lengths_and_training():
    cfg = ModelConfig(family="did", vocab_size=100, d_model=64, n_layers=2, n_heads=4,
                      cond_dim=16, max_seq_len=64)
    a = forward_flops(cfg, [10, 30, 5], head_out=100, n_embed=100)
    b = forward_flops(cfg, torch.tensor([5, 10, 30]), head_out=100, n_embed=100)
    assert a == b and a["tokens"] == 45 and a["sequences"] == 3
    one = [forward_flops(cfg, [l], 100, 100) for l in (10, 30, 5)]
    for k in ("blocks", "full"):
        assert a[k] == sum(o[k] for o in one)              # per-sequence additivity
    sq = forward_flops(cfg, [45], 100, 100)
    # attention grows with sum of squares: one long sequence costs more than three short
    assert sq["blocks"] - a["blocks"] == 2 * 4 * 64 * (45 ** 2 - (10 ** 2 + 30 ** 2 + 5 ** 2)) \
        + 2 * 2 * (6 * 64 * 16 + 6 * 64) * (1 - 3)
    assert train_flops(cfg, [10, 30, 5], 100, 100)["full"] == 3 * a["full"]


def test_sandwich_250_of_1000_saves_16_7_percent_block_flops():
    """Heavy 12 blocks, light 4 blocks, same width; time-conditioned (no cache hits)."""
    heavy = pipe_of(mdlm_cfg(12, tc=True, L=4), 0)
    light = pipe_of(mdlm_cfg(4, tc=True, L=4), 1)
    s = ScheduledSampler({"H": heavy, "L": light})
    s.generate_ids(1, 1000, schedule="sandwich:0.25", seed=0)
    rep = s.last_report
    assert rep["schedule"]["run_length"] == "L125,H750,L125"
    assert rep["forward_calls"]["H"] == 750
    assert rep["forward_calls"]["L"] in (250, 251)         # + the noise-removal pass, if any
    assert round(100 * rep["saved_blocks"], 1) == 16.7
    assert 0 < rep["saved_full"] < rep["saved_blocks"]     # embedding + head are not saved
    per_h = model_forward_flops(heavy.model, [4])["blocks"]
    assert rep["reference"]["blocks"] == per_h * rep["forward_calls_total"]
    assert rep["seconds"] > 0


# ---- command line -------------------------------------------------------------------------------
def tiny_sets(corpus, cache, *extra):
    sets = ["model.d_model=32", "model.n_heads=2", "model.cond_dim=16", "model.max_seq_len=32",
            "data.seq_len=32", "data.tokenizer=bpe-512", f"data.source={corpus}",
            f"data.cache_dir={cache}", "data.val_fraction=0.25", "train.global_batch=4",
            "train.max_steps=2", "train.warmup_steps=1", "train.log_every=1",
            "train.eval_every=2", "train.eval_batches=1", *extra]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched")
    corpus, cache = write_corpus(root / "corpus"), root / "cache"
    out = {}
    for name, preset, layers, extra in (("H", "tiny", 3, ()), ("L", "tiny", 1, ()),
                                        ("S", "tiny", 1, ("data.seq_len=16",)),
                                        ("A", "ar-tiny", 1, ())):
        rc = main(["train", "--preset", preset, "--out", str(root / name), "--no-progress",
                   *tiny_sets(corpus, cache, f"model.n_layers={layers}", *extra)])
        assert rc == 0
        out[name] = root / name
    out["root"] = root
    return out


def one_error_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])


def test_cli_scheduled_sampling(runs, capsys):
    out = runs["root"] / "s.jsonl"
    rc = main(["sample", "--model", f"H={runs['H']}", "--model", f"L={runs['L']}",
               "--schedule", "sandwich:0.5", "--steps", "8", "--num", "3", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "L2,H4,L2" in text and "saved" in text
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(recs) == 3 and all(len(r["ids"]) == 32 and "text" in r for r in recs)
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["schedule"]["run_length"] == "L2,H4,L2" and meta["steps"] == 8
    assert set(meta["checkpoints"]) == {"H", "L"}
    assert 0 < meta["saved_blocks"] < 0.5 and meta["flops"]["blocks"] > 0
    assert meta["tokenizer"]["vocab_hash"] and meta["seconds"] > 0
    # a plain one-model call through the positional checkpoint gives the same as the plain path
    a, b = runs["root"] / "a.jsonl", runs["root"] / "b.jsonl"
    assert main(["sample", str(runs["H"]), "--num", "2", "--steps", "5", "--out", str(a)]) == 0
    assert main(["sample", "--model", f"H={runs['H']}", "--num", "2", "--steps", "5",
                 "--out", str(b)]) == 0
    ids = lambda p: [json.loads(l)["ids"] for l in p.read_text().splitlines()]
    assert ids(a) == ids(b)


def test_cli_prefix_from_validation(runs, capsys):
    from tdlm.api import load
    from tdlm.scheduling import prefixes_from_validation
    out = runs["root"] / "p.jsonl"
    rc = main(["sample", "--model", f"H={runs['H']}", "--model", f"L={runs['L']}",
               "--schedule", "light-first:0.25", "--steps", "8", "--num", "2",
               "--prefix-from-val", "5", "--out", str(out)])
    assert rc == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    pre, info = prefixes_from_validation(load(runs["H"]), 2, 5)
    for r, p in zip(recs, pre):
        assert r["ids"][:5] == p.tolist() and r["prefix_len"] == 5
        assert r["text"].startswith(r["prefix_text"]) and r["reference_text"]
    assert json.loads(out.with_suffix(".meta.json").read_text())["prefix_len"] == 5


@pytest.mark.parametrize("args,needles", [
    (["--model", "H=RUN_H", "--model", "L=RUN_L"], ["--schedule"]),
    (["--model", "H=RUN_H", "--model", "L=RUN_L", "--schedule", "Q8"], ["not loaded"]),
    (["--model", "H=RUN_H", "--model", "L=RUN_L", "--schedule", "H3,L3"], ["sum to 6"]),
    (["--model", "H=RUN_H", "--model", "L=RUN_S", "--schedule", "sandwich:0.5"], ["seq_len"]),
    (["--model", "H=RUN_H", "--model", "L=RUN_A", "--schedule", "sandwich:0.5"], ["'ar'"]),
    (["--model", "H=RUN_H", "--model", "H=RUN_L", "--schedule", "H8"], ["twice"]),
    (["--model", "RUN_H"], ["NAME=PATH"]),
    (["RUN_H", "--model", "H=RUN_L"], ["not both"]),
    (["--model", "H=RUN_H", "--prefix-from-val", "40"], ["nothing to generate"]),
    (["--model", "H=RUN_H", "--prefix-from-val", "0"], ["--prefix-from-val"]),
])
def test_cli_schedule_errors(runs, capsys, args, needles):
    sub = {"RUN_H": str(runs["H"]), "RUN_L": str(runs["L"]), "RUN_S": str(runs["S"]),
           "RUN_A": str(runs["A"])}
    args = [next((a.replace(k, v) for k, v in sub.items() if k in a), a) for a in args]
    rc = main(["sample", *args, "--steps", "8", "--num", "1",
               "--out", str(runs["root"] / "err.jsonl")])
    one_error_line(capsys, rc, *needles)
    assert not (runs["root"] / "err.jsonl").exists()


def test_cli_schedule_analyze(runs, capsys):
    import csv
    out = runs["root"] / "an"
    rc = main(["schedule", "analyze", "--model", f"H={runs['H']}", "--model", f"L={runs['L']}",
               "--grid", "4", "--batches", "1", "--batch-size", "2", "--trajectory-samples", "2",
               "--trajectory-steps", "6", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "step_importance.csv").open()))
    assert len(rows) == 4
    for r in rows:
        assert float(r["kl_heavy_light"]) >= 0 and float(r["kl_light_heavy"]) >= 0
        assert float(r["gap"]) == pytest.approx(float(r["loss_light"]) - float(r["loss_heavy"]))
    traj = list(csv.DictReader((out / "step_importance_trajectory.csv").open()))
    assert [int(r["step"]) for r in traj] == list(range(6))
    assert (out / "step_importance.png").stat().st_size > 0
    # the same model twice: no gap, no divergence
    out2 = runs["root"] / "an2"
    assert main(["schedule", "analyze", "--model", f"H={runs['H']}", "--model", f"L={runs['H']}",
                 "--grid", "2", "--batches", "1", "--batch-size", "2", "--trajectory-samples",
                 "0", "--out", str(out2)]) == 0
    for r in csv.DictReader((out2 / "step_importance.csv").open()):
        assert float(r["gap"]) == 0 and abs(float(r["kl_heavy_light"])) < 1e-12


def test_cli_schedule_search(runs, capsys):
    import csv
    out = runs["root"] / "search"
    rc = main(["schedule", "search", "--model", f"H={runs['H']}", "--model", f"L={runs['L']}",
               "--judge", str(runs["A"]), "--steps", "8", "--segments", "4",
               "--light-segments", "2", "--num", "2", "--seeds", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = {r["mask"]: r for r in csv.DictReader((out / "search.csv").open())}
    assert len(rows) == 6 + 2                   # C(4,2) + heavy-only + light-only
    assert rows["LHHL"]["name"] == "sandwich" and rows["HLLH"]["name"] == "light-middle"
    assert rows["LLHH"]["name"] == "light-first" and rows["HHLL"]["name"] == "light-last"
    assert float(rows["HHHH"]["saved_blocks"]) == 0
    from tdlm.api import load
    bh = model_forward_flops(load(runs["H"]).model, [32])["blocks"]
    bl = model_forward_flops(load(runs["L"]).model, [32])["blocks"]
    for m in ("LHHL", "HLLH"):                  # time-conditioned: one call per step
        assert float(rows[m]["saved_blocks"]) == pytest.approx(0.5 * (1 - bl / bh), abs=0.02)
    assert any(r["frontier"] == "True" for r in rows.values())
    assert float(rows["LHHL"]["gen_ppl"]) > 1 and float(rows["LHHL"]["entropy"]) > 0
    assert (out / "frontier.png").exists() and json.loads((out / "search.json").read_text())
    # every schedule's samples are kept: 2 seeds x 2 samples, and they are what was scored
    from tdlm.eval.genppl import generative_perplexity
    approx = pytest.approx
    for m, r in rows.items():
        import gzip
        raw = gzip.decompress((out / "samples" / f"{m}.jsonl.gz").read_bytes()).decode()
        recs = [json.loads(x) for x in raw.splitlines()]
        assert sorted(x["seed"] for x in recs) == [0, 0, 1, 1]
        assert all(len(x["ids"]) == 32 and x["prefix_len"] == 0 for x in recs)
        seed1 = [x for x in recs if x["seed"] == 1]
        assert generative_perplexity(seed1, runs["A"], retokenise=False)["gen_ppl"] == approx(
            float(r["ppl_seed_1"]), rel=1e-9)  # ids as sampled (same tokenizer)


def test_schedule_rescore_scores_stored_samples_under_another_judge(runs, capsys):
    """A finished search scored again: under its own judge the rows come back unchanged;
    under a uniform judge (logits all equal: NLL = log V per token, a known answer) every gen
    PPL is V; FLOPs columns are kept and partial.jsonl names the new judge, so the search run
    with it resumes instead of sampling again. A search without samples: one error line."""
    import csv
    import shutil
    from tdlm.eval.genppl import load_judge
    from tdlm.scheduling.runs import rescore_to_files
    out = runs["root"] / "search-rescore"
    args = ["schedule", "search", "--model", f"H={runs['H']}", "--model", f"L={runs['L']}",
            "--judge", str(runs["A"]), "--steps", "4", "--segments", "2", "--light-segments",
            "-1", "--masks", "LH", "--num", "3", "--seeds", "2", "--out", str(out)]
    assert main(args) == 0
    before = {r["mask"]: r for r in csv.DictReader((out / "search.csv").open())}
    assert main(["schedule", "rescore", "--out", str(out), "--judge", str(runs["A"])]) == 0
    again = {r["mask"]: r for r in csv.DictReader((out / "search.csv").open())}
    for m, r in before.items():
        for k in ("gen_ppl", "ppl_seed_0", "ppl_seed_1", "entropy", "tokens", "saved_blocks"):
            assert float(again[m][k]) == pytest.approx(float(r[k]), rel=1e-9), (m, k)
    judge = load_judge(runs["A"])
    # float64 logits: the cross-entropy runs in the logits' dtype, so log V comes out exact
    judge.logits = lambda x, mask: torch.zeros(*x.shape, judge.vocab_size,
                                               dtype=torch.float64)
    judge.label = "uniform"
    res = rescore_to_files(out, judge)
    assert {r["mask"] for r in res["rows"]} == set(before)
    for r in res["rows"]:
        assert r["gen_ppl"] == pytest.approx(judge.vocab_size, rel=1e-9)
        assert r["ppl_seed_0"] == pytest.approx(judge.vocab_size, rel=1e-9)
        assert r["saved_blocks"] == pytest.approx(float(before[r["mask"]]["saved_blocks"]))
        assert r["entropy"] == pytest.approx(float(before[r["mask"]]["entropy"]))
    meta = json.loads((out / "search.json").read_text())
    assert meta["judge"]["label"] == "uniform" and meta["rescored_from"]["label"] != "uniform"
    head = json.loads((out / "partial.jsonl").read_text().splitlines()[0])["settings"]
    assert head["judge"].startswith("uniform [weights ")      # label + weights fingerprint
    bare = runs["root"] / "search-bare"
    shutil.copytree(out, bare)
    shutil.rmtree(bare / "samples")
    capsys.readouterr()
    rc = main(["schedule", "rescore", "--out", str(bare), "--judge", str(runs["A"])])
    one_error_line(capsys, rc, "no stored samples", "search again")


def test_search_scored_later_equals_a_search_scored_as_it_went(runs, capsys):
    """``--score-later``: no judge loaded, rows without gen PPL (no frontier, no plot), the
    samples kept; ``tdlm schedule rescore --judge`` then gives every row a search with the
    judge gives (same draws: the samples do not depend on the judge), FLOPs columns equal.
    Neither or both of --judge / --score-later: one error line."""
    import csv
    base = ["schedule", "search", "--model", f"H={runs['H']}", "--model", f"L={runs['L']}",
            "--steps", "4", "--segments", "2", "--light-segments", "-1", "--masks", "LH",
            "--num", "3", "--seeds", "2"]
    now, later = runs["root"] / "scored-now", runs["root"] / "scored-later"
    assert main(base + ["--judge", str(runs["A"]), "--out", str(now)]) == 0
    assert main(base + ["--score-later", "--out", str(later)]) == 0
    assert "not scored (--score-later)" in capsys.readouterr().out
    rows = list(csv.DictReader((later / "search.csv").open()))
    assert {r["mask"] for r in rows} == {"HH", "LH", "LL"}
    assert all("gen_ppl" not in r and r["frontier"] == "False" for r in rows)
    # the entropy needs no judge: there at once, recomputed here from the kept samples
    import collections
    import gzip
    import math
    for r in rows:
        with gzip.open(later / "samples" / f"{r['mask']}.jsonl.gz", "rt") as f:
            recs = [json.loads(line) for line in f]
        per_seed = {}
        for x in recs:
            ids = x["ids"][x.get("prefix_len", 0):]
            n = len(ids)
            per_seed.setdefault(x["seed"], []).append(
                -sum(c / n * math.log(c / n) for c in collections.Counter(ids).values()))
        assert sorted(per_seed) == [0, 1] and all(len(v) == 3 for v in per_seed.values())
        for sd, es in per_seed.items():
            assert float(r[f"entropy_seed_{sd}"]) == pytest.approx(sum(es) / 3, abs=1e-12)
        assert float(r["entropy"]) == pytest.approx(sum(sum(v) for v in per_seed.values()) / 6,
                                                    abs=1e-12)
    assert not (later / "frontier.png").exists()
    assert json.loads((later / "search.json").read_text())["judge"] is None
    assert main(["schedule", "rescore", "--out", str(later), "--judge", str(runs["A"])]) == 0
    a = {r["mask"]: r for r in csv.DictReader((now / "search.csv").open())}
    b = {r["mask"]: r for r in csv.DictReader((later / "search.csv").open())}
    assert set(a) == set(b)
    for m in a:
        for k in ("gen_ppl", "ppl_seed_0", "ppl_seed_1", "entropy", "tokens", "saved_blocks",
                  "saved_full", "forward_calls", "frontier"):
            assert b[m][k] == a[m][k], (m, k)
        for k in ("entropy", "entropy_seed_0", "entropy_seed_1"):   # the judge-free columns
            assert float(next(r for r in rows if r["mask"] == m)[k]) == \
                pytest.approx(float(a[m][k]), abs=1e-12), (m, k)
    assert (later / "frontier.png").exists()
    for extra in ([], ["--judge", str(runs["A"]), "--score-later"]):
        capsys.readouterr()
        rc = main(base + extra + ["--out", str(runs["root"] / "bad")])
        one_error_line(capsys, rc, "--judge", "--score-later")


def test_cli_schedule_search_resumes_from_partial_rows(runs, capsys, monkeypatch):
    """A search stopped after two schedules resumes with only the rest sampled, and gives
    the rows of an uninterrupted search; other settings start over."""
    import csv
    args = ["schedule", "search", "--model", f"H={runs['H']}", "--model", f"L={runs['L']}",
            "--judge", str(runs["A"]), "--steps", "8", "--segments", "4", "--light-segments",
            "1", "--num", "2", "--seeds", "1"]
    full = runs["root"] / "search-full"
    assert main(args + ["--out", str(full)]) == 0
    want = {r["mask"]: r for r in csv.DictReader((full / "search.csv").open())}
    out = runs["root"] / "search-resume"
    calls = []
    import tdlm.eval.genppl as G
    real = G.generative_perplexity

    def stop_after_two(*a, **k):
        calls.append(1)
        if len(calls) > 2:                  # 2 schedules, each scored once
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(G, "generative_perplexity", stop_after_two)
    assert main(args + ["--out", str(out)]) != 0          # stopped (Ctrl-C: status 130)
    lines = (out / "partial.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 2 and not (out / "search.csv").exists()
    with open(out / "partial.jsonl", "a") as f:
        f.write('{"mask": "HLH')             # a line cut by the stop
    calls.clear()
    monkeypatch.setattr(G, "generative_perplexity", lambda *a, **k: (calls.append(1),
                                                                       real(*a, **k))[1])
    assert main(args + ["--out", str(out)]) == 0
    assert len(calls) == len(want) - 2         # only the schedules not done yet
    got = {r["mask"]: r for r in csv.DictReader((out / "search.csv").open())}
    assert got.keys() == want.keys()
    for m in want:
        assert got[m]["gen_ppl"] == want[m]["gen_ppl"], m
    calls.clear()
    assert main(args[:-1] + ["2", "--out", str(out)]) == 0       # 2 seeds: starts over
    assert len(calls) == len(want)             # one scoring per schedule, any seeds


@pytest.mark.parametrize("family", ["mdlm", "tdlm"])
def test_trajectory_and_same_input_analysis_in_memory(family):
    from tdlm.scheduling.analysis import (_log_probs_on_noised, analyze_steps,
                                          analyze_trajectories)
    if family == "mdlm":
        h, l = pipe_of(mdlm_cfg(2, tc=True), 0), pipe_of(mdlm_cfg(1, tc=True), 1)
        V = 11
    else:
        h, l = tdlm_pipe(2, 0), tdlm_pipe(1, 1)
        V = 6
    rows = analyze_trajectories(h, l, num=3, steps=6, seed=0)
    assert [r["step"] for r in rows] == list(range(6))
    assert all(r["kl_heavy_light"] > 0 and r["kl_light_heavy"] > 0 for r in rows if r["noised"])
    same = analyze_trajectories(h, h, num=3, steps=6, seed=0)
    assert all(abs(r.get("kl_heavy_light", 0.0)) < 1e-12 for r in same)
    assert all(r.get("top1_agreement", 1.0) == 1.0 for r in same)
    x0 = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(0))
    run, n = _log_probs_on_noised(h, x0, torch.ones_like(x0, dtype=torch.bool), 0.6,
                                  torch.Generator().manual_seed(1))
    lp, tgt = run(h.model)
    assert n > 0 and lp.shape[0] == n == tgt.shape[0]
    assert torch.isfinite(lp.gather(-1, tgt[:, None])).all()   # the target is a valid class
    other = tdlm_pipe(1, 1) if family == "mdlm" else pipe_of(mdlm_cfg(1, tc=True), 1)
    for fn in (analyze_trajectories, analyze_steps):    # the light model reads heavy's z
        with pytest.raises(ConfigError, match="cannot be mixed: family"):
            fn(h, other)


def test_cli_schedule_search_with_prefixes(runs, capsys):
    import csv
    out = runs["root"] / "search-prefix"
    rc = main(["schedule", "search", "--model", f"H={runs['H']}", "--model", f"L={runs['L']}",
               "--judge", str(runs["A"]), "--steps", "4", "--segments", "2",
               "--light-segments", "-1", "--masks", "LH", "--num", "2", "--seeds", "1",
               "--prefix-from-val", "6", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = {r["mask"]: r for r in csv.DictReader((out / "search.csv").open())}
    assert set(rows) == {"HH", "LH", "LL"}         # + the references
    # only the continuation is scored: at most 2 x (32 - 6) tokens
    assert all(0 < int(r["tokens"]) <= 2 * 26 for r in rows.values())
    assert json.loads((out / "search.json").read_text())["prefix_from_val"] == 6


def test_a_stopped_search_resumes_only_under_the_same_judge_weights(tmp_path):
    """partial.jsonl names the judge by label and weights fingerprint: a judge with the same
    label (trained again at the same path) but other weights starts the search over; the same
    judge resumes its rows; an unscored search (no judge) resumes as unscored."""
    from types import SimpleNamespace
    from tdlm.scheduling.runs import _judge_key, _resume_rows
    a = SimpleNamespace(label="tdlm AR model (step 8000)", weights_id="a" * 64)
    b = SimpleNamespace(label="tdlm AR model (step 8000)", weights_id="b" * 64)
    assert _judge_key(a) != _judge_key(b) and _judge_key(None) is None
    assert _judge_key(SimpleNamespace(label="hf", weights_id=None)) == "hf"
    path = tmp_path / "partial.jsonl"
    for judge in (a, None):
        settings = {"steps": 8, "judge": _judge_key(judge)}
        assert _resume_rows(path, settings) == {}
        with open(path, "a") as f:
            f.write(json.dumps({"mask": "LH", "gen_ppl": 3.0}) + "\n")
        assert _resume_rows(path, settings) == {"LH": {"mask": "LH", "gen_ppl": 3.0}}
    assert _resume_rows(path, {"steps": 8, "judge": _judge_key(b)}) == {}


def test_tdlm_prefix_is_shown_at_the_level_being_denoised():
    """A clamped TDLM prefix is shown to the model at level h as its height-h ancestors (a
    training row at level h never holds a node below height h), becomes leaves only in the
    output, and the prefix stays clamped."""
    pipe = tdlm_pipe(2, 0)
    fam, height, anc = pipe.family, pipe.family.height, pipe.family.anc
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z, sigma, level):
            seen.append((level.clone(), z[:, :3].clone()))
            return self.inner(z, sigma, level)

        def child(self, node, r):
            return self.inner.child(node, r)

    prefix = torch.tensor([[1, 4, 5]] * 4)
    out = fam.sample(Recorder(pipe.model), 4, 8, 6, torch.Generator().manual_seed(0),
                     prefix=prefix)
    assert torch.equal(out[:, :3], prefix)
    assert {int(lv[0]) for lv, _ in seen} == {0, 1}
    for lv, shown in seen:
        h = int(lv[0])
        assert torch.equal(shown, anc[h][prefix]) and (height[shown] == h).all()
