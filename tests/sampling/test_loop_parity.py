"""The shared ancestral loop (``tdlm.sampling.loop``) reproduces the samplers it replaced.

``old_mdlm_sample`` and ``old_tdlm_sample`` are the MDLM and TDLM sampling loops exactly as they
were before the loop was factored out (commit b910512), updated only for the conventions that
issue "Trustworthy numbers" changed on purpose: the time input is ``NoiseSchedule.time_input``
(float64), TDLM's top window keeps the schedule's eps (``alpha_local(u, h)``), and TDLM's finest
window ends at t_min = 1e-5 followed by MDLM's argmax noise removal. At the same seed the
families' current ``sample`` must give the same tokens and make the same forward calls (caching
on/off, time-conditioned or not, nucleus, temperature, prefix, uneven TDLM level splits)."""
import numpy as np
import pytest
import torch

from tdlm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from tdlm.families import get_family
from tdlm.families.tree import TreeDiffusion
from tdlm.sampling.gumbel import adjust_logits
from tdlm.sampling.loop import reverse_step
from tdlm.tree import VocabTree


def old_mdlm_sample(fam, model, num, seq_len, steps, generator, temperature=1.0, top_p=1.0,
                    t_min=1e-5, cache=True, noise_removal=True, prefix=None, on_forward=None):
    z = torch.full((num, seq_len), fam.mask_id, dtype=torch.long)
    if prefix is not None:
        z[:, :prefix.shape[1]] = prefix
    ts = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)
    logp = None
    reuse_ok = cache and not fam.cfg.model.time_conditioning
    for k in range(steps):
        t, s = ts[k], ts[k + 1]
        if logp is None:
            sigma = fam.schedule.time_input(torch.full((num,), float(t), dtype=torch.float64))
            logits = model(z, sigma)
            if on_forward:
                on_forward(k)
            logp = fam._prediction(logits, temperature, top_p)
        a_t = float(fam.schedule.alpha(t))
        a_s = float(fam.schedule.alpha(s))
        move, choice = reverse_step(z == fam.mask_id, logp, (a_s - a_t) / (1 - a_t), generator)
        z_new = z
        if move.any():
            z_new = z.clone()
            z_new[move] = choice
        if not (reuse_ok and torch.equal(z_new, z)):
            logp = None
        z = z_new
    if noise_removal and (z == fam.mask_id).any():
        if logp is None:
            sigma = fam.schedule.time_input(torch.full((num,), float(ts[-1]), dtype=torch.float64))
            logits = model(z, sigma)
            if on_forward:
                on_forward(steps)
            logp = fam._prediction(logits, temperature, top_p)
        z = torch.where(z == fam.mask_id, logp.argmax(-1), z)
    return z


def old_tdlm_sample(fam, model, num, seq_len, steps, generator, temperature=1.0, top_p=1.0,
                    steps_split=None, cache=True, prefix=None, on_forward=None, t_min=1e-5):
    z = torch.full((num, seq_len), fam.root, dtype=torch.long)
    if prefix is not None:
        z[:, :prefix.shape[1]] = prefix
    height = fam.height
    parent = torch.as_tensor(fam.tree.parent, dtype=torch.long)

    def shown(zz, lv):
        # since session 22 the model sees the prefix at level lv as its height-lv ancestors
        # (a training row at level lv holds no leaf above it): lv steps up the parent pointers
        if prefix is None:
            return zz
        zz = zz.clone()
        a = prefix.clone()
        for _ in range(lv):
            a = parent[a]
        zz[:, :prefix.shape[1]] = a
        return zz

    n = fam.steps_per_level(steps, steps_split)
    reuse_ok = cache and not fam.cfg.model.time_conditioning
    k_global = 0
    logp = None
    for lv in range(fam.H - 1, -1, -1):
        us = torch.linspace(1.0, t_min if lv == 0 else 0.0, n[lv] + 1, dtype=torch.float64)
        hv = torch.full((num,), lv)
        logp = None
        for j in range(n[lv]):
            noised = height[z] == lv + 1
            if logp is None:
                sigma = fam.time_input(hv, torch.full((num,), float(us[j]), dtype=torch.float64))
                logits = model(shown(z, lv), sigma, hv)
                if on_forward:
                    on_forward(k_global)
                logp = adjust_logits(logits.double(), temperature, top_p)
            a_t = float(fam.alpha_local(us[j], lv))
            a_s = float(fam.alpha_local(us[j + 1], lv))
            move, choice = reverse_step(noised, logp, (a_s - a_t) / (1 - a_t), generator)
            if move.any():
                z = z.clone()
                z[move] = model.child(z[move], choice)
            if move.any() or not reuse_ok:
                logp = None
            k_global += 1
    last = height[z] == 1
    if last.any():                                   # noise removal, as MDLM's
        if logp is None:
            hv = torch.zeros(num, dtype=torch.long)
            sigma = fam.time_input(hv, torch.full((num,), t_min, dtype=torch.float64))
            logp = adjust_logits(model(z, sigma, hv).double(), temperature, top_p)
            if on_forward:
                on_forward(k_global)
        z = z.clone()
        z[last] = model.child(z[last], logp[last].argmax(-1))
    return z


def cfg_for(family, V, L, H=1, K=None, time_cond=False, head="shared"):
    return RunConfig(model=ModelConfig(family=family, vocab_size=V, d_model=16, n_layers=1,
                                       n_heads=2, cond_dim=8, max_seq_len=L, dropout=0.0,
                                       time_conditioning=time_cond, tree_H=H,
                                       tree_K=K or max(V, 2), tree_head=head),
                     diffusion=DiffusionConfig(), data=DataConfig(seq_len=L))


def randomised(model, seed):
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def run_both(new, old, seed):
    calls_new, calls_old = [], []
    a = new(torch.Generator().manual_seed(seed), calls_new.append)
    b = old(torch.Generator().manual_seed(seed), calls_old.append)
    return a, b, calls_new, calls_old


@pytest.mark.parametrize("time_cond,cache,temperature,top_p,prefix,steps", [
    (False, True, 1.0, 1.0, False, 40),      # many cache hits (40 steps, 9 positions)
    (False, False, 1.0, 1.0, False, 12),
    (True, True, 0.8, 0.9, False, 12),
    (False, True, 1.0, 1.0, True, 25),
    (False, True, 1.0, 1.0, False, 3),       # few steps: the noise-removal pass runs
])
def test_mdlm_sampler_matches_pre_refactor_loop(time_cond, cache, temperature, top_p, prefix,
                                                 steps):
    V, L, num = 7, 9, 3
    fam = get_family(cfg_for("mdlm", V, L, time_cond=time_cond))
    model = randomised(fam.build_model(), 0)
    pre = torch.tensor([[1, 2, 3]] * num) if prefix else None
    for seed in (0, 1):
        a, b, cn, co = run_both(
            lambda g, cb: fam.sample(model, num, L, steps, g, temperature=temperature,
                                     top_p=top_p, cache=cache, prefix=pre, on_forward=cb),
            lambda g, cb: old_mdlm_sample(fam, model, num, L, steps, g, temperature, top_p,
                                          cache=cache, prefix=pre, on_forward=cb), seed)
        assert torch.equal(a, b)
        assert cn == co
        if prefix:
            assert torch.equal(a[:, :3], pre)
    if not time_cond and cache and steps == 40:
        assert len(cn) < steps          # the case does exercise the cache


def small_tree():
    # V=6 tokens, H=2, K=3: {0,1,2} -> n6, {3,4} -> n7, {5} -> n8; root n9
    return VocabTree.from_assignment([np.array([0, 0, 0, 1, 1, 2]),
                                      np.array([0, 0, 0])], K=3).validate()


@pytest.mark.parametrize("time_cond,cache,head,split,top_p,prefix", [
    (False, True, "shared", None, 1.0, False),
    (False, True, "per_level", [7, 3], 1.0, True),      # steps_split indexed by height
    (True, True, "shared", [2, 8], 0.8, False),
    (False, False, "per_level", None, 1.0, False),
])
def test_tdlm_sampler_matches_pre_refactor_loop(time_cond, cache, head, split, top_p, prefix):
    V, L, num, steps = 6, 8, 3, 10
    fam = TreeDiffusion(cfg_for("tdlm", V, L, H=2, K=3, time_cond=time_cond, head=head),
                        tree=small_tree())
    model = randomised(fam.build_model(), 1)
    pre = torch.tensor([[5, 0]] * num) if prefix else None
    for seed in (0, 3):
        a, b, cn, co = run_both(
            lambda g, cb: fam.sample(model, num, L, steps, g, top_p=top_p, steps_split=split,
                                     cache=cache, prefix=pre, on_forward=cb),
            lambda g, cb: old_tdlm_sample(fam, model, num, L, steps, g, top_p=top_p,
                                          steps_split=split, cache=cache, prefix=pre,
                                          on_forward=cb), seed)
        assert torch.equal(a, b)
        assert cn == co
        assert bool((a < V).all())      # every position reached a leaf (token)
