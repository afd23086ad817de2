"""A tiny MDLM trained on a Markov source with exactly known entropy: its NELBO upper-bounds
the entropy and comes within a stated margin; its samples match the source's statistics."""
import math

import numpy as np
import pytest
import torch

from tdlm.config import RunConfig, ModelConfig, DiffusionConfig, DataConfig
from tdlm.families import get_family
from tdlm.tree import VocabTree
from synthetic import MarkovSource

V, L = 6, 8
# Stated margins: NELBO within 6% (MDLM, 300 steps) / 10% (TDLM, 900 steps; two levels to
# learn) of the true entropy after CPU training of a few seconds to a minute.
MARGIN = {"mdlm": 0.06, "tdlm": 0.10}
STEPS = {"mdlm": 300, "tdlm": 900}
SAMPLE_TV = {"mdlm": 0.05, "tdlm": 0.08}   # stated tolerances on sample statistics
# H=2, K=3 tree over the 6 symbols: {0,1,2} {3,4} {5}
TREE = VocabTree.from_assignment([np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 0])], K=3)   # NELBO within 6% of the true entropy after ~40 s of CPU training


def train_tiny(family_name="mdlm", steps=300, seed=0, **model_kw):
    torch.manual_seed(seed)
    src = MarkovSource(V, L, seed=3, concentration=0.3, stationary=True)
    cfg = RunConfig(model=ModelConfig(family=family_name, vocab_size=V, d_model=64, n_layers=2,
                                      n_heads=4, cond_dim=32, max_seq_len=L, dropout=0.0,
                                      time_conditioning=family_name == "tdlm", tree_H=2, tree_K=3,
                                      **model_kw),
                    diffusion=DiffusionConfig(), data=DataConfig(seq_len=L))
    fam = get_family(cfg, **({"tree": TREE} if family_name == "tdlm" else {}))
    model = fam.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = src.sample(96, g)
        terms = fam.loss(model, {"input_ids": x}, g)
        loss = terms.per_token()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for grp in opt.param_groups:
            grp["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * (0.1 if step > 0.8 * steps else 1)
        opt.step()
    model.eval()
    return src, fam, model


def nelbo_per_seq(src, fam, model, n=48, batch=256, seed=123):
    g = torch.Generator().manual_seed(seed)
    vals = []
    with torch.no_grad():
        for _ in range(n):
            x = src.sample(batch, g)
            vals.append(fam.loss(model, {"input_ids": x}, g, exact=True).nll.double().mean().item())
    v = torch.tensor(vals)
    return v.mean().item(), v.std().item() / math.sqrt(n)


@pytest.fixture(scope="module", params=["mdlm", "tdlm"])
def trained(request):
    return (request.param, *train_tiny(request.param, steps=STEPS[request.param]))


def test_trained_model_nelbo_bounds_and_approaches_entropy(trained):
    name, src, fam, model = trained
    H = src.entropy()
    nelbo, se = nelbo_per_seq(src, fam, model)
    print(f"entropy {H:.4f} nats/seq, NELBO {nelbo:.4f} +- {se:.4f}")
    assert nelbo > H - 3 * se                 # an upper bound (up to Monte-Carlo error)
    assert nelbo < H * (1 + MARGIN[name]), (nelbo, H)


def test_trained_model_samples_match_source_statistics(trained):
    name, src, fam, model = trained
    g = torch.Generator().manual_seed(0)
    s = fam.sample(model, 3000, L, 16, g)
    first = torch.bincount(s[:, 0], minlength=V).double() / len(s)
    tv_first = 0.5 * (first - src.pi0.double()).abs().sum().item()
    pairs = torch.zeros(V, V, dtype=torch.float64)
    pairs.index_put_((s[:, :-1].reshape(-1), s[:, 1:].reshape(-1)),
                     torch.ones(s[:, 1:].numel(), dtype=torch.float64), accumulate=True)
    emp_P = pairs / pairs.sum(-1, keepdim=True).clamp_min(1)
    row_w = pairs.sum(-1) / pairs.sum()
    tv_trans = (row_w * 0.5 * (emp_P - src.P.double()).abs().sum(-1)).sum().item()
    print(f"TV first token {tv_first:.4f}, weighted TV of transitions {tv_trans:.4f}")
    assert tv_first < SAMPLE_TV[name] and tv_trans < SAMPLE_TV[name]
