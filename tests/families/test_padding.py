"""Padding never enters a reported NELBO (issue "Trustworthy numbers", item 4).

Reference convention: MDLM's ``nlls * attention_mask`` and GIDD's evaluation average over
real (non-pad) positions only. With a context-free network (its logits do not depend on the
other positions, so padding cannot change a real position's prediction), a padded row must give
exactly the NELBO of the same row without its padding under the same noise: same t, same
masks at the real positions (the uniforms of a row are drawn in position order)."""
import numpy as np
import pytest
import torch

from tdlm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from tdlm.eval.nelbo import evaluate_nelbo
from tdlm.families import get_family
from tdlm.families.tree import TreeDiffusion
from tdlm.tree import VocabTree

V, L, PAD = 6, 16, 5


def cfg(family, **diff):
    return RunConfig(model=ModelConfig(family=family, vocab_size=V, d_model=16, n_layers=1,
                                       n_heads=2, cond_dim=8, max_seq_len=L, tree_K=3, tree_H=2),
                     diffusion=DiffusionConfig(**diff), data=DataConfig(seq_len=L, layout="crop_pad"))


class ContextFreeMasked(torch.nn.Module):
    """MDLM network whose logits at a position depend on nothing (not even the position)."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Parameter(torch.randn(V, generator=torch.Generator().manual_seed(0)))

    def forward(self, z, sigma=None):
        return self.b.expand(*z.shape, V)


class ContextFreeTree(torch.nn.Module):
    def __init__(self, tree_model):
        super().__init__()
        self.t = tree_model
        self.b = torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(0)))

    def features(self, z, sigma):
        return self.b.expand(*z.shape, 3)

    def logits_from_features(self, feats, z, level):
        return feats.float().masked_fill(~self.t.child_mask(z), float("-inf"))


def family_and_net(name, **diff):
    if name == "mdlm":
        return get_family(cfg("mdlm", **diff)), ContextFreeMasked()
    tree = VocabTree.from_assignment([np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 0])], K=3)
    fam = TreeDiffusion(cfg("tdlm", **diff), tree=tree)
    return fam, ContextFreeTree(fam.build_model())


def padded(x, k):
    ids = x.clone()
    ids[:, k:] = PAD
    valid = torch.zeros_like(ids, dtype=torch.bool)
    valid[:, :k] = True
    return {"input_ids": ids, "valid": valid}


@pytest.mark.parametrize("name", ["mdlm", "tdlm"])
@pytest.mark.parametrize("T", [0, 8])
def test_padded_row_equals_unpadded_row_exactly(name, T):
    fam, net = family_and_net(name, num_timesteps=T)
    x = torch.randint(0, V, (1, L), generator=torch.Generator().manual_seed(1))
    differs = 0
    for k in (1, 3, 8, 15):
        for seed in range(12):
            a = fam.loss(net, padded(x, k), torch.Generator().manual_seed(seed), exact=True)
            b = fam.loss(net, {"input_ids": x[:, :k]}, torch.Generator().manual_seed(seed), exact=True)
            # equal up to float32 summation order (a sum of 16 terms with zeros vs 15 terms)
            assert torch.allclose(a.nll, b.nll, rtol=1e-6, atol=0), (k, seed, a.nll, b.nll)
            assert float(a.n_tokens.sum()) == k == float(b.n_tokens.sum())
            for part in a.parts:
                assert torch.allclose(a.parts[part], b.parts[part], rtol=1e-6, atol=0)
            # the padded row's full-length loss (pads counted) is a different number
            full = fam.loss(net, {"input_ids": padded(x, k)["input_ids"]},
                            torch.Generator().manual_seed(seed), exact=True)
            differs += int(not torch.allclose(full.nll, a.nll, rtol=1e-3))
    assert differs > 0        # the check can fail: counting pads changes the NELBO


@pytest.mark.parametrize("name", ["mdlm", "tdlm"])
def test_half_padded_batch_per_token_nelbo(name):
    """A batch whose rows are half padding: per-token NELBO over real tokens averages the same
    quantity as unpadded rows (within Monte-Carlo error), not ~2x it."""
    fam, net = family_and_net(name)
    x = torch.randint(0, V, (256, L), generator=torch.Generator().manual_seed(2))
    half = fam.loss(net, padded(x, L // 2), torch.Generator().manual_seed(3), exact=True)
    clean = fam.loss(net, {"input_ids": x[:, :L // 2]}, torch.Generator().manual_seed(3), exact=True)
    # different rows get different noise here (a [B, L] draw vs a [B, L/2] one): Monte Carlo
    assert float(half.per_token().detach()) == pytest.approx(float(clean.per_token().detach()), rel=0.1)
    # what the old code reported: pads in the numerator, real tokens in the denominator
    wrong = fam.loss(net, {"input_ids": padded(x, L // 2)["input_ids"]},
                     torch.Generator().manual_seed(3), exact=True)
    assert float(wrong.nll.detach().sum() / half.n_tokens.sum()) > 1.5 * float(half.per_token().detach())


@pytest.mark.parametrize("name", ["mdlm", "tdlm"])
def test_train_on_padding_counts_pads_in_training_only(name):
    fam, net = family_and_net(name, train_on_padding=True)
    x = torch.randint(0, V, (64, L), generator=torch.Generator().manual_seed(4))
    b = padded(x, 4)
    train = fam.loss(net, b, torch.Generator().manual_seed(5), exact=False)
    assert float(train.n_tokens.sum()) == 64 * L                  # pads modelled (GIDD)
    ev = fam.loss(net, b, torch.Generator().manual_seed(5), exact=True)
    assert float(ev.n_tokens.sum()) == 64 * 4                     # never in evaluation
    fam2, _ = family_and_net(name)                                # default: pads never counted
    assert float(fam2.loss(net, b, torch.Generator().manual_seed(5)).n_tokens.sum()) == 64 * 4


class Rows:
    """A dataset of fixed (ids, valid) rows in the library's ``get`` protocol."""

    def __init__(self, batch):
        self.b = batch

    def __len__(self):
        return len(self.b["input_ids"])

    def get(self, i, epoch=0, seed=None):
        return self.b["input_ids"][i], self.b["valid"][i]


@pytest.mark.parametrize("name", ["mdlm", "tdlm"])
def test_evaluation_excludes_padding_and_states_its_conventions(name):
    fam, net = family_and_net(name)
    x = torch.randint(0, V, (32, L), generator=torch.Generator().manual_seed(6))
    k = 5
    out = evaluate_nelbo(fam, net, Rows(padded(x, k)), batch_size=8, device=torch.device("cpu"))
    assert out["tokens"] == 32 * k
    assert out["eval_t_min"] == 1e-3 and out["padding"] == "excluded"
    assert "U(1e-3, 1)" in out["t_convention"] or "U(0.001, 1)" in out["t_convention"]
    # equal to the sum over the same batches computed directly with the family's loss
    ref_nll = 0.0
    from tdlm.eval.nelbo import _batch_seed
    for bi in range(4):
        rows = {kk: v[bi * 8:(bi + 1) * 8] for kk, v in padded(x, k).items()}
        t = fam.loss(net, rows, torch.Generator().manual_seed(_batch_seed(0, bi)), exact=True)
        ref_nll += float(t.nll.detach().double().sum())
    assert out["nelbo_per_token"] == pytest.approx(ref_nll / (32 * k), rel=1e-12)
