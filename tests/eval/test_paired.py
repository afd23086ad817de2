"""Per-batch values of the NELBO evaluation and the paired difference of two models evaluated
on the same batches (tdlm.eval.nelbo.paired_difference)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from tdlm.config import get_preset
from tdlm.errors import ConfigError
from tdlm.eval.nelbo import evaluate_nelbo, paired_difference
from tdlm.train.throughput import build_step_context


@pytest.fixture(scope="module")
def two_evals():
    cfg = get_preset("tiny").override(["backbone.n_layers=1", "backbone.d_model=32",
                                       "backbone.n_heads=2", "backbone.cond_dim=16"])
    data, fam, model, _, _ = build_step_context(cfg, "cpu")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    kw = dict(batch_size=4, max_batches=6, seed=0, repeats=2)
    return (evaluate_nelbo(fam, model, data.val, **kw), evaluate_nelbo(fam, other, data.val, **kw),
            evaluate_nelbo(fam, model, data.val, **dict(kw, max_batches=5)))


def test_per_batch_values_add_up(two_evals):
    a, _, _ = two_evals
    pb = a["per_batch"]
    assert len(pb["nll"]) == a["batches"] == 6
    assert sum(pb["nll"]) / sum(pb["tokens"]) == pytest.approx(a["nelbo_per_token"], rel=1e-12)
    assert sum(pb["tokens"]) == pytest.approx(2 * a["tokens"])       # two noise draws


def test_paired_difference_against_a_hand_formula(two_evals):
    a, b, _ = two_evals
    r = paired_difference(a, b)
    assert r["diff_per_token"] == pytest.approx(a["nelbo_per_token"] - b["nelbo_per_token"],
                                                abs=1e-12)
    e = np.array(a["per_batch"]["nll"]) - np.array(b["per_batch"]["nll"])
    t = np.array(a["per_batch"]["tokens"])
    D = e.sum() / t.sum()
    resid = e - D * t
    want = math.sqrt(len(e) / (len(e) - 1) * float((resid ** 2).sum())) / t.sum()
    assert r["stderr"] == pytest.approx(want, rel=1e-10)
    # the shared batch difficulty cancels: far below either evaluation's own error
    assert r["stderr"] < 0.5 * min(a["stderr_per_token"], b["stderr_per_token"])


def test_identical_evaluations_and_mismatched_batches(two_evals):
    a, _, short = two_evals
    r = paired_difference(a, a)
    assert r["diff_per_token"] == 0 and r["stderr"] == 0
    with pytest.raises(ConfigError, match="same batches"):
        paired_difference(a, short)
    with pytest.raises(ConfigError, match="per-batch"):
        paired_difference(a, {"nelbo_per_token": 1.0})
