"""The DiT backbone and model-level properties: published parameter counts, causal vs
bidirectional attention, time conditioning, dropout, and the AR family's loss against a
hand-computed cross-entropy (activation checkpointing: tests/train/test_parallel.py)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tdlm.cli import main
from tdlm.config import DataConfig, ModelConfig, RunConfig
from tdlm.families import get_family
from tdlm.nn.dit import DiT



def mcfg(family="mdlm", **kw) -> ModelConfig:
    base = dict(family=family, vocab_size=50, d_model=32, n_layers=2, n_heads=2, cond_dim=16,
                max_seq_len=16, dropout=0.0, time_conditioning=True)
    base.update(kw)
    return ModelConfig(**base)


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: adaLN-zero and the zero-initialised output layer make a
    fresh model ignore attention and sigma, which would make the checks below vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def tokens(B=2, L=12, V=50, seed=0):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def test_info_mdlm_small(capsys):
    assert main(["info", "--preset", "mdlm-small", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    c = info["parameters"]
    assert c["total"] == 169_627_218
    assert c["total"] == pytest.approx(169.6e6, rel=0.002)
    assert round(100 * c["head_share"], 1) == 22.8
    assert c["head"] == 768 * 50258 + 50258          # the output linear, [MASK] included
    assert c["embedding"] == 50258 * 768
    assert info["vocab_size"] == 50257 and info["d_model"] == 768 and info["n_layers"] == 12
    assert info["run_tokens"] == info["max_steps"] * info["global_batch"] * info["seq_len"]


def test_info_states_the_paper_shaped_budgets(capsys):
    """The parity presets' budget in the table: 1000 steps x 16 x 256 = 4,096,000 tokens."""
    assert main(["info", "--preset", "mdlm-cpu", "--preset", "tdlm-cpu"]) == 0
    out = capsys.readouterr().out
    assert "22.69%" in out and "0.35%" in out and out.count("4,096,000") == 2


@pytest.mark.parametrize("family,causal", [("ar", True), ("mdlm", False)])
def test_causal_attention_ignores_the_future(family, causal):
    m = randomized(DiT(mcfg(family), 50, causal=causal)).eval()
    x = tokens()
    assert m.causal is causal and m.layout(x).causal is causal
    j = 7
    x2 = x.clone()
    x2[:, j] = (x[:, j] + 1) % 50
    with torch.no_grad():
        h1, _ = m(x)
        h2, _ = m(x2)
    assert not torch.allclose(h1[:, j], h2[:, j])
    if causal:
        assert torch.equal(h1[:, :j], h2[:, :j])            # past untouched, bit for bit
        assert not torch.allclose(h1[:, j + 1:], h2[:, j + 1:])
    else:
        for i in range(j):                                   # every earlier position moves
            assert (h1[:, i] - h2[:, i]).abs().max() > 1e-4, i


@pytest.mark.parametrize("on", [False, True])
def test_time_conditioning(on):
    m = randomized(DiT(mcfg(time_conditioning=on), 50)).eval()
    x = tokens()
    with torch.no_grad():
        h1, c1 = m(x, torch.tensor([0.1, 0.1]))
        h2, c2 = m(x, torch.tensor([3.0, 3.0]))
        h0, _ = m(x, None)
    if on:
        assert not torch.allclose(h1, h2) and not torch.allclose(c1, c2)
    else:
        assert torch.equal(h1, h2) and torch.equal(c1, c2) and torch.equal(h0, h1)


def test_dropout_only_in_train_mode():
    m = randomized(DiT(mcfg(dropout=0.3), 50))
    x = tokens()
    sig = torch.tensor([0.5, 0.5])
    m.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        e1, _ = m(x, sig)
        torch.manual_seed(2)
        e2, _ = m(x, sig)
        assert torch.equal(e1, e2)
        m.train()
        torch.manual_seed(1)
        t1, _ = m(x, sig)
        torch.manual_seed(2)
        t2, _ = m(x, sig)
        torch.manual_seed(1)
        t1b, _ = m(x, sig)
    assert not torch.allclose(t1, t2) and not torch.allclose(t1, e1)
    assert torch.equal(t1, t1b)          # dropout follows the torch RNG (exact resume)
    no_drop = randomized(DiT(mcfg(dropout=0.0), 50)).train()
    with torch.no_grad():
        torch.manual_seed(1)
        a, _ = no_drop(x, sig)
        torch.manual_seed(2)
        b, _ = no_drop(x, sig)
    assert torch.equal(a, b)


def test_ar_loss_is_hand_computed_cross_entropy():
    cfg = RunConfig(model=mcfg("ar", time_conditioning=False), data=DataConfig(seq_len=16))
    fam = get_family(cfg)
    model = randomized(fam.build_model()).eval()
    x = tokens(B=3, L=10)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, 6:] = False          # padding: not scored
    valid[2, 2:] = False
    with torch.no_grad():
        terms = fam.loss(model, {"input_ids": x, "valid": valid}, torch.Generator(), exact=True)
        logits = model(x[:, :-1]).double()
    for b in range(3):
        nll, n = 0.0, 0
        for i in range(1, 10):                # token i predicted from tokens < i
            if not valid[b, i]:
                continue
            row = logits[b, i - 1]
            nll += -(row[x[b, i]] - torch.logsumexp(row, 0)).item()
            n += 1
        assert terms.n_tokens[b].item() == n
        assert terms.nll[b].item() == pytest.approx(nll, rel=1e-5)
    # the prediction at position i depends only on tokens <= i (teacher forcing is causal)
    assert terms.n_tokens.tolist() == [9.0, 5.0, 1.0]
    full = F.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum")
    assert terms.nll[0].item() == pytest.approx(full.item(), rel=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    from tdlm.nn.dit import Rotary, apply_rotary
    torch.manual_seed(0)
    hd, L = 16, 12
    rot = Rotary(hd)
    cos, sin = rot(torch.arange(L))
    q, k = torch.randn(hd), torch.randn(hd)
    Q = apply_rotary(q.expand(L, hd), cos, sin)
    K = apply_rotary(k.expand(L, hd), cos, sin)
    S = Q @ K.T                                   # S[m, n] = f(m - n)
    for off in range(-3, 4):
        d = torch.diagonal(S, off)
        assert torch.allclose(d, d[0].expand_as(d), atol=1e-4)
    assert torch.allclose(Q.norm(dim=-1), q.norm().expand(L), atol=1e-5)   # a rotation
    assert not torch.allclose(S[0, 1], S[0, 2])
