"""Rotary position embedding on the fused q/k/v projection (``tdlm.nn.dit.rotary_qkv``)
against an independent formulation: each pair (x_j, x_{j+hd/2}) is the complex number
x_j + i x_{j+hd/2}, multiplied by e^{i p w_j} with w_j = 10000^{-2j/hd} at position p.
Values and gradients (autograd through the complex product vs the hand-written backward of
the library's autograd Function), dense and packed layouts, float32/float64."""
from __future__ import annotations

import pytest
import torch

from tdlm.nn.dit import Rotary, rotary_qkv
from tdlm.nn.layout import DenseLayout, PackedLayout


def complex_rotary(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [..., P, hd] (positions ``pos`` [P] along the second-last axis) rotated as complex
    numbers; computed in float64/complex128 whatever x's dtype."""
    hd = x.shape[-1]
    h = hd // 2
    w = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)       # [h]
    angle = pos.double()[:, None] * w[None]                                   # [P, h]
    z = torch.complex(x[..., :h].double(), x[..., h:].double()) * torch.polar(
        torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def _tables(hd, pos, dtype):
    cos, sin = Rotary(hd)(pos)
    return cos.to(dtype), sin.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 2e-6)])
def test_dense_values_and_gradients_match_complex_rotation(dtype, tol):
    # the tables are float32 (Rotary), so float64 agrees to float32's angle precision
    g = torch.Generator().manual_seed(0)
    B, L, H, hd = 2, 7, 3, 8
    lin = torch.randn(B, L, 3 * H * hd, generator=g, dtype=dtype, requires_grad=True)
    lay = DenseLayout(B, L)
    cos, sin = _tables(hd, torch.arange(L), dtype)
    q, k, v = rotary_qkv(lay.split_heads(lin, H), cos, sin)
    ref = lay.split_heads(lin, H)                                  # [3, B, H, L, hd]
    pos = torch.arange(L)
    rq, rk = complex_rotary(ref[0], pos), complex_rotary(ref[1], pos)
    torch.testing.assert_close(q.double(), rq, atol=tol, rtol=tol)
    torch.testing.assert_close(k.double(), rk, atol=tol, rtol=tol)
    assert torch.equal(v, ref[2])
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (q, k, v)]
    got = torch.autograd.grad(sum((t.double() * u).sum() for t, u in zip((q, k, v), w)), lin)[0]
    lin64 = lin.detach().double().requires_grad_(True)
    r = lay.split_heads(lin64, H)
    outs = (complex_rotary(r[0], pos), complex_rotary(r[1], pos), r[2])
    want = torch.autograd.grad(sum((t * u).sum() for t, u in zip(outs, w)), lin64)[0]
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    # the gradient reaches the projection in its own memory layout (no copy back)
    assert got.is_contiguous()


def test_packed_positions_restart_per_sequence():
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 3, 4, 9])
    lay = PackedLayout(cu)
    H, hd = 2, 6
    lin = torch.randn(9, 3 * H * hd, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = rotary_qkv(lay.split_heads(lin, H), *[t.double() for t in lay.rope(Rotary(hd))])
    ref = lay.split_heads(lin, H)                                  # [3, T, H, hd]
    # complex_rotary wants positions on the second-last axis: [H, T, hd]
    rq = complex_rotary(ref[0].transpose(0, 1), lay.pos).transpose(0, 1)
    torch.testing.assert_close(q, rq, atol=2e-6, rtol=2e-6)
    assert torch.equal(lay.pos, torch.tensor([0, 1, 2, 0, 0, 1, 2, 3, 4]))


def test_gradcheck_of_the_hand_written_backward():
    g = torch.Generator().manual_seed(2)
    B, L, H, hd = 1, 4, 2, 4
    lay = DenseLayout(B, L)
    cos, sin = _tables(hd, torch.arange(L), torch.float64)
    lin = torch.randn(B, L, 3 * H * hd, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rotary_qkv(lay.split_heads(t, H), cos, sin), (lin,))
    # only some outputs used: the others' gradients are zero
    q, k, v = rotary_qkv(lay.split_heads(lin, H), cos, sin)
    gr = lay.split_heads(torch.autograd.grad(v.sum(), lin)[0], H)
    assert bool((gr[:2] == 0).all()) and bool((gr[2] == 1).all())


def test_a_wrong_rotation_is_caught():
    """The comparison can fail: rotating by the wrong sign is detected."""
    B, L, H, hd = 1, 5, 1, 4
    lay = DenseLayout(B, L)
    cos, sin = _tables(hd, torch.arange(L), torch.float64)
    lin = torch.randn(B, L, 3 * H * hd, dtype=torch.float64)
    q, _, _ = rotary_qkv(lay.split_heads(lin, H), cos, -sin)
    assert not torch.allclose(q, complex_rotary(lay.split_heads(lin, H)[0], torch.arange(L)))
