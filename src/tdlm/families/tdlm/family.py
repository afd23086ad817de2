"""TDLM: tree-structured diffusion over a vocabulary tree (spec: shared/spec/TDLM.md).

Tree: leaves are tokens (node id = token id), internal nodes above, root last; ``a_h(x)``
is the height-h ancestor of token x (``tree.anc[h, x]``).

Level windows (§3): ``0 = t_0 < t_1 < ... < t_H = 1``; ``linear`` allocation gives equal
windows, ``exponential`` gives window lengths proportional to ``r^h`` (r = window_ratio).
Inside window h, with local time ``u = (t - t_h) / (t_{h+1} - t_h)``, the forward marginal is
absorbing diffusion whose absorbing state is the parent:

    q_t(z_i | x) = alpha_h(t) onehot(a_h(x_i)) + (1 - alpha_h(t)) onehot(a_{h+1}(x_i)).

The in-level schedule is the configured one (``tdlm.schedules``), with eps meaning what it
means in MDLM: the end of the whole chain is alpha = eps, not full absorption, and the prior
term is omitted. So the **top window** (h = H-1, absorbing state the root) uses the schedule as
it is, ``alpha_{H-1}(u) = alpha(u)``, and every **inner window** has eps removed so it ends
exactly at the parent, ``alpha_h(u) = (alpha(u) - alpha(1)) / (1 - alpha(1))``, as the next
window's marginal requires (log-linear: ``1 - u``, the spec's linear default). Both give the
same weight, ``-alpha_h'(u) / (1 - alpha_h(u)) = -alpha'(u) / (1 - alpha(u))``. With one
level this *is* MDLM's process (same eps, same time input, same draw of t). **[ours]**

Network time input: ``h * sigma(1) + sigma(u)`` (``NoiseSchedule.time_input``; one definition for
all families; with H = 1 it is MDLM's sigma(t)).

Tree NELBO (§5), per sequence:

    L(x) = sum_h int_{t_h}^{t_{h+1}} w_h(t) E[ sum_i 1{z_t,i = a_{h+1}(x_i)} CE_i ] dt,
    w_h(t) = -alpha_h'(t) / (1 - alpha_h(t))  (= 1 / (t - t_h) for the linear in-level schedule),
    CE_i = -log p_theta(rank(a_h(x_i)) | z_t, t)  over the children of z_t,i (others masked).

Monte-Carlo: t ~ U(0, 1) antithetic over the batch; its window gives the level, and the local
time is mapped to [t_min, 1] inside the window (``family.train_t_min`` / ``eval_t_min``, as
MDLM maps t). The per-level split is returned in ``parts`` (``level_h``, summing to the total).
As in MDLM the prior term at the top (alpha(1) = eps) is omitted. Only real tokens are
counted (padding: as in MDLM's ``loss``). Training may multiply
level h by lambda_h (linear/exponential level weighting) and clip w (``train_weight_clip``);
evaluation always uses lambda = 1 and exact weights. Discrete time: ``num_timesteps`` = T steps
split evenly over the levels, weights ``(alpha_s - alpha_t) / (1 - alpha_t)`` times the number
of steps, which is the exact ELBO of the discrete-time reverse chain.

Sampler (§6): coarse to fine; for h = H-1 .. 0, ``n_h`` steps over window h. From t to s every
position at height h+1 moves to a child with probability ``(alpha_h(s) - alpha_h(t)) /
(1 - alpha_h(t))`` (1 on the window's last step), the child drawn from the masked K-way
softmax with float64 Gumbel, temperature and nucleus; positions already at height h stay.
Inner windows end at u = 0 (p_move = 1 on their last step); the finest window ends at
u = t_min (1e-5) and positions still at height 1 then take their argmax child, as MDLM's
final noise removal does.

Sanity case (tested bit-for-bit under the presets' defaults, time-conditioned): H = 1, K = V
is MDLM (root = [MASK]): same loss on the same batch and seed, same samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ...config import RunConfig
from ...errors import ConfigError
from ...nn.dit import DiT, FinalLayer
from ...sampling.gumbel import adjust_logits
from ...sampling.loop import AncestralLoop, ForwardLog, Step, resolve_plan
from ...schedules import (SAMPLE_T_MIN, discrete_weight, discretize, get_schedule,
                         sample_times, truncate)
from .config import TDLMSampleOptions
from ..base import (Family, LossTerms, Regime, model_device, packed_layout, per_sequence,
                    per_token, register)


def level_windows(H: int, allocation: str = "linear", ratio: float = 2.0) -> torch.Tensor:
    """Window boundaries ``[t_0 = 0, ..., t_H = 1]`` (float64)."""
    if allocation == "linear":
        lengths = torch.ones(H, dtype=torch.float64)
    elif allocation == "exponential":
        lengths = torch.tensor([ratio ** h for h in range(H)], dtype=torch.float64)
    else:
        raise ConfigError(f"unknown window allocation {allocation!r}; allowed: linear, exponential")
    b = torch.cat([torch.zeros(1, dtype=torch.float64), lengths.cumsum(0) / lengths.sum()])
    b[-1] = 1.0
    return b


class TreeLM(nn.Module):
    """DiT over tree-node embeddings + K-way child head.

    ``forward(z, sigma, level) -> logits [B, L, K]``: logit r = "child of rank r of the node at
    this position"; ranks >= n_children(node) are set to -inf. ``level`` [B] selects the head
    slice when heads are per level. Internal-node embedding rows start as the mean of their
    children's rows (bottom-up)."""

    def __init__(self, cfg: RunConfig, tree):
        super().__init__()
        m = cfg.backbone
        self.K, self.H = tree.K, tree.H
        self.per_level = cfg.family.head == "per_level"
        self.backbone = DiT(m, tree.num_nodes)
        self.head = FinalLayer(m.d_model, m.cond_dim, self.K * (self.H if self.per_level else 1))
        bufs = tree.torch_buffers(include_children=False)
        for name in ("n_children", "child_start", "child_list", "height", "rank", "anc"):
            self.register_buffer(name, bufs[name], persistent=False)
        self._init_internal_rows(tree)

    @torch.no_grad()
    def _init_internal_rows(self, tree) -> None:
        W = self.backbone.vocab_embed.weight
        if W.device.type == "meta":
            return
        parent = torch.from_numpy(tree.parent)
        for h in range(1, tree.H + 1):
            nodes = torch.from_numpy(tree.nodes_at_height(h - 1))
            par = parent[nodes]
            sums = torch.zeros_like(W).index_add_(0, par, W[nodes])
            cnt = torch.bincount(par, minlength=W.shape[0]).clamp_min(1).to(W.dtype)
            hn = torch.from_numpy(tree.nodes_at_height(h))
            W[hn] = sums[hn] / cnt[hn, None]

    def child_mask(self, z: torch.Tensor) -> torch.Tensor:
        """[..., K] True where rank r is a valid child of node z."""
        return torch.arange(self.K, device=z.device) < self.n_children[z][..., None]

    def features(self, z, sigma, layout=None):
        h, c = self.backbone(z, sigma, layout=layout)
        return self.head.features(h, c, layout)

    def logits_from_features(self, feats: torch.Tensor, z: torch.Tensor,
                             level: Optional[torch.Tensor]) -> torch.Tensor:
        out = self.head.linear(feats).float()
        if self.per_level:
            out = out.view(*out.shape[:-1], self.H, self.K)
            # level has the shape of out's leading dims ([M] rows or [B, L] positions)
            lv = level[..., None, None].expand(*out.shape[:-2], 1, self.K)
            out = out.gather(-2, lv).squeeze(-2)
        return out.masked_fill(~self.child_mask(z), float("-inf"))

    def forward(self, z, sigma=None, level=None):
        if self.per_level and level is None:
            raise ValueError("per-level heads need the level")
        lv = None if level is None else level[:, None].expand(z.shape)
        return self.logits_from_features(self.features(z, sigma), z, lv)

    def child(self, node: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.child_list[self.child_start[node] + r]


@register("tdlm")
class TreeDiffusion(Family):
    SampleOptions = TDLMSampleOptions
    discrete_time = True
    schedulable = True
    prefix_convention = 2       # session 22: a prefix shown at level h as its height-h ancestors

    def __init__(self, cfg: RunConfig, tree=None, **resources):
        super().__init__(cfg)
        if tree is None:
            raise ConfigError("the tdlm family needs a vocabulary tree (family.tree_source or "
                              "family.tree_path)")
        if tree.V != cfg.backbone.vocab_size:
            raise ConfigError(f"vocabulary tree has V={tree.V} tokens but the model's vocab_size "
                              f"is {cfg.backbone.vocab_size}")
        self.tree = tree
        self.H = tree.H
        d = cfg.family
        self.base_schedule = get_schedule(d.schedule, d.eps)
        self.windows = level_windows(self.H, d.window_allocation, d.window_ratio)
        # alpha(1) of the base schedule; removed so every window ends exactly at the parent
        self.a1 = float(self.base_schedule.alpha(torch.tensor(1.0, dtype=torch.float64)))
        self.anc = torch.from_numpy(tree.anc)
        self.rank = torch.from_numpy(tree.rank)
        self.height = torch.from_numpy(tree.height)
        self.root = tree.root
        lam = torch.ones(self.H, dtype=torch.float64)
        if d.level_weighting == "linear":
            lam = torch.arange(1, self.H + 1, dtype=torch.float64)
        elif d.level_weighting == "exponential":
            lam = d.level_weight_ratio ** torch.arange(self.H, dtype=torch.float64)
        self.level_mult = lam * self.H / lam.sum()     # mean 1

    # ---- schedule inside a level window ----------------------------------------------
    def alpha_local(self, u: torch.Tensor, h) -> torch.Tensor:
        """alpha_h(u) at local time u in [0, 1] of window h (int or a tensor like u): 1 at
        u = 0; at u = 1 exactly 0 for inner windows, eps for the top one (module docstring)."""
        u = torch.as_tensor(u)
        a = self.base_schedule.alpha(u)
        inner = ((a - self.a1) / (1 - self.a1)).clamp(0.0, 1.0)
        top = torch.as_tensor(h, device=u.device) == self.H - 1
        return torch.where(top, a, inner)

    def locate(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t -> (level h, local time u, window length) for t in (0, 1]."""
        w = self.windows.to(t.device)
        h = (torch.searchsorted(w, t.double(), right=False) - 1).clamp(0, self.H - 1)
        lo, hi = w[h], w[h + 1]
        return h, ((t.double() - lo) / (hi - lo)).clamp(0, 1), hi - lo

    def time_input(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Network time input ``h sigma(1) + sigma(u)`` (``NoiseSchedule.time_input``)."""
        return self.base_schedule.time_input(u, level=h)

    def _times(self, B, generator, device, regime: Regime):
        """(level h, local time u, weight) per sequence, float64. t ~ U(0, 1) picks the window
        (visited with probability ``width``); u is mapped to [t_min, 1] inside it, as MDLM maps
        t (continuous time only: a discrete step is drawn uniformly). Weight
        ``w_h = -d alpha_h/dt / (1 - alpha_h) = w(u) / width``; discrete time: n_h
        steps of the window, ``n_h (alpha_s - alpha_t) / (1 - alpha_t) / width``."""
        d = self.cfg.family
        h, u, width = self.locate(sample_times(B, generator, d.antithetic, device))
        if d.num_timesteps > 0:      # a uniform step out of n_h: no truncation needed
            nh = torch.tensor(self.steps_per_level(d.num_timesteps), dtype=torch.float64,
                              device=device)[h]
            u_t, u_s = discretize(u, nh)
            a_t, a_s = self.alpha_local(u_t, h), self.alpha_local(u_s, h)
            return h, u_t, discrete_weight(a_t, a_s, nh) / width
        u = truncate(u, regime.t_min)
        return h, u, self.base_schedule.weight(u) / width

    def steps_per_level(self, steps: int, split: Optional[list] = None) -> list[int]:
        """Sampling/discrete steps per level, index h (finest first). Even by default."""
        if split is not None:
            if len(split) != self.H or sum(split) != steps or min(split) < 1:
                raise ConfigError(f"invalid steps split {split}: need {self.H} positive parts "
                                  f"summing to {steps}")
            return list(split)
        if steps < self.H:
            raise ConfigError(f"steps={steps} is fewer than the tree's {self.H} levels")
        base = [steps // self.H] * self.H
        for i in range(steps - sum(base)):
            base[self.H - 1 - i] += 1
        return base

    # ---- model, resources -------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return TreeLM(self.cfg, self.tree)

    def state_files(self) -> dict:
        return {"tree": lambda folder: self.tree.save(Path(folder) / "tree.safetensors")}

    @classmethod
    def resources_from_checkpoint(cls, ckpt) -> dict:
        from ...vocab_tree import VocabTree
        p = ckpt.extra("tree")
        if p is None:
            raise ConfigError(f"tdlm checkpoint {ckpt.path} carries no vocabulary tree")
        return {"tree": VocabTree.load(p / "tree.safetensors")}

    @classmethod
    def shape_resources(cls, cfg: RunConfig) -> dict:
        """A frequency-sorted tree of the config's K, H: the node count of a k-means tree."""
        from ...vocab_tree import build_frequency_tree
        f = cfg.family
        return {"tree": build_frequency_tree(np.ones(cfg.backbone.vocab_size), f.K, f.H)}

    @classmethod
    def prepare(cls, cfg: RunConfig, data, run_dir) -> dict:
        from .resources import tree_for_run
        return {"tree": tree_for_run(cfg, data, run_dir)}

    # ---- forward process and objective ------------------------------------------------
    def corrupt(self, x0: torch.Tensor, h: torch.Tensor, u: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """z_t: a_h(x) with probability alpha_h(t), else a_{h+1}(x). Returns (z, moved).
        h, u: one per sequence [B] for dense x0 [B, L], one per token [T] for packed x0 [T]."""
        anc = self.anc.to(x0.device)
        extra = (1,) * (x0.dim() - h.dim())
        hh = h.reshape(h.shape + extra)
        a_lo = anc[hh, x0]
        a_hi = anc[hh + 1, x0]
        p_move = (1 - self.alpha_local(u.double(), h)).reshape(h.shape + extra)
        rnd = torch.rand(x0.shape, generator=generator, device=x0.device)
        moved = rnd < p_move
        return torch.where(moved, a_hi, a_lo), moved

    def objective(self, model, batch, generator, regime: Regime) -> LossTerms:
        """Dense batches [B, L], or ragged ones (``varlen``: T tokens of B sequences packed
        without padding, ``cu_seqlens``) with h, u, w per sequence."""
        x0 = batch["input_ids"]
        lay = packed_layout(batch)
        valid = self.counted(batch, regime)
        B = x0.shape[0] if lay is None else lay.B
        h, u, w = self._times(B, generator, x0.device, regime)
        ht = per_token(h, lay)
        z, moved = self.corrupt(x0, ht, per_token(u, lay), generator)
        sigma = self.time_input(h, u)
        feats = (model.features(z, sigma) if lay is None else
                 model.features(z, sigma, layout=lay))
        ht = ht if lay is not None else ht[:, None]
        target = self.rank.to(x0.device)[self.anc.to(x0.device)[ht, x0]]
        return self.loss_from_features(model, feats, z, moved, target, h, w, valid, regime, lay)

    def loss_from_features(self, model, feats, z, moved, target, h, w, valid,
                           regime: Regime, layout=None) -> LossTerms:
        """Cross-entropy over the children only at moved, counted positions (the head is
        applied to those rows alone), weighted per sequence. The per-sequence sum runs over
        an [B, L] tensor as MDLM's does, so one level reproduces MDLM's loss bit for bit."""
        scored = moved & valid
        bidx = (torch.arange(z.shape[0], device=z.device)[:, None].expand_as(z)[scored]
                if layout is None else layout.seq_id[scored])
        logits = model.logits_from_features(feats[scored], z[scored], h[bidx])
        ce = -torch.log_softmax(logits, -1).gather(-1, target[scored][:, None]).squeeze(-1)
        ce_full = torch.zeros(z.shape, device=z.device, dtype=torch.float32)
        ce_full[scored] = ce.float()
        per_seq = per_sequence(ce_full, layout)
        w = w.clone()
        if not regime.exact_weights:
            d = self.cfg.family
            w = w * self.level_mult.to(w.device)[h]
            if d.train_weight_clip > 0:
                w = w.clamp_max(d.train_weight_clip)
        nll = w.float() * per_seq
        parts = {f"level_{lv}": torch.where(h == lv, nll, torch.zeros_like(nll))
                 for lv in range(self.H)}
        return LossTerms(nll=nll, n_tokens=per_sequence(valid.float(), layout), parts=parts)

    # ---- declarations (families.base) ---------------------------------------------------
    def state_labels(self, ids, counts=None, decode=None, top: int = 3) -> dict:
        """Every tree node among ``ids`` (height >= 1) as its ``top`` most frequent member
        tokens (``counts`` [V]: token occurrences, e.g. in the training data; without them
        the lowest ids come first), decoded one by one with ``decode``: ``{node: {"label",
        "kind": "node" (the root: "root"), "height", "size" (tokens below), "members"}}``."""
        t = self.tree
        nodes = sorted({int(i) for i in ids if int(i) >= t.V})
        if not nodes:
            return {}
        c = np.zeros(t.V) if counts is None else np.asarray(counts, dtype=np.float64)[:t.V]
        order = np.lexsort((np.arange(t.V), -c))          # most frequent first, ties by id
        sizes = t.subtree_sizes()
        out = {}
        for h in sorted({int(t.height[n]) for n in nodes}):
            anc = np.asarray(t.anc[h])[order]             # height-h ancestors, by frequency
            for n in (n for n in nodes if int(t.height[n]) == h):
                members = [int(m) for m in order[anc == n][:top]]
                words = [decode([m]) if decode is not None else str(m) for m in members]
                out[n] = {"label": "|".join(w.strip() or w for w in words),
                          "kind": "root" if n == t.root else "node",
                          "height": h, "size": int(sizes[n]), "members": words}
        return out

    def describe(self) -> dict:
        return {"tree_K": self.tree.K, "tree_H": self.tree.H, "tree_nodes": self.tree.num_nodes}

    def process_signature(self) -> dict:
        t = self.tree
        d = self.cfg.family
        return {"tree": (t.K, t.H, t.num_nodes, np.asarray(t.anc).tobytes(),
                         np.asarray(t.rank).tobytes()),
                "window_allocation": d.window_allocation, "window_ratio": d.window_ratio}

    def phases(self, steps: int, split=None):
        return self.level_steps_root_to_leaf(steps, split)

    def noised_predictions(self, x0, valid, t: float, generator):
        """Positions moved to their parent at level h(t) in one z ~ q(z_t | x0); classes:
        the children (target: the child on x's path)."""
        tv = torch.full((x0.shape[0],), t, dtype=torch.float64, device=x0.device)
        h, u, _ = self.locate(tv)
        z, moved = self.corrupt(x0, h, u, generator)
        sigma = self.time_input(h, u)
        noised = moved & valid
        target = self.rank.to(x0.device)[self.anc.to(x0.device)[h[:, None], x0]]

        def run(model):
            logits = model(z, sigma, h)
            return torch.log_softmax(logits[noised].double(), -1), target[noised]
        return run, int(noised.sum())

    # ---- sampler ----------------------------------------------------------------------
    def sample_steps(self, steps: int, steps_split: Optional[list] = None,
                     t_min: float = SAMPLE_T_MIN) -> list[Step]:
        """The reverse steps, coarse to fine: level h = H-1 .. 0 takes ``n_h`` steps on the
        local grid ``u_j = linspace(1, end_h, n_h + 1)`` (``end_h`` = 0 for inner windows,
        ``t_min`` for the finest, as MDLM's grid), step j moving a height-(h+1) position
        with ``p_move = (alpha_h(u_{j+1}) - alpha_h(u_j)) / (1 - alpha_h(u_j))``; ``phase = h``.
        The steps of a level are contiguous (a schedule can give a model whole levels)."""
        n = self.steps_per_level(steps, steps_split)
        out = []
        for lv in range(self.H - 1, -1, -1):
            us = torch.linspace(1.0, t_min if lv == 0 else 0.0, n[lv] + 1, dtype=torch.float64)
            for j in range(n[lv]):
                a_t = float(self.alpha_local(us[j], lv))
                a_s = float(self.alpha_local(us[j + 1], lv))
                out.append(Step(float(us[j]), (a_s - a_t) / (1 - a_t), lv))
        return out

    def level_steps_root_to_leaf(self, steps: int, steps_split: Optional[list] = None) -> list[int]:
        """Steps per level in sampling order (root level first)."""
        return self.steps_per_level(steps, steps_split)[::-1]

    @torch.no_grad()
    def run_sampler(self, model, num, seq_len, steps, generator, temperature=1.0, top_p=1.0,
               steps_split: Optional[list] = None, cache: bool = True,
               prefix: Optional[torch.Tensor] = None, models: Optional[dict] = None,
               plan: Optional[list] = None, time_conditioned: Optional[dict] = None,
               log: Optional[ForwardLog] = None, on_forward=None,
               t_min: float = SAMPLE_T_MIN, noise_removal: bool = True,
               trajectory: Optional[list] = None, memo=None) -> torch.Tensor:
        """Coarse-to-fine ancestral sampling from all-root; returns token ids [num, seq_len].
        ``prefix`` clamps the first tokens (leaves never move; at level h the model is shown
        their height-h ancestors, as training shows revealed positions). ``models``/``plan``/
        ``time_conditioned``/``log``: model scheduling and call counting as in MDLM's sampler
        (shared ``AncestralLoop``); a level change always makes a new prediction. The finest
        window ends at ``t_min``; with ``noise_removal`` the positions still at height 1 then
        take their argmax child (the last step's model), as in MDLM. ``trajectory`` (a list)
        receives z (tree node ids; ``phase`` = the level being denoised) after every step
        and after the noise removal; the samples do not depend on it. ``memo``: shared plan
        prefixes, as in MDLM's sampler."""
        device = model_device(model)
        z = torch.full((num, seq_len), self.root, dtype=torch.long, device=device)
        k = 0 if prefix is None else prefix.shape[1]
        if k:
            z[:, :k] = prefix.to(device)
            # what the model is shown of the prefix at level h: its height-h ancestors, as a
            # training row at level h shows every revealed position (never a leaf above h)
            shown = self.anc.to(device)[:, prefix.to(device)]          # [H, num, k]
        height = self.height.to(device)
        models, plan, reuse = resolve_plan(model, steps, models, plan, time_conditioned, cache,
                                           self.cfg.backbone.time_conditioning)

        def predict(m, zz, st):
            if k:
                zz = zz.clone()
                zz[:, :k] = shown[st.phase]
            hv = torch.full((num,), st.phase, device=device)
            sigma = self.time_input(hv, torch.full((num,), st.t, device=device,
                                                   dtype=torch.float64))
            return adjust_logits(m(zz, sigma, hv).double(), temperature, top_p)

        def apply(m, zz, move, choice):
            zz = zz.clone()
            zz[move] = m.child(zz[move], choice)
            return zz

        grid = self.sample_steps(steps, steps_split, t_min)
        loop = AncestralLoop(models, list(plan) + [plan[-1]], reuse, predict, log, on_forward,
                             trajectory, memo)
        z = loop.run(z, grid, lambda zz, st: height[zz] == st.phase + 1, apply, generator)
        last = height[z] == 1
        if noise_removal and last.any():
            logp = loop.prediction(len(grid), Step(t_min, 1.0, 0), z)
            z = z.clone()
            z[last] = models[plan[-1]].child(z[last], logp[last].argmax(-1))
            loop.record(len(grid), Step(t_min, 1.0, 0), z, noise_removal=True)
        return z
