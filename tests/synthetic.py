"""Ground-truth sources with exactly known entropy, and exact (oracle) denoisers.

``MarkovSource``: x_1 ~ pi0, x_{i+1} ~ P[x_i]. Its entropy per sequence is
H = H(pi0) + sum_i sum_v P(x_i = v) H(P[v]). ``OracleMaskedDenoiser`` returns the exact
posterior marginals p(x_i | unmasked tokens of z) by enumerating all V^L sequences, i.e. the
optimal MDLM prediction, so ELBO and sampler checks need no training.
"""
from __future__ import annotations

import itertools
import math

import torch


class MarkovSource:
    def __init__(self, V: int, L: int, seed: int = 0, concentration: float = 0.5,
                 stationary: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.V, self.L = V, L
        self.pi0 = _dirichlet(V, 1.0, g)
        self.P = torch.stack([_dirichlet(V, concentration, g) for _ in range(V)])
        if stationary:   # start in the stationary law: every position has the same marginal
            evals, evecs = torch.linalg.eig(self.P.double().T)
            v = evecs[:, evals.real.argmax()].real
            self.pi0 = (v / v.sum()).float().clamp_min(1e-6)
            self.pi0 = self.pi0 / self.pi0.sum()

    def entropy(self) -> float:
        """Exact entropy of one sequence in nats."""
        H = -(self.pi0 * self.pi0.log()).sum().item()
        p = self.pi0.double()
        rowH = -(self.P * self.P.log()).sum(-1).double()
        for _ in range(self.L - 1):
            H += (p * rowH).sum().item()
            p = p @ self.P.double()
        return H

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.empty(n, self.L, dtype=torch.long)
        x[:, 0] = torch.multinomial(self.pi0, n, replacement=True, generator=generator)
        for i in range(1, self.L):
            x[:, i] = torch.multinomial(self.P[x[:, i - 1]], 1, generator=generator).squeeze(-1)
        return x

    def all_sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = torch.tensor(list(itertools.product(range(self.V), repeat=self.L)))
        logp = self.pi0.log()[seqs[:, 0]].double()
        for i in range(1, self.L):
            logp = logp + self.P.log()[seqs[:, i - 1], seqs[:, i]].double()
        return seqs, logp


def _dirichlet(V, a, g):
    """Dirichlet(a) draw from the seeded generator (normalised Gamma(a) variates)."""
    x = torch.tensor([_gamma(a, g) for _ in range(V)]).clamp_min(1e-3)
    return x / x.sum()


def _gamma(a, g):
    # Marsaglia-Tsang for a >= 1, boosted for a < 1
    boost = 1.0
    if a < 1:
        boost = torch.rand(1, generator=g).item() ** (1 / a)
        a += 1
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    while True:
        x = torch.randn(1, generator=g).item()
        v = (1 + c * x) ** 3
        if v <= 0:
            continue
        u = torch.rand(1, generator=g).item()
        if math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v * boost


class OracleMaskedDenoiser(torch.nn.Module):
    """Exact p(x_i | z) for every position (logits over V+1 classes; [MASK] gets -inf)."""

    def __init__(self, source: MarkovSource, mask_id: int):
        super().__init__()
        self.seqs, self.logp = source.all_sequences()
        self.mask_id, self.V = mask_id, source.V
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, z, sigma=None):
        self.calls += 1
        uz, inv = torch.unique(z, dim=0, return_inverse=True)   # at most (V+1)^L distinct rows
        return self._posterior(uz)[inv]

    def _posterior(self, z):
        compat = ((z[:, None, :] == self.mask_id) | (z[:, None, :] == self.seqs[None])).all(-1)
        w = torch.where(compat, self.logp[None], torch.tensor(float("-inf"), dtype=torch.float64))
        w = torch.softmax(w, dim=-1)                                   # [B, N]
        onehot = torch.nn.functional.one_hot(self.seqs, self.V).double()  # [N, L, V]
        marg = torch.einsum("bn,nlv->blv", w, onehot)
        logits = torch.full((*z.shape, self.mask_id + 1), float("-inf"), dtype=torch.float64)
        logits[..., :self.V] = marg.clamp_min(1e-300).log()
        return logits


class ForwardOnly(torch.nn.Module):
    """Exposes only ``forward`` of a model (a sampler's generic path: no ``features``,
    ``output_weights`` or ``token_logits`` to run the output layer on some rows only)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *a, **k):
        return self.inner(*a, **k)
