"""MDLM against ground truth: exact ELBO by enumeration with the optimal denoiser, MC loss
agreement, discrete-time convergence, sampler one-step law and full-distribution match."""
import itertools
import math

import pytest
import torch

from tdlm.config import RunConfig, ModelConfig, DiffusionConfig, DataConfig
from tdlm.families import get_family
from tdlm.families.masked import subs_log_probs
from tdlm.sampling.gumbel import adjust_logits, gumbel_argmax
from synthetic import ForwardOnly, MarkovSource, OracleMaskedDenoiser

V, L = 3, 5


def make(schedule="loglinear", T=0, time_cond=False):
    cfg = RunConfig(model=ModelConfig(family="mdlm", vocab_size=V, d_model=16, n_layers=1, n_heads=2,
                                      cond_dim=8, max_seq_len=L, time_conditioning=time_cond),
                    diffusion=DiffusionConfig(schedule=schedule, num_timesteps=T),
                    data=DataConfig(seq_len=L))
    return get_family(cfg)


@pytest.fixture(scope="module")
def source():
    return MarkovSource(V, L, seed=0)


def mask_table(source, fam):
    """f(m) = E_x[ sum_{i in m} -log p(x_i | x outside m) ] for every mask set m."""
    oracle = OracleMaskedDenoiser(source, fam.mask_id)
    seqs, logp = source.all_sequences()
    px = logp.exp()
    f = {}
    for m in itertools.product([0, 1], repeat=L):
        mk = torch.tensor(m, dtype=torch.bool)
        z = torch.where(mk[None], torch.full_like(seqs, fam.mask_id), seqs)
        lp = torch.log_softmax(oracle(z).double(), -1)
        ce = -lp.gather(-1, seqs[..., None]).squeeze(-1)
        f[m] = (px * (ce * mk[None]).sum(-1)).sum().item()
    return f


def g_of_t(f, alpha):
    """E over masks of f(m) when each position is masked w.p. 1 - alpha (alpha: float or tensor)."""
    F = [sum(v for m, v in f.items() if sum(m) == k) for k in range(L + 1)]
    return sum(((1 - alpha) ** k) * (alpha ** (L - k)) * F[k] for k in range(L + 1))


def exact_continuous(fam, f, n=4000):
    # midpoint rule on a grid dense near 0 (t = u^2) for int_0^1 w(t) g(t) dt
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t = u ** 2
    a = fam.schedule.alpha(t)
    w = fam.schedule.weight(t)
    vals = g_of_t(f, a)
    return (w * vals * 2 * u).mean().item()


def exact_discrete(fam, f, T):
    tot = 0.0
    for i in range(1, T + 1):
        t, s = torch.tensor(i / T, dtype=torch.float64), torch.tensor((i - 1) / T, dtype=torch.float64)
        a_t, a_s = fam.schedule.alpha(t).item(), fam.schedule.alpha(s).item()
        tot += (a_s - a_t) / (1 - a_t) * g_of_t(f, a_t)
    return tot


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_exact_nelbo_bounds_entropy_and_discrete_converges(source, schedule):
    fam = make(schedule)
    f = mask_table(source, fam)
    H = source.entropy()
    cont = exact_continuous(fam, f)
    # optimal denoiser: continuous NELBO = H up to the omitted prior term (alpha_1 = eps)
    assert abs(cont - H) < 5e-3 * H, (cont, H)
    prev = float("inf")
    for T in (1, 2, 4, 16, 64, 256):
        d = exact_discrete(fam, f, T)
        assert d >= H - 5e-3 * H          # a valid bound for every T
        assert d < prev                    # tightens as T grows
        prev = d
    assert abs(prev - cont) < 0.02 * H     # T=256 is close to continuous time


def test_monte_carlo_loss_matches_exact(source):
    """family.loss (antithetic t, exact weights) with the oracle is an unbiased NELBO estimate."""
    for T in (0, 4):
        fam = make(T=T)
        f = mask_table(source, fam)
        exact = exact_continuous(fam, f) if T == 0 else exact_discrete(fam, f, T)
        oracle = OracleMaskedDenoiser(source, fam.mask_id)
        g = torch.Generator().manual_seed(1)
        vals = []
        for _ in range(40):
            x = source.sample(512, g)
            terms = fam.loss(oracle, {"input_ids": x}, g, exact=True)
            vals.append(terms.nll.double().mean().item())
        vals = torch.tensor(vals)
        se = vals.std().item() / math.sqrt(len(vals))
        assert abs(vals.mean().item() - exact) < 4 * se + 1e-3 * exact, (vals.mean(), exact, se)


def test_subs_carry_over_and_mask_excluded():
    logits = torch.randn(2, 4, V + 1)
    z = torch.tensor([[0, V, 2, V], [V, V, 1, 1]])
    lp = subs_log_probs(logits.clone(), z, V)
    assert lp.shape[-1] == V                                           # [MASK] never predicted
    assert torch.equal(lp, subs_log_probs(logits[..., :V].clone(), z, V))
    un = z != V
    assert torch.allclose(lp[un].exp().gather(-1, z[un][:, None]).squeeze(-1), torch.ones(un.sum()))
    assert torch.allclose(lp[~un].exp().sum(-1), torch.ones((~un).sum()))


def test_masking_rate_matches_schedule():
    for sched in ("loglinear", "linear", "cosine"):
        fam = make(sched)
        g = torch.Generator().manual_seed(0)
        x = torch.zeros(4, 20000, dtype=torch.long)
        t = torch.tensor([0.1, 0.4, 0.7, 0.95])
        z = fam.corrupt(x, t, g)
        rate = (z == fam.mask_id).float().mean(-1)
        assert torch.allclose(rate, 1 - fam.schedule.alpha(t), atol=0.015), (sched, rate)


def test_schedule_derivatives_and_weights():
    for sched in ("loglinear", "linear", "cosine"):
        s = make(sched).schedule
        t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
        h = 1e-6
        num = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
        assert torch.allclose(s.dalpha(t), num, rtol=1e-5)
        assert torch.allclose(s.weight(t), -s.dalpha(t) / (1 - s.alpha(t)), rtol=1e-6)
        assert abs(s.alpha(torch.tensor(0.0)).item() - 1) < 1e-9
        assert s.alpha(torch.tensor(1.0)).item() <= 1.1e-3


def test_one_step_transition_law():
    """From t to s a masked position unmasks w.p. (a_s - a_t)/(1 - a_t), to a token ~ p_x0."""
    fam = make()
    n = 200000
    z = torch.full((n, 1), fam.mask_id)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    logp = p[:V].log().expand(n, 1, V)
    g = torch.Generator().manual_seed(0)
    p_move = 0.37
    out = fam.step(z, logp, p_move, g)
    moved = out != fam.mask_id
    assert abs(moved.float().mean().item() - p_move) < 0.005
    freq = torch.bincount(out[moved], minlength=V).double() / moved.sum()
    assert torch.allclose(freq, p[:V], atol=0.006)
    z2 = torch.tensor([[1]])
    assert fam.step(z2, logp[:1], 1.0, g).item() == 1      # unmasked tokens never change


def tv_to_source(source, samples):
    seqs, logp = source.all_sequences()
    idx = (samples * (V ** torch.arange(L - 1, -1, -1))).sum(-1)
    emp = torch.bincount(idx, minlength=V ** L).double() / len(samples)
    return 0.5 * (emp - logp.exp()).abs().sum().item()


def test_sampler_with_exact_denoiser_matches_source(source):
    fam = make()
    oracle = OracleMaskedDenoiser(source, fam.mask_id)
    g = torch.Generator().manual_seed(0)
    tv = {}
    for steps in (1, 4, 256):
        s = fam.sample(oracle, 20000, L, steps, g)
        assert (s != fam.mask_id).all() and s.max() < V
        tv[steps] = tv_to_source(source, s)
    assert tv[256] < 0.035, tv          # sampling noise alone is ~0.02 at 20k samples
    assert tv[1] > tv[4] > tv[256], tv  # total variation falls with the number of steps


def test_cache_reuses_prediction_only_when_nothing_changed(source):
    fam = make(time_cond=False)
    oracle = OracleMaskedDenoiser(source, fam.mask_id)
    g = torch.Generator().manual_seed(0)
    fam.sample(oracle, 4, L, 500, g)
    assert oracle.calls < 100                # 500 steps, at most L*4 changes + noise removal
    fam_tc = make(time_cond=True)
    oracle2 = OracleMaskedDenoiser(source, fam_tc.mask_id)
    fam_tc.sample(oracle2, 4, L, 50, torch.Generator().manual_seed(0))
    assert oracle2.calls >= 50               # a time-conditioned model is called every step


@pytest.mark.parametrize("time_cond", [False, True])
def test_sampler_output_layer_runs_on_moving_positions_only(time_cond, monkeypatch):
    """A real network (random weights): the sampler forwards to the features and runs the
    output layer on the positions that move alone (plus the noise-removal pass); the samples
    are those of the all-positions path (a module that only returns logits)."""
    torch.manual_seed(0)
    cfg = RunConfig.from_dict({"backbone": {"vocab_size": 50, "d_model": 32, "n_layers": 2,
                                            "n_heads": 4, "cond_dim": 16, "max_seq_len": 24,
                                            "time_conditioning": time_cond},
                               "family": {"name": "mdlm"}, "data": {"seq_len": 24}})
    fam = get_family(cfg)
    model = fam.build_model().eval()
    with torch.no_grad():
        for p_ in model.parameters():
            p_.add_(torch.randn_like(p_) * 0.1)
    rows, linear, head_w = [], torch.nn.functional.linear, model.head.linear.weight.data_ptr()

    def counting(x, w, b=None):                # rows through the output layer's weights
        if w.data_ptr() == head_w:
            rows.append(x.shape[:-1].numel())
        return linear(x, w, b)
    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    traj = []
    a = fam.sample(model, 6, 24, 16, torch.Generator().manual_seed(2), top_p=0.9,
                   trajectory=traj)
    head_rows = sum(rows)
    rows.clear()
    b = fam.sample(ForwardOnly(model), 6, 24, 16, torch.Generator().manual_seed(2), top_p=0.9)
    assert torch.equal(a, b)
    moved = sum(int(((torch.tensor(p["ids"]) == fam.mask_id)
                     & (torch.tensor(c["ids"]) != fam.mask_id)).sum())
                for p, c in zip(traj[:17], traj[1:17]))       # the 16 reverse steps
    removal = 6 * 24 if traj[-1].get("noise_removal") else 0
    assert head_rows == moved + removal < sum(rows), (head_rows, moved, removal, sum(rows))


def test_sampler_reproducible_at_seed(source):
    fam = make()
    oracle = OracleMaskedDenoiser(source, fam.mask_id)
    a = fam.sample(oracle, 16, L, 10, torch.Generator().manual_seed(5))
    b = fam.sample(oracle, 16, L, 10, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_gumbel_float64_matches_distribution_and_nucleus():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.0999, 0.0001], dtype=torch.float64)
    draws = gumbel_argmax(p.log().expand(400000, 4), g)
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    assert torch.allclose(freq, p, atol=3e-3)
    assert freq[3] > 0                                   # the rare class is reachable
    # float64 noise reaches Gumbel values beyond float32's ceiling (-log(-log(1 - 2^-24)) ~ 16.6)
    u = torch.rand(10 ** 6, generator=g, dtype=torch.float64)
    assert (-torch.log(-torch.log(u))).max() > 0 and gumbel_argmax.__defaults__[-1] == torch.float64
    lp = adjust_logits(p.clamp_min(1e-12).log(), top_p=0.85)
    assert torch.isinf(lp[2:]).all() and torch.allclose(lp[:2].exp(), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    lp_t = adjust_logits(p.clamp_min(1e-12).log(), temperature=0.5)
    assert torch.allclose(lp_t.exp(), p ** 2 / (p ** 2).sum(), atol=1e-9)


def test_keep_first_model_samples_from_bos_then_masks():
    """A ``keep_first`` model never saw position 0 masked in training (it is always the BOS,
    not counted), so it samples from [BOS] + [MASK]^(L-1): position 0 is the given BOS in
    every sample and every recorded state, never a prediction; without a BOS it is a one-line
    error. A model trained without keep_first ignores bos_id (same samples as without)."""
    from tdlm.errors import ConfigError
    from tdlm.sampling.result import build_options

    def build(keep_first):
        torch.manual_seed(0)
        cfg = RunConfig.from_dict({"backbone": {"vocab_size": 50, "d_model": 32, "n_layers": 2,
                                                "n_heads": 4, "cond_dim": 16, "max_seq_len": 24},
                                   "family": {"name": "mdlm", "keep_first": keep_first},
                                   "data": {"seq_len": 24, "layout": "packed_bos"}})
        fam = get_family(cfg)
        model = fam.build_model().eval()
        with torch.no_grad():
            for p_ in model.parameters():
                p_.add_(torch.randn_like(p_) * 0.3)
        return fam, model

    def draw(fam, model, **kw):
        opts = build_options(fam.SampleOptions, "mdlm", steps=8, trajectory=True, **kw)
        return fam.sample(model, 6, 24, opts, torch.Generator().manual_seed(1))

    fam, model = build(True)
    res = draw(fam, model, bos_id=7)
    assert (res.ids[:, 0] == 7).all()
    assert all((torch.tensor(s["ids"])[:, 0] == 7).all() for s in res.trajectory)
    assert (res.ids[:, 1:] != fam.mask_id).all()
    with pytest.raises(ConfigError, match="keep_first") as ei:
        draw(fam, model)
    assert "\n" not in str(ei.value)
    fam0, model0 = build(False)
    assert torch.equal(draw(fam0, model0, bos_id=7).ids, draw(fam0, model0).ids)
    assert not (draw(fam0, model0).ids[:, 0] == 7).all()
