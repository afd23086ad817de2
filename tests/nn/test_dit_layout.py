"""One DiT code path over a ``Layout`` (tdlm.nn.layout) gives what the former two paths (dense
``DiTBlock.forward`` and packed ``_forward_packed``, frozen in ``reference_dit.py``) gave:
hidden states, conditioning, the head's features and every parameter gradient, for dense
(bidirectional, causal, with an attention mask, without time input), packed ragged inputs, in
training mode with dropout (same RNG use: the masks are the same) and in float64.

Bit for bit until the blocks' elementwise work was fused (weight inside layer_norm, addcmul
for adaLN modulation and gated residuals, rotary as one autograd Function): since then equal
within float32 rounding (float32) and within the reference's own float32 rotary (float64: the
frozen ``apply_rotary`` rotated in float32 even for float64 inputs). ``assert_identical``
still checks the dtypes and shapes. The conditioning was bit for bit until a shared sigma
(none, or one for all) became one row [1, cond] (a 1-row product: equal within rounding)."""
from __future__ import annotations

import pytest
import torch

import reference_dit as old
from tdlm.config import ModelConfig
from tdlm.nn.dit import DiT, FinalLayer, Packing
from tdlm.nn.layout import DenseLayout, PackedLayout

V = 50


def mcfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, cond_dim=16, max_seq_len=64,
                dropout=0.0, time_conditioning=True)
    base.update(kw)
    return ModelConfig(**base)


def pair(cfg: ModelConfig, causal: bool = False, dtype=torch.float32, seed: int = 0):
    """(old, new) backbones and heads with the same random weights (adaLN-zero and the zero
    output layer would otherwise hide most of the computation)."""
    torch.manual_seed(seed)
    net_old, head_old = old.DiT(cfg, V, causal=causal), old.FinalLayer(cfg.d_model, cfg.cond_dim, V)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in list(net_old.parameters()) + list(head_old.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    net_new, head_new = DiT(cfg, V, causal=causal), FinalLayer(cfg.d_model, cfg.cond_dim, V)
    assert net_new.state_dict().keys() == net_old.state_dict().keys()
    assert head_new.state_dict().keys() == head_old.state_dict().keys()
    net_new.load_state_dict(net_old.state_dict())
    head_new.load_state_dict(head_old.state_dict())
    return [m.to(dtype) for m in (net_old, head_old, net_new, head_new)]


def run(net, head, tokens, sigma, train: bool, rng_seed: int = 5, **kw):
    net.train(train)
    head.train(train)
    for p in list(net.parameters()) + list(head.parameters()):
        p.grad = None
    torch.manual_seed(rng_seed)
    h, c = net(tokens, sigma, **kw)
    f = head.features(h, c, kw.get("packing"))
    lay = kw.get("packing")                     # a shared conditioning row, per sequence
    c = c.expand(lay.B if lay is not None else tokens.shape[0], -1)
    out = head.linear(f)
    (out.double().square().mean() + h.double().sum() * 1e-3).backward()
    grads = {n: p.grad.clone() for n, p in list(net.named_parameters())
             + [("head." + n, p) for n, p in head.named_parameters()]}
    return h.detach(), c.detach(), f.detach(), grads


def assert_identical(a, b):
    """Equal up to rounding: relative 1e-5 of each tensor's scale (float32 rounding over a
    few fused operations; the float64 runs differ by the reference's float32 rotary)."""
    def close(x, y, what):
        assert x.dtype == y.dtype and x.shape == y.shape, what
        scale = max(float(y.abs().max()), 1e-30)
        err = float((x - y).abs().max())
        assert err <= 1e-5 * scale, f"{what}: max |diff| {err:.3g} vs scale {scale:.3g}"
    for x, y, what in zip(a[:3], b[:3], ("hidden", "c", "features")):
        close(x, y, what)
    assert a[3].keys() == b[3].keys()
    for k in a[3]:
        close(a[3][k], b[3][k], k)


def dense_inputs(B=3, L=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g), torch.rand(B, generator=g) * 3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("train,dropout", [(False, 0.0), (True, 0.0), (True, 0.2)])
def test_dense_equal(causal, train, dropout):
    net_o, head_o, net_n, head_n = pair(mcfg(dropout=dropout), causal=causal)
    x, sig = dense_inputs()
    assert_identical(run(net_o, head_o, x, sig, train), run(net_n, head_n, x, sig, train))


def test_dense_float64_and_without_time_input():
    for cfg, dtype in ((mcfg(), torch.float64), (mcfg(time_conditioning=False), torch.float32)):
        net_o, head_o, net_n, head_n = pair(cfg, dtype=dtype)
        x, sig = dense_inputs(B=2, L=7, seed=3)
        assert_identical(run(net_o, head_o, x, sig.to(dtype), True),
                         run(net_n, head_n, x, sig.to(dtype), True))
        assert_identical(run(net_o, head_o, x, None, False), run(net_n, head_n, x, None, False))


def test_dense_attention_mask_equal():
    net_o, head_o, net_n, head_n = pair(mcfg())
    x, sig = dense_inputs(B=2, L=9, seed=1)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False                                   # key padding of the second row
    mask = keep[:, None, None, :]
    assert_identical(run(net_o, head_o, x, sig, True, attn_mask=mask),
                     run(net_n, head_n, x, sig, True, attn_mask=mask))
    # the same mask as an explicit layout
    lay = DenseLayout.of(x, attn_mask=mask)
    assert_identical(run(net_o, head_o, x, sig, True, attn_mask=mask),
                     run(net_n, head_n, x, sig, True, layout=lay))


@pytest.mark.parametrize("train,dropout", [(False, 0.0), (True, 0.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_equal(train, dropout, dtype):
    net_o, head_o, net_n, head_n = pair(mcfg(dropout=dropout), dtype=dtype)
    g = torch.Generator().manual_seed(2)
    lens = torch.tensor([5, 1, 17, 9])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    x = torch.randint(0, V, (int(cu[-1]),), generator=g)
    sig = (torch.rand(4, generator=g) * 3).to(dtype)
    ref = run(net_o, head_o, x, sig, train, packing=old.Packing(cu))
    assert_identical(ref, run(net_n, head_n, x, sig, train, packing=Packing(cu)))
    # Packing is the packed Layout; the layout= keyword is the same call
    assert Packing is PackedLayout
    net_n.train(train)
    torch.manual_seed(5)
    h, _ = net_n(x, sig, layout=PackedLayout(cu))
    torch.testing.assert_close(h, ref[0], rtol=1e-5, atol=1e-5 * float(ref[0].abs().max()))


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_shared_conditioning_row_equals_per_sequence_rows(time_conditioning):
    """One sigma for every sequence ([1], or no time input) gives one conditioning row that
    the packed layout broadcasts as a view: hidden states, features and gradients equal to
    those of the same sigma given per sequence ([B], gathered row by row)."""
    net_o, head_o, net_n, head_n = pair(mcfg(time_conditioning=time_conditioning))
    g = torch.Generator().manual_seed(4)
    lens = torch.tensor([6, 2, 13])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    x = torch.randint(0, V, (int(cu[-1]),), generator=g)
    shared = torch.full((1,), 0.7) if time_conditioning else None
    per_seq = torch.full((3,), 0.7) if time_conditioning else torch.zeros(3)
    h1, c1 = net_n(x, shared, packing=Packing(cu))
    assert c1.shape[0] == 1
    assert_identical(run(net_o, head_o, x, per_seq, True, packing=old.Packing(cu)),
                     run(net_n, head_n, x, shared, True, packing=Packing(cu)))
    with pytest.raises(ValueError, match=r"sigma must have shape \[3\] or \[1\]"):
        DiT(mcfg(), V)(x, torch.zeros(2), packing=Packing(cu))


def test_packing_bookkeeping_unchanged():
    cu = torch.tensor([0, 3, 4, 9])
    a, b = old.Packing(cu), Packing(cu)
    for name in ("cu_seqlens", "lengths", "seq_id", "pos", "pad_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.B, a.T, a.max_len) == (b.B, b.T, b.max_len)
    assert torch.equal(a.key_mask(), b.key_mask())
    for bad in (torch.tensor([1, 3]), torch.tensor([0, 2, 2]), torch.tensor([[0, 1]])):
        with pytest.raises(ValueError):
            Packing(bad)


def test_packed_tokens_must_match_the_layout():
    net = DiT(mcfg(), V)
    with pytest.raises(ValueError, match="packed tokens must be 1-D with 9 entries"):
        net(torch.zeros(8, dtype=torch.long), None, packing=Packing(torch.tensor([0, 4, 9])))
    with pytest.raises(ValueError, match="causal"):
        DiT(mcfg(), V, causal=True)(torch.zeros(9, dtype=torch.long), None,
                                    packing=Packing(torch.tensor([0, 4, 9])))


def test_model_code_knows_nothing_of_training():
    """Activation checkpointing (and compile, DDP/FSDP) are applied from outside
    (tdlm.train.parallel.parallelize): nothing in tdlm.nn reads the flag or checkpoints."""
    from pathlib import Path

    import tdlm.nn
    for p in Path(tdlm.nn.__file__).parent.glob("*.py"):
        text = p.read_text(encoding="utf-8")
        assert "activation_checkpointing" not in text and "torch.utils.checkpoint" not in text, p
