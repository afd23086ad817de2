"""The lean MDLM heads equal the reference SUBS head.

``family.head_impl = "masked"`` (the default) computes the output layer and a fused
cross-entropy on the counted masked positions only; ``"chunked"`` never builds the [B, L, V] logits or log-probabilities; its
loss and gradients must equal ``subs_log_probs`` + gather's, on masked positions (scored),
unmasked ones (SUBS carry-over: no loss, no gradient) and padding (never counted), in fp32;
in fp64 the chunked function equals the fp64 cross-entropy to rounding."""
import pytest
import torch
import torch.nn.functional as F

from tdlm.config import RunConfig
from tdlm.errors import ConfigError
from tdlm.families import get_family
from tdlm.nn.chunked_ce import linear_cross_entropy

V, L, B = 61, 12, 4


def make(head_impl="reference", chunk=5, dtype=torch.float32):
    cfg = RunConfig.from_dict({
        "version": 2, "family": {"name": "mdlm", "head_impl": head_impl, "head_chunk": chunk},
        "backbone": {"vocab_size": V, "d_model": 16, "n_layers": 1, "n_heads": 2, "cond_dim": 8,
                     "max_seq_len": L, "dropout": 0.0},
        "data": {"seq_len": L, "layout": "crop_pad"}})
    fam = get_family(cfg)
    torch.manual_seed(0)
    model = fam.build_model().to(dtype)
    with torch.no_grad():
        for p in model.parameters():          # the output layer starts at zero: randomise all
            p.normal_(0, 0.3)
    return fam, model


def batch_case():
    """x0 with padding, z with masked, unmasked and masked-padding positions."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, V, (B, L), generator=g)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 8:] = False
    valid[3, 5:] = False
    masked = torch.rand(B, L, generator=g) < 0.5
    masked[1, 9] = masked[3, 6] = True          # masked padding: never counted
    masked[0, 0] = False
    z = torch.where(masked, torch.full_like(x0, V), x0)
    w = torch.tensor([1.0, 2.5, 0.3, 4.0], dtype=torch.float64)
    return x0, z, valid, w


def head_losses(fam, model, x0, z, valid, w):
    sigma = torch.zeros(B)
    feats = model.features(z, sigma)
    feats.retain_grad()
    ref = fam.loss_from_logits(torch.nn.functional.linear(feats, *model.output_weights()),
                               x0, z, w, valid)
    return feats, ref, fam.loss_from_features(model, feats, x0, z, w, valid)


def grads(model, feats, loss):
    model.zero_grad(set_to_none=True)
    feats.grad = None
    loss.nll.sum().backward(retain_graph=True)
    return [p.grad.clone() for p in model.parameters()], feats.grad.clone()


@pytest.mark.parametrize("impl", ["masked", "chunked"])
def test_lean_heads_equal_reference_fp32(impl):
    fam, model = make(impl, chunk=5)
    x0, z, valid, w = batch_case()
    feats, ref, new = head_losses(fam, model, x0, z, valid, w)
    assert torch.allclose(new.nll, ref.nll, rtol=1e-5, atol=1e-5)
    assert torch.equal(new.n_tokens, ref.n_tokens)
    g_ref, f_ref = grads(model, feats, ref)
    g_new, f_new = grads(model, feats, new)
    for a, b in zip(g_ref, g_new):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert torch.allclose(f_ref, f_new, rtol=1e-4, atol=1e-6)
    scored = (z == V) & valid
    # SUBS carry-over and padding: no gradient reaches unscored positions on either path
    assert f_new[~scored].abs().max() == 0 and f_ref[~scored].abs().max() == 0
    assert scored.any() and (~scored & valid).any() and ((z == V) & ~valid).any()


def test_objective_uses_the_lean_heads():
    x0, _, valid, _ = batch_case()
    batch = {"input_ids": x0, "valid": valid}
    out = {}
    for impl in ("reference", "chunked", "masked"):
        fam, model = make(impl, chunk=7)
        terms = fam.loss(model, batch, torch.Generator().manual_seed(5))
        terms.nll.sum().backward()
        out[impl] = (terms.nll.detach(), [p.grad for p in model.parameters()])
    for impl in ("chunked", "masked"):
        assert torch.allclose(out[impl][0], out["reference"][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(out[impl][1], out["reference"][1]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_linear_cross_entropy_matches_dense(dtype, tol):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(23, 8, dtype=dtype, generator=g, requires_grad=True)
    W = torch.randn(V, 8, dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=dtype, generator=g, requires_grad=True)
    t = torch.randint(0, V, (23,), generator=g)
    up = torch.rand(23, dtype=dtype, generator=g)
    ref = F.cross_entropy(F.linear(h, W, b), t, reduction="none")
    for chunk in (1, 6, 23, 100):
        out = linear_cross_entropy(h, W, b, t, chunk)
        assert out.dtype == dtype and torch.allclose(out, ref, rtol=tol, atol=tol)
        ga = torch.autograd.grad((out * up).sum(), (h, W, b))
        gr = torch.autograd.grad((ref * up).sum(), (h, W, b), retain_graph=True)
        for a, c in zip(ga, gr):
            assert torch.allclose(a, c, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", ["masked", "chunked"])
def test_lean_heads_fp64_model(impl):
    fam, model = make(impl, chunk=4, dtype=torch.float64)
    x0, z, valid, w = batch_case()
    feats = model.features(z, torch.zeros(B, dtype=torch.float64))
    new = fam.loss_from_features(model, feats, x0, z, w, valid)
    logp = torch.log_softmax(F.linear(feats, *model.output_weights()), -1)   # fp64 reference
    ce = -logp.gather(-1, x0[..., None]).squeeze(-1)
    ref = w * torch.where((z == V) & valid, ce, torch.zeros_like(ce)).sum(-1)
    assert new.nll.dtype == torch.float64
    assert torch.allclose(new.nll, ref, rtol=1e-12, atol=1e-12)
    gn = torch.autograd.grad(new.nll.sum(), list(model.parameters()), allow_unused=True,
                             retain_graph=True)
    gr = torch.autograd.grad(ref.sum(), list(model.parameters()), allow_unused=True)
    for a, c in zip(gn, gr):
        assert (a is None) == (c is None)
        if a is not None:
            assert torch.allclose(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("field,value", [("head_impl", "fused"), ("head_chunk", 0)])
def test_head_config_errors(field, value):
    with pytest.raises(ConfigError, match=f"family.{field}"):
        RunConfig.from_dict({"version": 2, "family": {"name": "mdlm", field: value}})
