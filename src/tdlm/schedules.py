"""Noise schedules alpha(t) for absorbing diffusion (MDLM spec, 'Process and loss'), and the
conventions every family shares: eps, the network's time input and the draw of t.

``alpha(t)`` is the probability that a token is still clean at time t in [0, 1]
(alpha(0) = 1). The continuous-time NELBO weight is ``w(t) = -alpha'(t) / (1 - alpha(t))``.

* ``loglinear``: alpha_t = 1 - (1 - eps) t  (w(t) = 1/t).               [paper: MDLM]
* ``linear``:    sigma(t) = t * sigma_max, sigma_max = -log(eps), so alpha_t = eps^t
                 (MDLM's ``LinearNoise`` with sigma_min = 0).            [paper: MDLM code]
* ``cosine``:    alpha_t = eps + (1 - eps) cos(pi t / 2).                [paper: MDLM code]

**eps** (one meaning for every schedule and family): the chain stops at alpha(1) = eps > 0
instead of full absorption, and the prior term KL(q(z_1 | x) || p(z_1)) is omitted, as in
MDLM. It keeps the time input ``sigma(1) = -log eps`` finite. A tree (TDLM) applies it to the
top of its chain, the window whose absorbing state is the root (see ``families/tree.py``).

**Time input** (:meth:`NoiseSchedule.time_input`, one definition for every family): the total noise
``sigma(t) = -log alpha(t)`` in [0, -log eps], computed in float64 (``-log1p(-(1 - eps) t)``
for the log-linear schedule) so that small eps stays finite. A process made of stacked
windows (TDLM) at local time u of window h feeds ``h * sigma(1) + sigma(u)``: the noise of the
h full windows below plus the current one's, continuous and increasing in t; with one window
it is MDLM's sigma(t). ``backbone.time_conditioning = False`` zeroes it inside the network.

**Draw of t** (:func:`sample_times` then :func:`truncate`): t ~ U(0, 1) (antithetic over the
batch by default), then mapped to [t_min, 1] as MDLM's ``sampling_eps`` does. Training uses
``family.train_t_min`` and evaluation ``family.eval_t_min`` (both 1e-3 by default, the
setting of MDLM's training and evaluation): the NELBO integral then omits t < t_min, whose
contribution is about t_min x (per-token cross-entropy on nearly clean inputs).
"""
from __future__ import annotations

import math

import torch

from .errors import ConfigError

SAMPLE_T_MIN = 1e-5  # end of every sampler's time grid linspace(1, 1e-5, T+1) (MDLM spec)


class NoiseSchedule:
    name = "base"

    def __init__(self, eps: float = 1e-3):
        # eps = 0 (full absorption, infinite sigma(1)) is allowed for exact analyses; a run's
        # config requires eps >= config.EPS_MIN (``NoiseSection``)
        if not (0.0 <= eps < 0.5):
            raise ConfigError(f"invalid schedule eps: must be in [0, 0.5), got {eps!r}")
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise ``-log alpha(t)`` (in the dtype of t)."""
        return -torch.log(self.alpha(t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous-time ELBO weight ``-alpha'(t) / (1 - alpha(t))``."""
        return -self.dalpha(t) / (1 - self.alpha(t))

    def time_input(self, t: torch.Tensor, level=None) -> torch.Tensor:
        """The network's time input (float32): ``sigma(t)``, plus ``level * sigma(1)`` for a
        stacked-window process at local time t of window ``level`` (module docstring).
        Computed in float64."""
        t = torch.as_tensor(t).double()
        s = self.sigma(t)
        if level is not None:
            s = s + torch.as_tensor(level, device=t.device).double() * float(
                self.sigma(torch.tensor(1.0, dtype=torch.float64)))
        return s.float()


class LogLinear(NoiseSchedule):
    name = "loglinear"

    def alpha(self, t):
        return 1 - (1 - self.eps) * t

    def dalpha(self, t):
        return torch.full_like(t, -(1 - self.eps))

    def sigma(self, t):
        return -torch.log1p(-(1 - self.eps) * t)

    def weight(self, t):
        return 1 / t           # exact: (1 - eps) / ((1 - eps) t)


class Linear(NoiseSchedule):
    name = "linear"

    def alpha(self, t):
        return torch.exp(t * math.log(self.eps))

    def dalpha(self, t):
        return math.log(self.eps) * self.alpha(t)

    def sigma(self, t):
        return -math.log(self.eps) * t


class Cosine(NoiseSchedule):
    name = "cosine"

    def alpha(self, t):
        # cos(pi t / 2) written as sin(pi (1 - t) / 2): exactly 0 at t = 1, so alpha(1) = eps
        return self.eps + (1 - self.eps) * torch.sin(math.pi * (1 - t) / 2)

    def dalpha(self, t):
        return -(1 - self.eps) * (math.pi / 2) * torch.sin(math.pi * t / 2)


_SCHEDULES = {c.name: c for c in (LogLinear, Linear, Cosine)}


def get_schedule(name: str, eps: float = 1e-3) -> NoiseSchedule:
    if name not in _SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; allowed: {', '.join(_SCHEDULES)}")
    return _SCHEDULES[name](eps)


def sample_times(batch: int, generator: torch.Generator, antithetic: bool = True,
                 device="cpu") -> torch.Tensor:
    """t ~ U(0, 1) per sequence (float64); antithetic (low-discrepancy, MDLM) draws
    ``t_b = (u + b / B) mod 1`` from one uniform u, so the batch covers [0, 1] evenly."""
    if antithetic:
        u = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
        return (u + torch.arange(batch, device=device, dtype=torch.float64) / batch) % 1.0
    return torch.rand(batch, generator=generator, device=device, dtype=torch.float64)


def truncate(t: torch.Tensor, t_min: float) -> torch.Tensor:
    """Map t in [0, 1) to [t_min, 1): ``t_min + (1 - t_min) t`` (MDLM's ``sampling_eps``),
    kept >= 1e-12 so that weights stay finite when t_min = 0."""
    return (t_min + (1 - t_min) * t).clamp_min(1e-12)


def discretize(t: torch.Tensor, n) -> tuple[torch.Tensor, torch.Tensor]:
    """Discrete time with ``n`` steps (an int or a float64 tensor of per-row counts): the step
    ``k = ceil(t n)`` in 1..n containing t, returned as its ends ``(k / n, (k - 1) / n)``."""
    k = torch.ceil(t * n)
    k = torch.minimum(k.clamp_min(1), torch.as_tensor(n, dtype=k.dtype, device=k.device))
    return k / n, (k - 1) / n


def discrete_weight(a_t: torch.Tensor, a_s: torch.Tensor, n) -> torch.Tensor:
    """Discrete-time NELBO weight of the step s -> t drawn uniformly out of n:
    ``n (alpha_s - alpha_t) / (1 - alpha_t)`` (float64 in, float64 out: in float32 the
    difference alpha_s - alpha_t loses ~1e-2 relative precision at n = 1e5)."""
    return n * (a_s - a_t) / (1 - a_t)


Schedule = NoiseSchedule        # deprecated name (``ModelPlan`` is the model-scheduling plan)
