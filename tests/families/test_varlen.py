"""Ragged (``varlen``) batches for MDLM, TDLM and AR: B sequences packed without padding
(``cu_seqlens``), each with its own t, in one forward pass.

* equal lengths: the packed NELBO equals the dense one on the same batch and seed (the noise
  stream of T = B*L positions is the dense stream in row-major order; only float summation
  and attention padding differ);
* AR on ragged lengths: each sequence's packed NLL equals that sequence scored alone (causal
  attention stays inside each sequence);
* diffusion families on ragged lengths: a sequence's NELBO does not change when another
  sequence of the batch changes (no leakage through attention, time input or counts), and it
  is at least the entropy of the source;
* a short training run on the ``varlen`` layout for each of them.
"""
from __future__ import annotations

import math

import pytest
import torch

from tdlm.config import get_preset

from test_family_conformance import BOS, L, V, make

FAMS = ["mdlm", "tdlm", "ar"]


def ragged(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, V - 1, (n,), generator=g) for n in lengths]
    for s in seqs:
        s[0] = BOS
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()))
    return seqs, {"input_ids": torch.cat(seqs), "cu_seqlens": cu}


@pytest.mark.parametrize("name", FAMS)
def test_equal_lengths_packed_equals_dense(name):
    fam, model = make(name, layout="varlen")
    model.eval()
    x = torch.randint(0, V - 1, (4, L), generator=torch.Generator().manual_seed(3))
    cu = torch.arange(0, 4 * L + 1, L)
    for fn in (fam.nelbo, fam.loss):
        dense = fn(model, {"input_ids": x}, torch.Generator().manual_seed(5))
        packed = fn(model, {"input_ids": x.reshape(-1), "cu_seqlens": cu},
                    torch.Generator().manual_seed(5))
        assert torch.equal(dense.n_tokens, packed.n_tokens)
        assert torch.allclose(dense.nll, packed.nll, rtol=1e-5, atol=1e-5), name
        for k in dense.parts:
            assert torch.allclose(dense.parts[k], packed.parts[k], rtol=1e-5, atol=1e-5)


def test_ar_ragged_sequences_score_as_alone():
    fam, model = make("ar", layout="varlen")
    model.eval()
    seqs, b = ragged([3, 10, 1, 7], 11)
    packed = fam.nelbo(model, b, torch.Generator())
    for i, s in enumerate(seqs):
        alone = fam.nelbo(model, {"input_ids": s[None]}, torch.Generator())
        assert float(packed.n_tokens[i]) == len(s) - 1
        assert torch.allclose(packed.nll[i], alone.nll[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mdlm", "tdlm"])
def test_ragged_sequences_do_not_leak(name):
    fam, model = make(name, layout="varlen")
    model.eval()
    lengths = [4, 10, 2, 7]
    seqs, b = ragged(lengths, 12)
    a = fam.nelbo(model, b, torch.Generator().manual_seed(1))
    seqs[1] = torch.randint(0, V - 1, (10,), generator=torch.Generator().manual_seed(99))
    b2 = dict(b, input_ids=torch.cat(seqs))
    c = fam.nelbo(model, b2, torch.Generator().manual_seed(1))
    keep = [0, 2, 3]
    assert torch.allclose(a.nll[keep], c.nll[keep], rtol=1e-5, atol=1e-6)
    assert a.n_tokens.tolist() == [float(n) for n in lengths]


@pytest.mark.parametrize("name", ["mdlm", "tdlm"])
def test_ragged_nelbo_is_at_least_the_entropy(name):
    fam, model = make(name, layout="varlen", perturb=False)
    model.eval()
    vals = []
    with torch.no_grad():
        for s in range(8):
            lengths = torch.randint(2, L + 1, (24,), generator=torch.Generator().manual_seed(s))
            x = torch.randint(0, V - 1, (int(lengths.sum()),),
                              generator=torch.Generator().manual_seed(100 + s))
            cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            t = fam.nelbo(model, {"input_ids": x, "cu_seqlens": cu},
                          torch.Generator().manual_seed(s))
            vals.append(float(t.nll.double().sum() / t.n_tokens.double().sum()))
    mean = sum(vals) / len(vals)
    se = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 / len(vals) ** 0.5
    assert mean >= math.log(V - 1) - 4 * se - 1e-6, (name, mean, se)


@pytest.mark.parametrize("name", FAMS)
def test_training_on_the_varlen_layout(name, tmp_path):
    from tdlm.train.loop import train
    cfg = get_preset("tiny").override([
        f"family.name={name}", "family.K=32", "family.H=3"] if name == "tdlm" else
        [f"family.name={name}"])
    cfg = cfg.override(["data.layout=varlen", "data.source=bundled:paragraphs",
                        "data.tokenizer=bpe-300", "data.max_train_docs=300",
                        f"data.cache_dir={tmp_path / 'cache'}", "backbone.d_model=32",
                        "backbone.n_layers=1", "backbone.n_heads=2", "backbone.cond_dim=8",
                        "train.global_batch=4", "train.max_steps=3", "train.eval_every=3",
                        "train.eval_batches=2", "train.ckpt_every=3", "train.warmup_steps=1"])
    res = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert res.step == 3 and math.isfinite(res.val["nelbo_per_token"])
