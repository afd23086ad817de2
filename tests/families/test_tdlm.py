"""TDLM against exact references: MDLM parity (H=1, K=V), forward marginals vs products of
per-step transition matrices, the one-step reverse posterior, the discrete-time tree NELBO vs
the exact likelihood of the same reverse chain (enumeration of all paths), and ground truth."""
import itertools
import math

import numpy as np
import pytest
import torch

from tdlm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from tdlm.families import get_family
from tdlm.families.tree import TreeDiffusion, level_windows
from tdlm.schedules import LogLinear
from tdlm.tree import VocabTree


def cfg_for(family, V, L, H=1, K=None, T=0, time_cond=False, d=16, **diff):
    return RunConfig(model=ModelConfig(family=family, vocab_size=V, d_model=d, n_layers=1, n_heads=2,
                                       cond_dim=8, max_seq_len=L, dropout=0.0,
                                       time_conditioning=time_cond, tree_H=H, tree_K=K or max(V, 2)),
                     diffusion=DiffusionConfig(num_timesteps=T, **diff), data=DataConfig(seq_len=L))


def small_tree():
    # V=6 tokens, H=2, K=3: {0,1,2} -> n6, {3,4} -> n7, {5} -> n8; root n9
    return VocabTree.from_assignment([np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 0])], K=3).validate()


def mapped_pair(V, L, T=0, seed=0, **diff):
    """An MDLM and a one-level TDLM (H=1, K=V) with the presets' defaults (eps = 1e-3,
    log-linear, time-conditioned, default t_min) and the same weights: the TDLM's embedding has
    the same V+1 rows (root = [MASK]) and its K=V head is MDLM's head without the [MASK] row."""
    mdlm = get_family(cfg_for("mdlm", V, L, T=T, time_cond=True, **diff))
    tdlm = TreeDiffusion(cfg_for("tdlm", V, L, H=1, K=V, T=T, time_cond=True, **diff),
                         tree=VocabTree.one_level(V))
    assert tdlm.root == mdlm.mask_id == V
    torch.manual_seed(seed)
    mm, tm = mdlm.build_model(), tdlm.build_model()
    for p in mm.parameters():                     # non-trivial outputs (zero-init heads)
        torch.nn.init.normal_(p, std=0.3)
    sd = mm.state_dict()
    sd["head.linear.weight"] = sd["head.linear.weight"][:V].clone()
    sd["head.linear.bias"] = sd["head.linear.bias"][:V].clone()
    tm.load_state_dict(sd)
    return mdlm, tdlm, mm.eval(), tm.eval()


@pytest.mark.parametrize("T", [0, 16])
@pytest.mark.parametrize("exact", [True, False])
def test_one_level_tree_loss_is_mdlm_bit_for_bit(T, exact):
    """Under the defaults (eps = 1e-3, time-conditioned, default t_min): the same noise, time
    input, weights and per-sequence NELBO, exactly (torch.equal), in training and evaluation."""
    V, L = 11, 9
    mdlm, tdlm, mm, tm = mapped_pair(V, L, T=T)
    assert mdlm.cfg.diffusion.eps == 1e-3 and mdlm.cfg.model.time_conditioning
    x = torch.randint(0, V, (64, L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = mdlm.loss(mm, {"input_ids": x}, torch.Generator().manual_seed(7), exact=exact)
        b = tdlm.loss(tm, {"input_ids": x}, torch.Generator().manual_seed(7), exact=exact)
    assert torch.equal(a.nll, b.nll), (a.nll - b.nll).abs().max()
    assert torch.equal(a.n_tokens, b.n_tokens)
    assert torch.equal(b.parts["level_0"], b.nll)
    assert a.nll.abs().sum() > 0


def test_one_level_tree_forward_process_is_mdlm():
    V, L = 11, 9
    mdlm, tdlm, _, _ = mapped_pair(V, L)
    x = torch.randint(0, V, (256, L), generator=torch.Generator().manual_seed(2))
    t, w = mdlm._times(256, torch.Generator().manual_seed(3), "cpu", mdlm.regime(train=True))
    h, u, w2 = tdlm._times(256, torch.Generator().manual_seed(3), "cpu", tdlm.regime(train=True))
    assert torch.equal(t, u) and torch.equal(w, w2) and (h == 0).all()
    assert t.min() >= 1e-3                                  # MDLM's sampling_eps
    z1 = mdlm.corrupt(x, t, torch.Generator().manual_seed(4))
    z2, moved = tdlm.corrupt(x, h, u, torch.Generator().manual_seed(4))
    assert torch.equal(z1, z2) and torch.equal(moved, z1 == V)
    # masking probability (1 - eps) t, MDLM's, not t
    p = mdlm.schedule.alpha(torch.tensor([1.0], dtype=torch.float64))
    assert float(p) == pytest.approx(1e-3)
    assert torch.equal(mdlm.schedule.time_input(t), tdlm.time_input(h, u))


@pytest.mark.parametrize("steps", [1, 5, 32])
def test_one_level_tree_sampler_is_mdlm(steps):
    V, L = 11, 9
    mdlm, tdlm, mm, tm = mapped_pair(V, L)
    for seed in range(3):
        a = mdlm.sample(mm, 16, L, steps, torch.Generator().manual_seed(seed))
        b = tdlm.sample(tm, 16, L, steps, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b), (steps, seed, (a != b).float().mean())
        assert (a < V).all()


def test_time_input_is_the_schedules():
    """One definition: MDLM feeds sigma(t) = -log alpha(t); a tree at local time u of level h
    feeds h sigma(1) + sigma(u), continuous at window boundaries and increasing in t."""
    fam = TreeDiffusion(cfg_for("tdlm", 6, 4, H=2, K=3, time_cond=True), tree=small_tree())
    s1 = -math.log(1e-3)
    u = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    lo = fam.time_input(torch.zeros(3, dtype=torch.long), u)
    hi = fam.time_input(torch.ones(3, dtype=torch.long), u)
    ref = torch.tensor([-math.log(1 - (1 - 1e-3) * v) for v in u.tolist()], dtype=torch.float64)
    assert torch.allclose(lo.double(), ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(hi.double(), ref + s1, rtol=1e-6)
    assert float(lo[-1]) == pytest.approx(float(hi[0]), rel=1e-6)


def step_matrix(tree, fam, t, s):
    """Brute-force forward transition matrix Q(s -> t) over all nodes for s < t (same or
    different windows), built from the per-level absorbing-to-parent definition."""
    N = tree.num_nodes
    Q = torch.eye(N, dtype=torch.float64)
    w = fam.windows
    cur = s
    while cur < t - 1e-15:
        h = int((torch.searchsorted(w, torch.tensor(cur, dtype=torch.float64), right=True) - 1).clamp(0, fam.H - 1))
        end = min(t, float(w[h + 1]))
        u0 = (cur - float(w[h])) / float(w[h + 1] - w[h])
        u1 = (end - float(w[h])) / float(w[h + 1] - w[h])
        a0 = float(fam.alpha_local(torch.tensor(u0, dtype=torch.float64), h))
        a1 = float(fam.alpha_local(torch.tensor(u1, dtype=torch.float64), h))
        M = torch.eye(N, dtype=torch.float64)
        p = 0.0 if a0 == 0 else (a0 - a1) / a0      # a node at height h jumps to its parent
        for n in tree.nodes_at_height(h):
            M[n, n] = 1 - p
            M[n, tree.parent[n]] += p
        Q = Q @ M
        cur = end
    return Q


@pytest.mark.parametrize("alloc", ["linear", "exponential"])
def test_forward_marginals_match_transition_products(alloc):
    tree = small_tree()
    fam = TreeDiffusion(cfg_for("tdlm", 6, 4, H=2, K=3, window_allocation=alloc), tree=tree)
    g = torch.Generator().manual_seed(0)
    n = 600000
    for t in (0.1, 0.37, 0.5, 0.62, 0.93):
        # brute force: product of many small per-step matrices from 0 to t
        Q = torch.eye(tree.num_nodes, dtype=torch.float64)
        grid = np.linspace(0, t, 200)
        for a, b in zip(grid[:-1], grid[1:]):
            Q = Q @ step_matrix(tree, fam, b, a)
        x0 = torch.arange(6).repeat(n // 6)[:, None]
        tt = torch.full((len(x0),), t, dtype=torch.float64)
        h, u, _ = fam.locate(tt)
        z, moved = fam.corrupt(x0, h, u, g)
        for tok in range(6):
            emp = torch.bincount(z[x0[:, 0] == tok, 0], minlength=tree.num_nodes).double()
            emp /= emp.sum()
            assert torch.allclose(emp, Q[tok], atol=0.006), (t, tok, emp, Q[tok])


def test_one_step_reverse_posterior():
    """Sampler transition z_t -> z_s equals sum_x p_theta(x|z_t) q(z_s | z_t, x) computed with
    Bayes' rule on the brute-force transition matrices."""
    tree = small_tree()
    fam = TreeDiffusion(cfg_for("tdlm", 6, 1, H=2, K=3), tree=tree)
    model = fam.build_model()
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    node = 7                       # height-1 node with children {3, 4}
    t, s = 0.4, 0.15               # inside window 0 = [0, 0.5]
    Qt = step_matrix(tree, fam, t, 0.0)
    Qs = step_matrix(tree, fam, s, 0.0)
    Qst = step_matrix(tree, fam, t, s)
    z = torch.tensor([[node]])
    logits = model(z, torch.zeros(1), torch.zeros(1, dtype=torch.long))[0, 0].double()
    p_child = torch.softmax(logits[:2], -1)               # over ranks 0, 1
    # p_theta(x | z_t): child of rank r -> token x
    truth = torch.zeros(tree.num_nodes, dtype=torch.float64)
    for r, x in enumerate((3, 4)):
        post = Qs[x] * Qst[:, node] / Qt[x, node]         # q(z_s | z_t = node, x)
        truth += p_child[r] * post
    # empirical one-step transitions of the sampler's step
    n = 200000
    h = torch.zeros(1, dtype=torch.long)
    a_t = float(fam.alpha_local(torch.tensor(t / 0.5, dtype=torch.float64), 0))
    a_s = float(fam.alpha_local(torch.tensor(s / 0.5, dtype=torch.float64), 0))
    from tdlm.sampling.loop import reverse_step
    zz = torch.full((n, 1), node)
    logp = torch.log_softmax(model(zz[:1], torch.zeros(1), h).double(), -1).expand(n, 1, 3)
    move, choice = reverse_step(fam.height[zz] == 1, logp, (a_s - a_t) / (1 - a_t),
                                torch.Generator().manual_seed(0))
    out = zz.clone()
    out[move] = model.child(zz[move], choice)
    emp = torch.bincount(out[:, 0], minlength=tree.num_nodes).double() / n
    assert torch.allclose(emp, truth, atol=4e-3), (emp, truth)


@torch.no_grad()
def test_discrete_tree_nelbo_bounds_exact_path_likelihood():
    tree = small_tree()
    L, per_level = 2, 2
    T = per_level * tree.H
    # eps = 1e-12: the omitted prior term (alpha(1) = eps at the top, as in MDLM) is negligible,
    # so the exact reverse chain from all-root is the chain the NELBO bounds
    fam = TreeDiffusion(cfg_for("tdlm", 6, L, H=2, K=3, T=T, time_cond=True, eps=1e-12),
                        tree=tree)
    model = fam.build_model().double()
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    N = tree.num_nodes
    height = fam.height

    def cond_logp(z, lv, u):
        zt = torch.tensor([z])
        sig = fam.time_input(torch.tensor([lv]), torch.tensor([u], dtype=torch.float64))
        return torch.log_softmax(model(zt, sig, torch.tensor([lv]))[0].double(), -1)   # [L, K]

    # exact likelihood of the discrete reverse chain: DP over joint states
    dist = {tuple([tree.root] * L): 1.0}
    steps = []
    for lv in range(tree.H - 1, -1, -1):
        for j in range(per_level):
            u_t, u_s = 1 - j / per_level, 1 - (j + 1) / per_level
            steps.append((lv, u_t, u_s))
    for lv, u_t, u_s in steps:
        a_t = float(fam.alpha_local(torch.tensor(u_t, dtype=torch.float64), lv))
        a_s = float(fam.alpha_local(torch.tensor(u_s, dtype=torch.float64), lv))
        pm = (a_s - a_t) / (1 - a_t)
        new = {}
        for z, pz in dist.items():
            lp = cond_logp(z, lv, u_t)
            opts = []
            for i, node in enumerate(z):
                if height[node] == lv + 1:
                    ch = [int(model.child(torch.tensor(node), torch.tensor(r)))
                          for r in range(int(tree.n_children[node]))]
                    o = [(c, pm * math.exp(lp[i, r])) for r, c in enumerate(ch)]
                    if pm < 1:
                        o.append((node, 1 - pm))
                    opts.append(o)
                else:
                    opts.append([(node, 1.0)])
            for combo in itertools.product(*opts):
                zn = tuple(c for c, _ in combo)
                new[zn] = new.get(zn, 0.0) + pz * math.prod(p for _, p in combo)
        dist = new
    assert abs(sum(dist.values()) - 1) < 1e-9
    # exact discrete NELBO by enumerating the forward marginals (positions independent given x)
    def exact_nelbo(x):
        """sum over steps of E_{z_t ~ q(.|x)} [coef * sum_i moved_i CE_i] by enumeration."""
        nelbo = 0.0
        for lv, u_t, u_s in steps:
            a_t = float(fam.alpha_local(torch.tensor(u_t, dtype=torch.float64), lv))
            a_s = float(fam.alpha_local(torch.tensor(u_s, dtype=torch.float64), lv))
            coef = (a_s - a_t) / (1 - a_t)
            for mv in itertools.product([0, 1], repeat=L):
                pr = math.prod((1 - a_t) if m else a_t for m in mv)
                if pr == 0:
                    continue
                z = tuple(int(tree.anc[lv + m, xi]) for m, xi in zip(mv, x))
                lp = cond_logp(z, lv, u_t)
                ce = sum(-float(lp[i, tree.rank[tree.anc[lv, xi]]])
                         for i, (m, xi) in enumerate(zip(mv, x)) if m)
                nelbo += pr * coef * ce
        return nelbo

    for x in itertools.product(range(6), repeat=L):
        nelbo = exact_nelbo(x)
        nll = -math.log(dist[x])
        assert nelbo >= nll - 1e-9, (x, nelbo, nll)
    # and the family's Monte-Carlo discrete loss estimates the same NELBO
    x = torch.tensor([[0, 4]])
    g = torch.Generator().manual_seed(0)
    vals = torch.stack([fam.loss(model, {"input_ids": x.repeat(256, 1)}, g, exact=True).nll.double()
                        for _ in range(60)]).flatten()
    exact = exact_nelbo((0, 4))
    se = vals.std().item() / math.sqrt(len(vals))
    assert abs(vals.mean().item() - exact) < 4 * se, (vals.mean().item(), exact, se)


def test_level_windows_and_steps_split():
    w = level_windows(3, "exponential", 2.0)
    assert torch.allclose(w, torch.tensor([0, 1 / 7, 3 / 7, 1.0], dtype=torch.float64))
    fam = TreeDiffusion(cfg_for("tdlm", 6, 4, H=2, K=3), tree=small_tree())
    assert fam.steps_per_level(7) == [3, 4] and sum(fam.steps_per_level(512)) == 512
    s = fam.sample(fam.build_model(), 3, 4, 6, torch.Generator().manual_seed(0))
    assert s.shape == (3, 4) and s.max() < 6 and s.min() >= 0     # every position reaches a leaf


def test_internal_embeddings_start_as_mean_of_children():
    fam = TreeDiffusion(cfg_for("tdlm", 6, 4, H=2, K=3), tree=small_tree())
    W = fam.build_model().backbone.vocab_embed.weight
    assert torch.allclose(W[6], W[[0, 1, 2]].mean(0)) and torch.allclose(W[8], W[5])
    assert torch.allclose(W[9], W[[6, 7, 8]].mean(0))


def test_per_level_head_uses_its_own_slice_and_trains():
    tree = small_tree()
    cfg = cfg_for("tdlm", 6, 4, H=2, K=3)
    cfg.model.tree_head = "per_level"
    fam = TreeDiffusion(cfg, tree=tree)
    model = fam.build_model()
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    z = torch.tensor([[9, 6, 7, 8]])
    l0 = model(z, torch.zeros(1), torch.tensor([0]))
    l1 = model(z, torch.zeros(1), torch.tensor([1]))
    assert not torch.allclose(l0[0, 0], l1[0, 0])                       # different head slices
    W = model.head.linear.weight.view(2, 3, -1)
    feats = model.features(z, torch.zeros(1))
    ref = feats[0, 1] @ W[1].T + model.head.linear.bias.view(2, 3)[1]
    assert torch.allclose(l1[0, 1], ref.masked_fill(~model.child_mask(z)[0, 1], float("-inf")))
    x = torch.randint(0, 6, (8, 4))
    terms = fam.loss(model, {"input_ids": x}, torch.Generator().manual_seed(0))
    terms.per_token().backward()
    assert model.head.linear.weight.grad.abs().sum() > 0
