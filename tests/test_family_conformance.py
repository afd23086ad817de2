"""Every registered family honours the shared contract (parametrised over the registry, so a
new family is checked without editing this file).

* the family is found by the registry and builds a model from a small config of its first
  declared layout; its training loss is finite with finite, non-zero gradients;
* its evaluation NELBO per token is at least the entropy of the source (tokens i.i.d. uniform
  over V-1 symbols: log(V-1) nats), as any model's cross-entropy must be, within Monte-Carlo
  error (a loss normalised by the wrong count or missing terms fails this);
* ``sample`` returns ``num`` sequences of valid token ids, of the requested length unless the
  family declares variable-length output;
* its declared layouts are exactly the ones the config accepts;
* ``describe`` / ``process_signature`` are plain data, equal for equal configs;
* schedulable families sample with a one-model plan exactly as without a plan, and with two
  models of the same process alternating.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from tdlm.config import LAYOUTS, DataConfig, ModelConfig, RunConfig
from tdlm.errors import ConfigError
from tdlm.families.base import family_names, get_family_class

V, L = 24, 10
BOS = V - 1


def make(name: str, layout: str | None = None, seed: int = 0, perturb: bool = True):
    """A small model of the family; ``perturb=False`` keeps the library's initialisation
    (zero-initialised heads: uniform predictions, whose NELBO sits just above the entropy)."""
    cls = get_family_class(name)
    cfg = RunConfig(model=ModelConfig(family=name, vocab_size=V, d_model=32, n_layers=2,
                                      n_heads=2, cond_dim=16, max_seq_len=L, dropout=0.0,
                                      tree_K=5, tree_H=2),
                    data=DataConfig(seq_len=L, layout=layout or cls.layouts[0]))
    fam = cls(cfg, **cls.shape_resources(cfg))
    torch.manual_seed(seed)
    model = fam.build_model()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():       # zero-initialised heads would be trivial
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return fam, model


def batch(layout: str, n: int, seed: int) -> dict:
    x = torch.randint(0, V - 1, (n, L), generator=torch.Generator().manual_seed(seed))
    if layout == "varlen":
        cu = torch.arange(0, n * L + 1, L)
        x[:, 0] = BOS
        return {"input_ids": x.reshape(-1), "cu_seqlens": cu,
                "valid": torch.ones(n * L, dtype=torch.bool)}
    if layout == "packed_bos":
        x[:, 0] = BOS
    return {"input_ids": x, "valid": torch.ones_like(x, dtype=torch.bool)}


NAMES = family_names()


def test_registry_finds_the_families():
    assert {"mdlm", "tdlm", "ar", "did"} <= set(NAMES)
    with pytest.raises(ConfigError, match="not available"):
        get_family_class("no-such-family")


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_gradients_are_finite(name):
    fam, model = make(name)
    terms = fam.loss(model, batch(fam.layouts[0], 8, 1), torch.Generator().manual_seed(2))
    assert torch.isfinite(terms.nll).all() and float(terms.n_tokens.sum()) > 0
    (terms.nll.sum() / terms.n_tokens.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", NAMES)
def test_nelbo_is_at_least_the_source_entropy(name):
    """Uniform predictions (the initialisation) sit ~1% above log(V-1) (measured with 19,200
    sequences: MDLM 3.169, TDLM 3.188, AR 3.178, DID 3.174 vs 3.136), so a loss that drops a
    term or mis-counts tokens (pads, levels, a factor 2) falls below it."""
    fam, model = make(name, perturb=False)
    model.eval()
    vals = []
    with torch.no_grad():
        for s in range(12):
            t = fam.loss(model, batch(fam.layouts[0], 32, 10 + s),
                         torch.Generator().manual_seed(s), exact=True)
            vals.append(float(t.nll.double().sum() / t.n_tokens.double().sum()))
    mean = sum(vals) / len(vals)
    se = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 / len(vals) ** 0.5
    assert mean >= math.log(V - 1) - 4 * se - 1e-6, (name, mean, se, math.log(V - 1))


@pytest.mark.parametrize("name", NAMES)
def test_sample_shapes(name):
    fam, model = make(name)
    kw = {"bos_id": BOS} if "bos_id" in fam.sample_options else {}
    out = fam.sample(model.eval(), 3, L, 4, torch.Generator().manual_seed(0), **kw)
    rows = list(out)
    assert len(rows) == 3
    for r in rows:
        r = torch.as_tensor(r)
        assert r.dtype == torch.long and ((r >= 0) & (r < V)).all()
        assert len(r) <= L if fam.variable_length else len(r) == L


@pytest.mark.parametrize("name", NAMES)
def test_declared_layouts_are_what_the_config_accepts(name):
    cls = get_family_class(name)
    for layout in LAYOUTS:
        try:
            make(name, layout)
            ok = True
        except ConfigError:
            ok = False
        assert ok == (layout in cls.layouts), (name, layout)


@pytest.mark.parametrize("name", NAMES)
def test_declarations_are_plain_data(name):
    a, _ = make(name)
    b, _ = make(name, seed=1)
    json.dumps(a.describe())
    assert a.process_signature() == b.process_signature()
    assert isinstance(a.sample_options, frozenset) and {"temperature", "top_p"} <= a.sample_options
    assert isinstance(a.causal, bool) and isinstance(a.schedulable, bool)


@pytest.mark.parametrize("name", family_names(schedulable=True))
def test_schedulable_families_take_plans(name):
    fam, m1 = make(name, seed=0)
    _, m2 = make(name, seed=1)
    m1.eval(), m2.eval()
    plain = fam.sample(m1, 3, L, 6, torch.Generator().manual_seed(5))
    one = fam.sample(m1, 3, L, 6, torch.Generator().manual_seed(5), models={"a": m1},
                     plan=["a"] * 6)
    assert torch.equal(plain, one)
    mixed = fam.sample(m1, 3, L, 6, torch.Generator().manual_seed(5), models={"a": m1, "b": m2},
                       plan=["a", "b"] * 3)
    assert mixed.shape == plain.shape and ((mixed >= 0) & (mixed < V)).all()


@pytest.mark.parametrize("name", NAMES)
def test_an_option_the_family_does_not_take_is_a_one_line_error(name):
    """No option is silently ignored: the sampler lists its options (no **kwargs) and the
    Pipeline refuses others with one line naming them."""
    from tdlm.pipeline import Pipeline
    fam, model = make(name)
    with pytest.raises(TypeError):
        fam.sample(model, 1, L, 2, torch.Generator().manual_seed(0), no_such_option=1)

    class Tok:
        bos_id = BOS
    pipe = Pipeline(fam.cfg, fam, model, Tok())
    bad = "steps_split" if "steps_split" not in fam.sample_options else "trajectory"
    with pytest.raises(ConfigError, match=f"{bad}.*do not apply") as ei:
        pipe.generate_ids(1, 4, **{bad: [2, 2]})
    assert "\n" not in str(ei.value)
