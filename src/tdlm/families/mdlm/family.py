"""MDLM: absorbing ("masking") diffusion with the SUBS parameterisation (Sahoo et al. 2024).

Forward process (``corrupt``): each token independently becomes [MASK] with probability
``1 - alpha_t``:  q(z_t,i | x_i) = alpha_t * onehot(x_i) + (1 - alpha_t) * onehot(MASK).

SUBS (``subs_log_probs``): the [MASK] logit is -inf and unmasked positions copy their token
(carry-over), so only masked positions carry loss.

Continuous-time NELBO (``loss``), per sequence:
    L(x) = E_{t ~ U(0,1)} [ w(t) * sum_i 1{z_t,i = MASK} * (-log p_theta(x_i | z_t)) ],
    w(t) = -alpha'_t / (1 - alpha_t)   (= 1/t for the log-linear schedule),
with antithetic t over the batch, drawn in [t_min, 1] (``family.train_t_min`` /
``eval_t_min``, MDLM's 1e-3; ``tdlm.schedules``). Discrete time with T steps (t_i = i/T):
    L_T(x) = T * E_{i ~ U{1..T}} [ (alpha_{s} - alpha_{t}) / (1 - alpha_{t}) * sum_i 1{masked} CE_i ],
    s = (i-1)/T, which is a valid bound for any T and tends to L(x) as T grows (weights in
float64). The sum runs over real tokens only: padding (``batch["valid"]`` False) is noised like
any position but never counted, in the numerator or in ``n_tokens`` (MDLM's
``nlls * attention_mask``); training may count it with ``family.train_on_padding`` (GIDD).
The prior term KL(q(z_1|x) || all-mask) is omitted as in MDLM (alpha_1 = eps is tiny).

Ancestral sampler (``sample``): on the grid linspace(1, t_min, T+1), from t to s every
masked position is unmasked with probability ``(alpha_s - alpha_t) / (1 - alpha_t)`` and its
token drawn from p_theta(x | z_t) (float64 Gumbel, temperature, top-p); unmasked positions
never change. If nothing changed and the model ignores t, the prediction is reused (cache).
The last step's remaining masks are filled with the argmax ("noise removal"). The loop itself
(per-step model choice for model scheduling, caching, forward-call log) is the shared
``tdlm.sampling.loop.AncestralLoop``.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import RunConfig
from ...errors import ConfigError
from ...nn.chunked_ce import linear_cross_entropy
from ...nn.dit import DiT, FinalLayer
from ...sampling.gumbel import adjust_logits
from ...sampling.loop import AncestralLoop, ForwardLog, Step, reverse_step, resolve_plan
from ...schedules import (SAMPLE_T_MIN, discrete_weight, discretize, get_schedule,
                         sample_times, truncate)
from .config import MDLMSampleOptions
from .convert import SOURCES, convert_published, detect
from ..base import (Family, LossTerms, Regime, model_device, packed_layout, per_sequence,
                    per_token, register)


class MaskedLM(nn.Module):
    """DiT + output layer. ``forward(z, sigma) -> logits [B, L, V]`` (raw) over the V tokens.

    The output layer holds V+1 rows as the reference DiT does (same parameters, 169.6M for
    mdlm-small), but the [MASK] row is never computed: under SUBS its probability is 0, so its
    logit would only be overwritten with -inf. Computing V outputs also makes a one-level TDLM
    (K = V head) the same matrix product as MDLM, bit for bit."""

    def __init__(self, cfg: RunConfig):
        super().__init__()
        m = cfg.backbone
        self.vocab_size = m.vocab_size
        self.mask_id = m.vocab_size
        self.head_out = m.vocab_size          # outputs computed (tdlm.flops)
        self.backbone = DiT(m, m.vocab_size + 1)
        self.head = FinalLayer(m.d_model, m.cond_dim, m.vocab_size + 1)

    def features(self, z: torch.Tensor, sigma: Optional[torch.Tensor] = None,
                 layout=None) -> torch.Tensor:
        """The output layer's input (final adaLN norm of the DiT's hidden states)."""
        h, c = self.backbone(z, sigma, layout=layout)
        return self.head.features(h, c, layout)

    def output_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [V, d], bias [V]) of the V token outputs (the [MASK] row left out)."""
        lin, V = self.head.linear, self.vocab_size
        return lin.weight[:V], lin.bias[:V]

    def forward(self, z: torch.Tensor, sigma: Optional[torch.Tensor] = None,
                layout=None) -> torch.Tensor:
        return F.linear(self.features(z, sigma, layout), *self.output_weights())


class RowPrediction:
    """``log p_theta(x | z_t)`` computed only for the rows a step asks for: holds the network's
    output-layer input (features [num, L, d], with ``head`` the output layer) or its logits
    (``head`` the identity), and turns ``pred[rows]`` into float64 log-probabilities
    (temperature, top-p) of those rows alone. A reverse step reads only the positions that
    move (a few per step out of num x L), so neither the output layer (d x V, a fifth of a
    forward at d=112, V=8k) nor the float64 log-softmax over V runs for every position at
    every forward, and a cached prediction is d wide, not V. Row-wise, the values equal the
    all-rows computation's; ``argmax`` (noise removal) is taken on the logits, which orders
    the classes as the log-probabilities do (temperature > 0, the top class always kept by
    top-p)."""

    def __init__(self, source: torch.Tensor, fn: Callable,
                 head: Callable = lambda x: x):
        self.source, self.fn, self.head = source, fn, head

    def __getitem__(self, rows) -> torch.Tensor:
        return self.fn(self.head(self.source[rows]))

    def argmax(self, dim: int = -1) -> torch.Tensor:
        return self.head(self.source).argmax(dim)


def subs_log_probs(logits: torch.Tensor, z: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: log-softmax over the V tokens ([MASK] gets probability 0; a [MASK] column of
    ``logits``, if the network emits one, is dropped); unmasked rows become one-hot at z
    (log 1 = 0 at z, -inf elsewhere). Returns [..., V]. Written as the reference code does
    (full V-sized float32 tensors), which is what the memory benchmark compares against."""
    logp = torch.log_softmax(logits[..., :mask_id].float(), dim=-1)
    unmasked = z != mask_id
    carry = torch.full_like(logp, float("-inf"))
    carry.scatter_(-1, z.clamp_max(mask_id - 1)[..., None], 0.0)
    return torch.where(unmasked[..., None], carry, logp)


@register("mdlm")
class MaskedDiffusion(Family):
    SampleOptions = MDLMSampleOptions
    discrete_time = True
    schedulable = True
    # the MDLM and DUO papers' published DiT checkpoints (tdlm.families.mdlm.convert)
    importers = {src: partial(convert_published, source=src) for src in SOURCES}
    detect_import = staticmethod(detect)

    def __init__(self, cfg: RunConfig, **resources):
        super().__init__(cfg)
        self.schedule = get_schedule(cfg.family.schedule, cfg.family.eps)
        self.mask_id = cfg.backbone.vocab_size

    def build_model(self) -> nn.Module:
        return MaskedLM(self.cfg)

    # ---- forward process ---------------------------------------------------------------
    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """z_t: each token -> [MASK] independently with probability 1 - alpha_t (t float64:
        one per sequence [B] for dense x0 [B, L], or one per token [T] for packed x0 [T])."""
        p_move = 1 - self.schedule.alpha(t.double())
        p_move = p_move.reshape(p_move.shape + (1,) * (x0.dim() - p_move.dim()))
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        return torch.where(u < p_move, torch.full_like(x0, self.mask_id), x0)

    def _times(self, B: int, generator, device, regime: Regime):
        """Returns (t, weight) per sequence (float64) for the continuous or discrete-time NELBO."""
        d = self.cfg.family
        t = sample_times(B, generator, d.antithetic, device)
        if d.num_timesteps > 0:      # a uniform step out of T: no truncation needed
            t, s = discretize(t, d.num_timesteps)
            return t, discrete_weight(self.schedule.alpha(t), self.schedule.alpha(s),
                                      d.num_timesteps)
        t = truncate(t, regime.t_min)
        return t, self.schedule.weight(t)

    # ---- objective ---------------------------------------------------------------------
    def objective(self, model, batch, generator, regime: Regime) -> LossTerms:
        """Dense batches [B, L], or ragged ones (``varlen``: T tokens of B sequences packed
        without padding, ``cu_seqlens``) with t, w per sequence and no padding computed."""
        x0 = batch["input_ids"]
        lay = packed_layout(batch)
        valid = self.counted(batch, regime)
        t, w = self._times(x0.shape[0] if lay is None else lay.B, generator, x0.device, regime)
        z = self.corrupt(x0, per_token(t, lay), generator)
        if self.cfg.family.keep_first:
            # conditioned on position 0 (BOS), as DID is: never masked, not counted
            first = (slice(None), 0) if lay is None else lay.cu_seqlens[:-1]
            z[first] = x0[first]
            valid = valid.clone()
            valid[first] = False
        sigma = self.schedule.time_input(t)
        # the lean heads need the output layer apart (MaskedLM.features / output_weights); a
        # model that only returns logits (e.g. an exact oracle) is scored by the reference head
        if self.cfg.family.head_impl != "reference" and hasattr(model, "output_weights"):
            feats = model.features(z, sigma) if lay is None else model.features(z, sigma, layout=lay)
            return self.loss_from_features(model, feats, x0, z, w, valid, lay)
        logits = model(z, sigma) if lay is None else model(z, sigma, layout=lay)
        return self.loss_from_logits(logits, x0, z, w, valid, lay)

    def loss_from_logits(self, logits, x0, z, w, valid, layout=None) -> LossTerms:
        """Weighted masked cross-entropy over the counted (``valid``) positions."""
        logp = subs_log_probs(logits, z, self.mask_id)
        ce = -logp.gather(-1, x0[..., None]).squeeze(-1)
        scored = (z == self.mask_id) & valid
        ce = torch.where(scored, ce, torch.zeros_like(ce))
        nll = w.float() * per_sequence(ce, layout)
        return LossTerms(nll=nll, n_tokens=per_sequence(valid.float(), layout), parts={})

    def loss_from_features(self, model, feats, x0, z, w, valid, layout=None) -> LossTerms:
        """``loss_from_logits`` without the [B, L, V] tensors (``family.head_impl`` =
        ``masked`` or ``chunked``): SUBS gives unmasked positions probability 1 on their own
        token (carry-over) and so zero loss and zero gradient, and the [MASK] class
        probability 0 (its output is never computed), so only the M counted masked positions
        reach the output layer: ``CE_i = logsumexp_v(W h_i + b)_v - (W h_i + b)_{x_i}``.
        ``masked``: one [M, V] product and PyTorch's fused cross-entropy (fp32 logits);
        ``chunked``: ``tdlm.nn.chunked_ce``, ``head_chunk`` rows at a time, logits recomputed
        in backward. Same loss and gradients as the reference path up to float summation
        order (tests/families/test_mdlm_chunked_head.py)."""
        scored = (z == self.mask_id) & valid
        weight, bias = model.output_weights()
        if self.cfg.family.head_impl == "chunked":
            ce = linear_cross_entropy(feats[scored], weight, bias, x0[scored],
                                      self.cfg.family.head_chunk)
        else:
            logits = F.linear(feats[scored], weight, bias)
            acc = torch.promote_types(logits.dtype, torch.float32)   # fp32 under bf16
            ce = F.cross_entropy(logits.to(acc), x0[scored], reduction="none")
        ce_full = torch.zeros(z.shape, dtype=ce.dtype, device=z.device)
        ce_full[scored] = ce
        nll = w.to(ce.dtype) * per_sequence(ce_full, layout)
        return LossTerms(nll=nll, n_tokens=per_sequence(valid.float(), layout), parts={})

    def noised_predictions(self, x0, valid, t: float, generator):
        """Masked positions of one z ~ q(z_t | x0); classes: the V tokens."""
        tv = torch.full((x0.shape[0],), t, dtype=torch.float64, device=x0.device)
        z = self.corrupt(x0, tv, generator)
        sigma = self.schedule.time_input(tv)
        noised = (z == self.mask_id) & valid

        def run(model):
            logits = model(z, sigma)[..., :self.mask_id]
            return torch.log_softmax(logits[noised].double(), -1), x0[noised]
        return run, int(noised.sum())

    # ---- sampler -----------------------------------------------------------------------
    def state_labels(self, ids, counts=None, decode=None, top: int = 3) -> dict:
        """[MASK] (``mask_id``), the only state of a trajectory that is not a token."""
        return {self.mask_id: {"label": "[MASK]", "kind": "mask"}} if self.mask_id in ids else {}

    def sample_steps(self, steps: int, t_min: float = SAMPLE_T_MIN) -> list[Step]:
        """The reverse steps on ``linspace(1, t_min, T+1)``: step k goes from t_k to t_{k+1}
        with ``p_move = (alpha(t_{k+1}) - alpha(t_k)) / (1 - alpha(t_k))``."""
        ts = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)
        out = []
        for k in range(steps):
            t, s = ts[k], ts[k + 1]
            a_t = float(self.schedule.alpha(t))
            a_s = float(self.schedule.alpha(s))
            out.append(Step(float(t), (a_s - a_t) / (1 - a_t)))
        return out

    @torch.no_grad()
    def run_sampler(self, model, num, seq_len, steps, generator, temperature=1.0, top_p=1.0,
               t_min: float = SAMPLE_T_MIN, cache: bool = True, noise_removal: bool = True,
               prefix: Optional[torch.Tensor] = None, bos_id: Optional[int] = None,
               models: Optional[dict] = None, plan: Optional[list] = None,
               time_conditioned: Optional[dict] = None, log: Optional[ForwardLog] = None,
               on_forward: Optional[Callable] = None,
               trajectory: Optional[list] = None, memo=None) -> torch.Tensor:
        """Ancestral sampling from all-[MASK]. ``prefix`` [num, k] clamps the first k tokens.
        A ``keep_first`` model (trained with position 0 always its BOS, never masked) samples
        from [BOS] + [MASK]^(L-1): ``bos_id`` (the pipeline gives the tokenizer's) is held at
        position 0 unless ``prefix`` sets it; its prediction there was never trained.

        Model scheduling: ``models`` (name -> module) and ``plan`` (a name per step; the final
        noise-removal pass uses the last step's model) choose the predicting model per step;
        ``time_conditioned`` (name -> bool, default this config's) decides per model whether
        its prediction may be cached while nothing changes. ``log`` records the forward calls
        made; ``on_forward(step)`` is called for every forward pass actually made.
        ``trajectory`` (a list) receives z after every step ([MASK] = ``mask_id``) and after
        the noise removal (``AncestralLoop.record``); the samples do not depend on it.
        ``memo`` (a ``PrefixMemo``): runs with a common plan prefix share it (segment search)."""
        device = model_device(model)
        z = torch.full((num, seq_len), self.mask_id, dtype=torch.long, device=device)
        if self.cfg.family.keep_first and (prefix is None or prefix.shape[1] == 0):
            if bos_id is None:
                raise ConfigError("this MDLM model was trained with family.keep_first (position "
                                  "0 always BOS): sampling needs bos_id (its tokenizer has none)")
            z[:, 0] = int(bos_id)
        if prefix is not None:
            z[:, :prefix.shape[1]] = prefix.to(device)
        models, plan, reuse = resolve_plan(model, steps, models, plan, time_conditioned, cache,
                                           self.cfg.backbone.time_conditioning)
        t_last = float(torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)[-1])

        def predict(m, zz, st):
            sigma = self.schedule.time_input(torch.full((num,), st.t, device=device,
                                                        dtype=torch.float64))
            if not hasattr(m, "output_weights"):         # any module returning logits
                return RowPrediction(m(zz, sigma)[..., :self.mask_id], log_probs)
            return RowPrediction(m.features(zz, sigma), log_probs,
                                 lambda f: F.linear(f, *m.output_weights()))

        def log_probs(rows):
            return adjust_logits(rows.double(), temperature, top_p)

        def apply(m, zz, move, choice):
            zz = zz.clone()
            zz[move] = choice
            return zz

        loop = AncestralLoop(models, list(plan) + [plan[-1]], reuse, predict, log, on_forward,
                             trajectory, memo)
        z = loop.run(z, self.sample_steps(steps, t_min), lambda zz, st: zz == self.mask_id,
                     apply, generator)
        if noise_removal and (z == self.mask_id).any():
            logp = loop.prediction(steps, Step(t_last, 1.0), z)
            z = torch.where(z == self.mask_id, logp.argmax(-1), z)
            loop.record(steps, Step(t_last, 1.0), z, noise_removal=True)
        return z

    def _prediction(self, logits, temperature, top_p):
        """log p_theta(x | z_t) over the V tokens ([MASK] is the last class and dropped)."""
        return adjust_logits(logits[..., :self.mask_id].double(), temperature, top_p)

    def step(self, z: torch.Tensor, logp: torch.Tensor, p_move: float,
             generator: torch.Generator) -> torch.Tensor:
        """One reverse step t -> s: masked positions move with probability p_move to a token
        drawn from ``logp`` (shared ``reverse_step``: float64 Gumbel, moving rows only)."""
        move, choice = reverse_step(z == self.mask_id, logp, p_move, generator)
        if move.any():
            z = z.clone()
            z[move] = choice
        return z
