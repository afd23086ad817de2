"""Noise-schedule conventions shared by every family (``tdlm.schedules``): eps range, the time
input in float64, the discrete-time weight's precision, the draw of t."""
import math

import pytest
import torch

from tdlm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from tdlm.errors import ConfigError
from tdlm.families import get_family
from tdlm.schedules import get_schedule, sample_times, truncate


def mdlm(V=7, L=8, **diff):
    return get_family(RunConfig(
        model=ModelConfig(family="mdlm", vocab_size=V, d_model=16, n_layers=1, n_heads=2,
                          cond_dim=8, max_seq_len=L, time_conditioning=True),
        diffusion=DiffusionConfig(**diff), data=DataConfig(seq_len=L)))


@pytest.mark.parametrize("name", ["loglinear", "linear", "cosine"])
@pytest.mark.parametrize("eps", [1e-3, 1e-9, 1e-12])
def test_time_input_is_finite_and_exact_in_float64(name, eps):
    s = get_schedule(name, eps)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    ti = s.time_input(t)
    assert ti.dtype == torch.float32 and torch.isfinite(ti).all()
    assert float(ti[-1]) == pytest.approx(-math.log(eps), rel=1e-6)     # sigma(1) = -log eps
    ref = [-math.log(float(s.alpha(torch.tensor(v, dtype=torch.float64)))) for v in t.tolist()]
    assert torch.allclose(ti.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("eps", [1e-9, 1e-12])
def test_tiny_eps_time_conditioned_sampler_is_not_degenerate(eps):
    """eps = 1e-9 used to give sigma(1) = inf in float32, NaN time embeddings and token 0
    everywhere."""
    fam = mdlm(eps=eps)
    model = fam.build_model()
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = fam.sample(model.eval(), 32, 8, 16, torch.Generator().manual_seed(0))
    assert (x < 7).all() and len(torch.unique(x)) >= 4, torch.unique(x)
    with torch.no_grad():
        out = model(torch.full((2, 8), 7), fam.schedule.time_input(torch.ones(2, dtype=torch.float64)))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [0.0, 1e-13, -1e-3, 0.5])
def test_eps_outside_the_range_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="eps"):
        DiffusionConfig(eps=bad)


def test_discrete_time_weight_is_float64_exact():
    """Log-linear: T (alpha_s - alpha_t) / (1 - alpha_t) = T (t - s) / t = T / i exactly. In
    float32 the difference alpha_s - alpha_t lost ~1e-2 relative precision at T = 1e5."""
    T = 100_000
    fam = mdlm(num_timesteps=T)
    t, w = fam._times(4096, torch.Generator().manual_seed(0), "cpu", fam.regime(train=False))
    assert t.dtype == torch.float64 and w.dtype == torch.float64
    i = torch.round(t * T)
    assert torch.allclose(t * T, i, rtol=0, atol=1e-6)             # t on the grid i / T
    rel = ((w - T / i) / (T / i)).abs().max().item()
    assert rel < 1e-9, rel


def test_draw_of_t():
    t = sample_times(8, torch.Generator().manual_seed(0), antithetic=True)
    assert t.dtype == torch.float64
    d = torch.sort(t).values.diff()
    assert torch.allclose(d, torch.full_like(d, 1 / 8))             # antithetic: evenly spaced
    tt = truncate(t, 1e-3)
    assert tt.min() >= 1e-3 and tt.max() < 1
    fam = mdlm()
    assert fam.cfg.diffusion.train_t_min == fam.cfg.diffusion.eval_t_min == 1e-3   # MDLM's
    te, _ = fam._times(4096, torch.Generator().manual_seed(1), "cpu", fam.regime(train=False))
    assert te.min() >= 1e-3
    fam0 = mdlm(eval_t_min=0.0)
    te0, _ = fam0._times(4096, torch.Generator().manual_seed(1), "cpu", fam0.regime(train=False))
    assert te0.min() < 1e-3
