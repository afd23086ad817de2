"""The trainer logs cumulative training FLOPs (``train_flops`` in metrics.jsonl): 3 x the
analytic forward FLOPs of what the backbone forwarded in the training steps only (not the
validation forwards), carried exactly across a resume."""
from __future__ import annotations

import json

import pytest
import torch

from tdlm.flops import TrainingFlops, forward_flops
from tdlm.train.loop import train

from test_cli import write_corpus  # noqa: E402
from test_train import tiny_cfg  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def _per_step_by_hand(cfg) -> float:
    """3 x forward FLOPs of a dense [B, L] batch, from the formula module (MDLM: the head
    computes V outputs, the input table has V + 1 rows)."""
    m = cfg.backbone
    V = m.vocab_size
    f = forward_flops(m, [cfg.data.seq_len] * cfg.train.global_batch, head_out=V, n_embed=V + 1)
    return 3 * f["full"]


def test_dense_mdlm_counts_steps_not_evals_and_resumes_exactly(corpus, tmp_path):
    cache = tmp_path / "cache"
    cfg = tiny_cfg(corpus, cache, "train.ckpt_every=2")
    train(cfg, tmp_path / "a", progress=False)
    from tdlm.config import load_config
    per_step = _per_step_by_hand(load_config(str(tmp_path / "a" / "config.json")))  # V resolved
    recs = _records(tmp_path / "a")
    tr = {r["step"]: r["train_flops"] for r in recs if r["split"] == "train"}
    assert tr == {s: pytest.approx(s * per_step, rel=1e-12) for s in range(1, 7)}
    val = [r for r in recs if r["split"] == "val"]
    assert val and all(r["train_flops"] == pytest.approx(r["step"] * per_step) for r in val)
    # interrupted after step 4 (a checkpoint at 4), resumed to 6: the same totals
    train(cfg, tmp_path / "b", progress=False, stop_after=4)
    train(cfg, tmp_path / "b", resume=True, progress=False)
    tr_b = {r["step"]: r["train_flops"] for r in _records(tmp_path / "b") if r["split"] == "train"}
    assert tr_b[6] == pytest.approx(tr[6], rel=1e-12)


def test_packed_lengths_are_counted_not_the_padded_shape():
    from tdlm.nn.dit import DiT
    from tdlm.nn.layout import PackedLayout
    from tdlm.config import get_preset
    cfg = get_preset("tiny").override(["backbone.d_model=32", "backbone.n_layers=1",
                                       "backbone.n_heads=2", "backbone.cond_dim=16",
                                       "backbone.vocab_size=50"])

    class M(torch.nn.Module):           # a DiT without a head: blocks + embedding + time
        def __init__(self):
            super().__init__()
            self.dit = DiT(cfg.backbone, 51)

        def forward(self, x, **kw):
            return self.dit(x, **kw)

    m = M()
    fl = TrainingFlops(m)
    cu = torch.tensor([0, 3, 10, 12])
    m(torch.randint(0, 50, (12,)), sigma=torch.zeros(3), packing=PackedLayout(cu))
    got = fl.step_done()
    from tdlm.flops import model_forward_flops
    assert got == pytest.approx(3 * model_forward_flops(m, [3, 7, 2])["full"])
    assert got != pytest.approx(3 * model_forward_flops(m, [7, 7, 7])["full"])
    m(torch.randint(0, 50, (2, 5)))     # a dense forward, then dropped (as validation is)
    fl.discard()
    assert fl.step_done() == 0.0 and fl.total == pytest.approx(got)
    fl.close()
    m(torch.randint(0, 50, (2, 5)))
    assert fl.step_done() == 0.0


def test_each_forward_is_counted_with_its_own_conditioning_rows():
    """A time-conditioned DiT computes one conditioning row when sigma is None or [1] and B
    rows for sigma [B]; TrainingFlops counts each forward of a step as it ran (two forwards of
    one step, e.g. gradient accumulation, are two forwards, not one joined batch)."""
    from tdlm.nn.dit import DiT
    from tdlm.config import get_preset
    from tdlm.flops import model_forward_flops
    cfg = get_preset("tiny").override(["backbone.d_model=32", "backbone.n_layers=1",
                                       "backbone.n_heads=2", "backbone.cond_dim=16",
                                       "backbone.vocab_size=50",
                                       "backbone.time_conditioning=true"])
    m = DiT(cfg.backbone, 51)
    fl = TrainingFlops(m)
    x = torch.randint(0, 50, (3, 8))
    per_row = model_forward_flops(m, [8] * 3)["full"] - model_forward_flops(m, [8] * 3, True)["full"]
    assert per_row > 0                                   # 2 of the 3 rows' conditioning
    m(x, torch.rand(3))
    assert fl.step_done() == pytest.approx(3 * model_forward_flops(m, [8] * 3)["full"])
    m(x, None)
    assert fl.step_done() == pytest.approx(3 * model_forward_flops(m, [8] * 3, True)["full"])
    m(x, torch.rand(1))
    m(x, torch.rand(3))                                  # two forwards in one step
    both = fl.step_done()
    assert both == pytest.approx(3 * (model_forward_flops(m, [8] * 3, True)["full"]
                                      + model_forward_flops(m, [8] * 3)["full"]))
    assert both != pytest.approx(3 * model_forward_flops(m, [8] * 6)["full"])
    fl.close()
