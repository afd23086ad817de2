"""DID family: packed backbone, DISE decomposition, exact-score tightness by quadrature,
Monte-Carlo NELBO, sampler convergence with the exact score (spec DID.md §9, checks 4-7, 9).

The toy distribution: strings of length 0..3 over {a, b} (token ids 1, 2; BOS = 0) with
random positive probabilities. Its exact insertion score is computed by enumeration:
    s[g, v](xt, t) = sum_x0 p(x0) q_t(xt|x0) rho(xt, x0)[g, v] / sum_x0 p(x0) q_t(xt|x0),
with rho from enumerating alignments (independent of ``tdlm.did.dp``)."""
import itertools
import math

import numpy as np
import pytest
import torch

from tdlm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from tdlm.families import get_family
from tdlm.families.deletion_insertion import dise_parts, log_rates, pack
from tdlm.nn.dit import DiT, Packing
from tdlm.train.parallel import checkpoint_blocks
from tdlm.schedules import LogLinear
from synthetic import ForwardOnly

BOS, V, MAXLEN = 0, 3, 3
STRINGS = [s for n in range(MAXLEN + 1) for s in itertools.product((1, 2), repeat=n)]
CODE = {s: i for i, s in enumerate(STRINGS)}


def toy_probs(seed=0, only_len=None):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(len(STRINGS), 2.0))
    if only_len is not None:
        p = np.array([pi if len(s) == only_len else 0.0 for pi, s in zip(p, STRINGS)])
    return p / p.sum()


def alignments(xt, x0):
    """Index sets S (increasing) with x0[S] == xt."""
    return [S for S in itertools.combinations(range(len(x0)), len(xt))
            if all(x0[i] == c for i, c in zip(S, xt))]


def rho_enum(xt, x0):
    """(N, rho [n+1, V]) by enumerating alignments: rho = mean over alignments of the deleted
    tokens' counts per gap (gap of deleted index i = number of kept indices before i)."""
    A = alignments(xt, x0)
    rho = np.zeros((len(xt) + 1, V))
    for S in A:
        for i, v in enumerate(x0):
            if i not in S:
                rho[sum(1 for j in S if j < i), v] += 1
    return len(A), (rho / len(A) if A else rho)


class ExactScore(torch.nn.Module):
    """The exact insertion score of the toy distribution (variable length: time-dependent;
    ``fixed_len``: conditioned on |x0| = fixed_len, time-independent)."""

    def __init__(self, p, fixed_len=None):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        S = len(STRINGS)
        self.p = torch.tensor(p)
        self.N = torch.zeros(S, S, dtype=torch.float64)
        self.rho = torch.zeros(S, S, MAXLEN + 1, V, dtype=torch.float64)
        for a, xt in enumerate(STRINGS):
            for b, x0 in enumerate(STRINGS):
                N, rho = rho_enum(xt, x0)
                self.N[a, b] = N
                self.rho[a, b, :len(xt) + 1] = torch.tensor(rho)
        self.m = torch.tensor([len(s) for s in STRINGS], dtype=torch.float64)
        self.fixed_len = fixed_len

    def forward(self, tokens, packing, sigma=None, rows=None):
        B = packing.B
        pw = torch.pow(3.0, packing.pos.double() - 1).where(packing.pos > 0, torch.zeros(1, dtype=torch.float64))
        key = torch.zeros(B, dtype=torch.float64).index_add_(0, packing.seq_id, tokens.double() * pw)
        lut = {sum(c * 3 ** i for i, c in enumerate(s)): CODE[s] for s in STRINGS}
        # states outside the support (tau-leaping may overshoot the maximum length) get
        # score 0: nothing more is inserted there
        idx = torch.tensor([lut.get(int(k), -1) if n_ <= MAXLEN + 1 else -1
                            for k, n_ in zip(key.round().long().tolist(), packing.lengths.tolist())])
        out = idx < 0
        idx = idx.clamp_min(0)
        n = (packing.lengths - 1).double().clamp_max(MAXLEN)
        if self.fixed_len is None:
            alpha = torch.exp(-sigma.double())[:, None]
            q = self.N[idx] * alpha ** n[:, None] * (1 - alpha) ** (self.m[None] - n[:, None])
        else:
            q = self.N[idx]
        w = self.p[None] * q
        w = w / w.sum(1, keepdim=True)
        s = torch.einsum("bx,bxgv->bgv", w, self.rho[idx])            # [B, 4, V]
        s[out] = 0.0
        s_rows = s[packing.seq_id, packing.pos.clamp_max(MAXLEN)]      # [T, V]
        tot = s_rows.sum(-1)
        logits = s_rows.log()
        return tot.log(), logits if rows is None else logits[rows]


def toy_family(mode="variable"):
    cfg = RunConfig(model=ModelConfig(family="did", vocab_size=V, d_model=16, n_layers=1, n_heads=2,
                                      cond_dim=8, max_seq_len=8, dropout=0.0, did_length=mode,
                                      time_conditioning=mode == "variable"),
                    diffusion=DiffusionConfig(), data=DataConfig(seq_len=8, layout="varlen"))
    fam = get_family(cfg)
    fam.schedule = LogLinear(eps=0.0)       # alpha_t = 1 - t, alpha_1 = 0: a strict bound
    return fam


def dise_by_quadrature(fam, model, x0, nodes=120):
    """int_0^1 w(t) E_{xt ~ q_t(.|x0)} [sum_g DISE_g(xt, t)] dt, xt enumerated over the 2^m
    deletion masks, t by quadrature (all masks x nodes in one batch)."""
    m = len(x0)
    # t = u^3 with Gauss-Legendre in u: the integrand has t log t terms at t -> 0, which the
    # substitution smooths (error ~1e-11 at 120 nodes instead of ~1e-5 at 160 plain nodes)
    uq, wq = np.polynomial.legendre.leggauss(nodes)
    uq, wq = (uq + 1) / 2, wq / 2
    tq, wq = uq ** 3, wq * 3 * uq ** 2
    masks = list(itertools.product((0, 1), repeat=m))
    rows_x0, rows_xt, rows_t, prob = [], [], [], []
    for t in tq:
        a = 1 - t
        for mk in masks:
            xt = [c for c, k in zip(x0, mk) if k]
            rows_x0.append(list(x0) + [0] * (MAXLEN - m))
            rows_xt.append(xt + [0] * (MAXLEN - len(xt)))
            rows_t.append(t)
            prob.append(a ** sum(mk) * (1 - a) ** (m - sum(mk)))
    B = len(rows_t)
    x0t = torch.tensor(rows_x0)
    xtt = torch.tensor(rows_xt)
    n = torch.tensor([sum(mk) for _ in tq for mk in masks])
    t = torch.tensor(rows_t, dtype=torch.float64)
    rate, tok = fam.terms(model, torch.zeros(B, dtype=torch.long), x0t, torch.full((B,), m), xtt, n,
                          t, dtype=torch.float64)
    integrand = (rate + tok) * torch.tensor(prob) / t
    return float((integrand.view(len(tq), len(masks)).sum(1) * torch.tensor(wq)).sum())


# ---- 7. packed backbone ---------------------------------------------------------------
@pytest.mark.parametrize("ckpt", [False, True])
def test_packed_batch_equals_each_sequence_alone(ckpt):
    torch.manual_seed(0)
    m = ModelConfig(vocab_size=50, d_model=64, n_layers=2, n_heads=4, cond_dim=32, max_seq_len=64,
                    dropout=0.0)
    net = DiT(m, 50)
    for b in net.blocks:                       # adaLN-zero starts as identity: make it matter
        torch.nn.init.normal_(b.adaLN_modulation.weight, std=0.2)
    if ckpt:                                   # applied from outside, as the trainer does
        checkpoint_blocks(net)
    lens = [5, 1, 17, 9]
    seqs = [torch.randint(0, 50, (n,)) for n in lens]
    sig = torch.rand(4)
    cu = torch.tensor([0] + np.cumsum(lens).tolist())
    h, _ = net(torch.cat(seqs), sig, packing=Packing(cu))
    h.sum().backward()                          # the packed path is differentiable
    for i, s in enumerate(seqs):
        hi, _ = net(s[None], sig[i:i + 1])
        torch.testing.assert_close(h[cu[i]:cu[i + 1]], hi[0], rtol=1e-5, atol=1e-5)
    # no leakage: changing sequence 2 leaves the others unchanged
    seqs2 = list(seqs)
    seqs2[2] = torch.randint(0, 50, (17,))
    h2, _ = net(torch.cat(seqs2), sig, packing=Packing(cu))
    keep = torch.ones(cu[-1], dtype=torch.bool)
    keep[cu[2]:cu[3]] = False
    torch.testing.assert_close(h2[keep], h[keep])


# ---- 5. DISE decomposition ---------------------------------------------------------------
def test_dise_decomposition_equals_raw_formula_and_dice():
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([4, 1, 6])
    pk = Packing(torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]))
    T, Vv = pk.T, 7
    u = torch.randn(T, generator=g, dtype=torch.float64)
    logits = torch.randn(T, Vv, generator=g, dtype=torch.float64)
    rho = torch.rand(T, Vv, generator=g, dtype=torch.float64) * (torch.rand(T, Vv, generator=g) < 0.4)
    row, token = rho.nonzero(as_tuple=True)
    vals = rho[row, token]
    for mode in ("variable", "fixed"):
        dele = torch.zeros(pk.B, dtype=torch.float64).index_add_(0, pk.seq_id, rho.sum(1))
        l = log_rates(u, pk, mode, dele, 100)
        s = l.exp()[:, None] * torch.softmax(logits, -1)
        xlx = torch.where(rho > 0, rho * rho.clamp_min(1e-300).log(), torch.zeros_like(rho))
        raw = (s - torch.where(rho > 0, rho * s.log(), torch.zeros_like(s)) + xlx - rho).sum(1)
        raw_seq = torch.zeros(pk.B, dtype=torch.float64).index_add_(0, pk.seq_id, raw)
        rate, tok = dise_parts(l, logits, row, token, vals, pk)
        torch.testing.assert_close(rate + tok, raw_seq)
        assert (rate >= -1e-12).all() and (tok >= -1e-12).all()
        if mode == "fixed":     # sum s = m - n: DISE = DICE = sum rho (log rho - log s)
            dice = (xlx - torch.where(rho > 0, rho * s.log(), torch.zeros_like(s))).sum(1)
            dice_seq = torch.zeros(pk.B, dtype=torch.float64).index_add_(0, pk.seq_id, dice)
            torch.testing.assert_close(rate + tok, dice_seq)


def test_target_rows_head_gives_the_reference_loss_and_gradients():
    """family.head_rows=targets (the output layer on gap rows with targets only) vs
    all (every row): the same DISE parts and parameter gradients, fixed and variable
    length, on a real InsertionLM with random weights; and the targets head does skip rows."""
    from tdlm.families.did.process import delete
    for mode in ("fixed", "variable"):
        base = dict(vocab_size=11, d_model=32, n_layers=2, n_heads=4, cond_dim=16,
                    max_seq_len=24, dropout=0.0, time_conditioning=mode == "variable")
        out = {}
        for impl in ("all", "targets"):
            cfg = RunConfig.from_dict({"backbone": base, "family": {"name": "did", "length": mode,
                                                                   "head_rows": impl},
                                       "data": {"seq_len": 24, "layout": "packed_bos"}})
            fam = get_family(cfg)
            torch.manual_seed(0)
            model = fam.build_model()
            with torch.no_grad():                       # zero-initialised parts made to matter
                for p_ in model.parameters():
                    p_.add_(torch.randn_like(p_) * 0.1)
            g = torch.Generator().manual_seed(3)
            x0 = torch.randint(1, 11, (5, 23), generator=g)
            m = torch.tensor([23, 20, 7, 15, 23])
            t = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7])
            xt, n, _ = delete(x0, m, 1 - t, g)
            seen = []
            model.head.linear.register_forward_hook(lambda mod, i, o: seen.append(o.shape[0]))
            rate, tok = fam.terms(model, torch.zeros(5, dtype=torch.long), x0, m, xt, n, t)
            (rate.sum() + tok.sum()).backward()
            out[impl] = (rate.detach(), tok.detach(),
                         {k: p_.grad.clone() for k, p_ in model.named_parameters()}, seen[0],
                         int(n.sum()) + 5)
        (r0, t0, g0, rows0, T), (r1, t1, g1, rows1, _) = out["all"], out["targets"]
        torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-6)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)
        assert rows0 == T and rows1 < T, (mode, rows0, rows1, T)


# ---- 4. exact-score tightness ----------------------------------------------------------
def test_exact_score_dise_equals_neg_log_likelihood():
    p = toy_probs(0)
    fam = toy_family("variable")
    model = ExactScore(p)
    for x0 in [(), (1,), (2, 1), (1, 1, 2), (2, 2, 2)]:
        val = dise_by_quadrature(fam, model, x0)
        assert abs(val + math.log(p[CODE[x0]])) < 1e-6, (x0, val, -math.log(p[CODE[x0]]))


def test_fixed_length_exact_score_is_normalised_and_dice_is_tight():
    p = toy_probs(1, only_len=3)
    fam = toy_family("fixed")
    model = ExactScore(p, fixed_len=3)
    # the exact score sums to m - n in every state
    for xt in [(), (1,), (2, 1), (2, 2)]:
        tokens, pk = pack(torch.tensor([[BOS, *xt]]), torch.tensor([len(xt) + 1]))
        u, logits = model(tokens, pk)
        torch.testing.assert_close(float(u.exp().sum()), float(3 - len(xt)), rtol=1e-9, atol=1e-12)
        l = log_rates(u, pk, "fixed", torch.tensor([3 - len(xt)]), 8)
        torch.testing.assert_close(l, u, rtol=1e-9, atol=1e-9)
    for x0 in [(1, 1, 2), (2, 1, 2), (2, 2, 2)]:
        val = dise_by_quadrature(fam, model, x0)
        assert abs(val + math.log(p[CODE[x0]])) < 1e-6, (x0, val)


# ---- 9. Monte-Carlo NELBO ----------------------------------------------------------------
def test_monte_carlo_nelbo_agrees_with_quadrature_and_bounds_entropy():
    p = toy_probs(0)
    fam = toy_family("variable")
    model = ExactScore(p)
    H = float(-(p * np.log(p)).sum())
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(torch.tensor(p), 4096, replacement=True, generator=g)
    seqs = [[BOS, *STRINGS[i]] for i in idx.tolist()]
    lens = torch.tensor([len(s) for s in seqs])
    batch = {"input_ids": torch.tensor([v for s in seqs for v in s]),
             "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])}
    vals = []
    for _ in range(8):
        terms = fam.loss(model, batch, g, exact=True)
        vals.append(terms.nll.double())
    v = torch.cat(vals)
    mean, se = v.mean().item(), v.std().item() / math.sqrt(len(v))
    # exact score: the NELBO equals the entropy (tight bound) up to Monte-Carlo error
    assert abs(mean - H) < 4 * se + 1e-3, (mean, H, se)
    assert (v > -1e-9).all()
    # a wrong score (uniform) gives a strictly larger NELBO
    class Uniform(ExactScore):
        def forward(self, tokens, packing, sigma=None, rows=None):
            n = packing.T if rows is None else rows.numel()
            return torch.zeros(packing.T, dtype=torch.float64), torch.zeros(n, V, dtype=torch.float64)
    worse = fam.loss(Uniform(p), batch, g, exact=True).nll.double().mean().item()
    assert worse > H + 0.1


# ---- 6. sampler convergence with the exact score -----------------------------------------
def test_sampler_with_exact_score_converges_as_steps_grow():
    p = toy_probs(0)
    fam = toy_family("variable")
    model = ExactScore(p)
    tvs = []
    for steps in (4, 16, 64):
        g = torch.Generator().manual_seed(steps)
        out = fam.sample(model, 12000, 8, steps, g, bos_id=BOS)
        assert all(int(s[0]) == BOS for s in out)
        counts = np.zeros(len(STRINGS) + 1)              # last bin: outside the support
        for s in out:
            counts[CODE.get(tuple(s[1:].tolist()), len(STRINGS))] += 1
        tvs.append(0.5 * np.abs(counts / counts.sum() - np.append(p, 0.0)).sum())
    print("TV at 4/16/64 steps:", tvs)
    assert tvs[0] > tvs[1] > tvs[2]
    assert tvs[2] < 0.04 and tvs[0] > 0.1


def test_fixed_length_sampler_completes_to_exact_length_and_reuses_outputs():
    p = toy_probs(1, only_len=3)
    fam = toy_family("fixed")
    model = ExactScore(p, fixed_len=3)
    g = torch.Generator().manual_seed(0)
    stats, traj = {}, []
    out = fam.sample(model, 6000, 4, 8, g, bos_id=BOS, stats=stats, trajectory=traj)
    assert all(len(s) == 4 for s in out)
    counts = np.zeros(len(STRINGS))
    for s in out:
        counts[CODE[tuple(s[1:].tolist())]] += 1
    tv = 0.5 * np.abs(counts / counts.sum() - p).sum()
    assert tv < 0.05, tv
    # lengths never shrink, grow by at most a factor 2 per step, and only changed
    # sequences are forwarded again
    prev = [1] * 6000
    for rec in traj:
        cur = [len(s) for s in rec["ids"]]
        assert all(c >= a and c <= 2 * a for a, c in zip(prev, cur))
        prev = cur
    assert stats["tokens_forwarded"] < stats["forward_calls"] * 6000 * 4


@pytest.mark.parametrize("mode", ["fixed", "variable"])
def test_sampler_output_layer_runs_on_inserting_gaps_only(mode):
    """A real InsertionLM (random weights): the sampler forwards to the features and the
    rates and runs the output layer on the gaps that insert alone -- as many rows as tokens
    were inserted over the whole sample -- with the samples of the all-gaps path."""
    cfg = RunConfig.from_dict({"backbone": {"vocab_size": 40, "d_model": 32, "n_layers": 2,
                                            "n_heads": 4, "cond_dim": 16, "max_seq_len": 24,
                                            "time_conditioning": mode == "variable"},
                               "family": {"name": "did", "length": mode},
                               "data": {"seq_len": 24, "layout": "packed_bos"}})
    fam = get_family(cfg)
    torch.manual_seed(0)
    model = fam.build_model().eval()
    with torch.no_grad():
        for p_ in model.parameters():
            p_.add_(torch.randn_like(p_) * 0.3)
    rows = []
    model.head.linear.register_forward_hook(lambda mod, i, o: rows.append(i[0].shape[0]))
    a = fam.sample(model, 6, 24, 12, torch.Generator().manual_seed(4), bos_id=0, top_p=0.9)
    head_rows = sum(rows)
    rows.clear()
    b = fam.sample(ForwardOnly(model), 6, 24, 12, torch.Generator().manual_seed(4), bos_id=0,
                   top_p=0.9)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 6
    inserted = sum(len(x) - 1 for x in a)
    if mode == "fixed":
        assert inserted == 6 * 23
    assert 0 < head_rows == inserted < sum(rows), (head_rows, inserted, sum(rows))


def test_prompt_and_infilling_gaps():
    p = toy_probs(0)
    fam = toy_family("variable")
    model = ExactScore(p)
    g = torch.Generator().manual_seed(0)
    # prompt "b": insertions only at/after the prompt's last token
    out = fam.sample(model, 500, 8, 16, g, bos_id=BOS, prompts=[[2]] * 500)
    assert all(s[1].item() == 2 for s in out)
    # infilling: fixed "a ... b" with insertions allowed only in the gap after "a"
    out = fam.sample(model, 500, 8, 16, g, bos_id=BOS, prompts=[[1, 2]] * 500,
                     allowed=[[False, True, False]] * 500)
    assert all(s[1].item() == 1 and s[-1].item() == 2 for s in out)
    assert any(len(s) > 3 for s in out)
