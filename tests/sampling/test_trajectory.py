"""Trajectories of the ancestral samplers (MDLM, TDLM): recording never changes the samples
(same seed, bit-identical ids with and without it, with a plan and a prefix too), the record
starts at the all-noise state, follows the process (MDLM: a position once unmasked never
changes; TDLM: every position descends the tree one level per window, coarse to fine) and ends
at the returned samples; and the labels the viewer shows for states that are not tokens."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from test_family_conformance import V, make, opts  # noqa: E402

from tdlm.sampling.result import StepPlan  # noqa: E402

STEPS, NUM = 12, 3


def sample(fam, model, seed=0, plan=None, **kw):
    gen = torch.Generator().manual_seed(seed)
    return fam.sample(model, NUM, 10, opts(fam, steps=STEPS, **kw), gen, plan)


@pytest.mark.parametrize("name", ["mdlm", "tdlm"])
def test_recording_does_not_change_the_samples(name):
    fam, model = make(name)
    other = make(name, seed=1)[1]
    prefix = torch.tensor([[3, 4]] * NUM)
    for kw, plan in (({}, None), ({"prefix": prefix}, None), ({"temperature": 0.7}, None),
                     ({}, StepPlan({"a": model, "b": other}, ["a", "b"] * (STEPS // 2)))):
        plain = sample(fam, model, 5, plan, **kw)
        rec = sample(fam, model, 5, plan, trajectory=True, **kw)
        assert plain.trajectory is None and rec.trajectory
        assert torch.equal(plain.ids, rec.ids), kw


def test_mdlm_trajectory_unmasks_monotonically():
    fam, model = make("mdlm")
    res = sample(fam, model, trajectory=True)
    traj = res.trajectory
    assert traj[0]["step"] == -1 and traj[0]["initial"]
    assert all(x == fam.mask_id for row in traj[0]["ids"] for x in row)
    assert [r["step"] for r in traj[1:STEPS + 1]] == list(range(STEPS))
    assert torch.equal(torch.tensor(traj[-1]["ids"]), res.ids)
    for a, b in zip(traj, traj[1:]):
        a, b = torch.tensor(a["ids"]), torch.tensor(b["ids"])
        fixed = a != fam.mask_id
        assert torch.equal(a[fixed], b[fixed])           # unmasked tokens never change
    labels = fam.state_labels({1, 2, fam.mask_id})
    assert labels == {fam.mask_id: {"label": "[MASK]", "kind": "mask"}}
    assert fam.state_labels({1, 2}) == {}


def test_tdlm_trajectory_descends_the_tree_level_by_level():
    fam, model = make("tdlm")
    res = sample(fam, model, trajectory=True)
    traj, H = res.trajectory, fam.H
    height = fam.height
    first = torch.tensor(traj[0]["ids"])
    assert traj[0]["initial"] and bool((first == fam.root).all())
    phases = [r["phase"] for r in traj[1:STEPS + 1]]
    assert phases == sorted(phases, reverse=True) and phases[0] == H - 1 and phases[-1] == 0
    for a, b in zip(traj, traj[1:]):
        ha, hb = height[torch.tensor(a["ids"])], height[torch.tensor(b["ids"])]
        assert bool((hb <= ha).all()) and bool((ha - hb <= 1).all())
        moved = ha != hb
        # a move goes to a child: the old node is the new node's parent
        parent = torch.from_numpy(fam.tree.parent)
        assert torch.equal(parent[torch.tensor(b["ids"])[moved]], torch.tensor(a["ids"])[moved])
    assert torch.equal(torch.tensor(traj[-1]["ids"]), res.ids)
    assert bool((height[res.ids] == 0).all())


def test_tdlm_labels_name_a_cluster_by_its_most_frequent_tokens():
    fam, _ = make("tdlm")
    t = fam.tree
    counts = np.arange(V, dtype=np.float64)[::-1].copy()        # token 0 most frequent
    counts[V - 2] = 1000                                         # ... except this one
    nodes = [int(n) for n in t.nodes_at_height(1)] + [t.root]
    labels = fam.state_labels(set(nodes) | {0, 1}, counts, decode=lambda ids: f"w{ids[0]}")
    assert set(labels) == set(nodes)
    for n in nodes:
        h = int(t.height[n])
        members = [x for x in range(V) if int(t.anc[h][x]) == n]
        best = sorted(members, key=lambda x: (-counts[x], x))[:3]
        lab = labels[n]
        assert lab["members"] == [f"w{x}" for x in best] and lab["size"] == len(members)
        assert lab["height"] == h and lab["label"] == "|".join(f"w{x}" for x in best)
    assert labels[t.root]["kind"] == "root" and labels[nodes[0]]["kind"] == "node"
