"""Noise schedules alpha(t) for absorbing diffusion (MDLM spec, 'Process and loss').

``alpha(t)`` is the probability that a token is still clean at time t in [0, 1]
(alpha(0) = 1, alpha(1) ~ 0). ``sigma(t) = -log alpha(t)`` is the total noise fed to the
time embedding. The continuous-time NELBO weight is ``w(t) = -alpha'(t) / (1 - alpha(t))``.

* ``loglinear``: alpha_t = 1 - (1 - eps) t  (w(t) = 1/t).               [paper: MDLM]
* ``linear``:    sigma(t) = t * sigma_max, sigma_max = -log(eps), so alpha_t = eps^t
                 (MDLM's ``LinearNoise`` with sigma_min = 0).            [paper: MDLM code]
* ``cosine``:    alpha_t = eps + (1 - eps) cos(pi t / 2).                [paper: MDLM code]
"""
from __future__ import annotations

import math

import torch

from .errors import ConfigError


class Schedule:
    name = "base"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log(self.alpha(t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous-time ELBO weight ``-alpha'(t) / (1 - alpha(t))``."""
        return -self.dalpha(t) / (1 - self.alpha(t))


class LogLinear(Schedule):
    name = "loglinear"

    def alpha(self, t):
        return 1 - (1 - self.eps) * t

    def dalpha(self, t):
        return torch.full_like(t, -(1 - self.eps))

    def weight(self, t):
        return 1 / t           # exact: (1 - eps) / ((1 - eps) t)


class Linear(Schedule):
    name = "linear"

    def alpha(self, t):
        return torch.exp(t * math.log(self.eps))

    def dalpha(self, t):
        return math.log(self.eps) * self.alpha(t)


class Cosine(Schedule):
    name = "cosine"

    def alpha(self, t):
        return self.eps + (1 - self.eps) * torch.cos(math.pi * t / 2)

    def dalpha(self, t):
        return -(1 - self.eps) * (math.pi / 2) * torch.sin(math.pi * t / 2)


_SCHEDULES = {c.name: c for c in (LogLinear, Linear, Cosine)}


def get_schedule(name: str, eps: float = 1e-3) -> Schedule:
    if name not in _SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; allowed: {', '.join(_SCHEDULES)}")
    return _SCHEDULES[name](eps)


def sample_times(batch: int, generator: torch.Generator, antithetic: bool = True,
                 t_min: float = 0.0, device="cpu") -> torch.Tensor:
    """t ~ U(t_min, 1) per sequence; antithetic (low-discrepancy, MDLM) draws
    ``t_b = (u + b / B) mod 1`` from one uniform u, so the batch covers [0, 1] evenly."""
    if antithetic:
        u = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
        t = (u + torch.arange(batch, device=device, dtype=torch.float64) / batch) % 1.0
    else:
        t = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    t = t_min + (1 - t_min) * t
    return t.clamp_min(1e-12).float()
