"""DID: deletion-insertion diffusion (Ding et al., ICLR 2026; spec shared/spec/DID.md).

Forward process (§2): x0 = BOS a_1..a_m; every non-BOS token survives to time t
independently with probability alpha_t, so xt = BOS b_1..b_n with
    q_t(xt | x0) = N(xt, x0) alpha_t^n (1 - alpha_t)^(m - n),
N(b, a) = number of index sets at which b occurs as a subsequence of a (``tdlm.did.dp``).

Reverse process (§3): gap g in 0..n sits right after token g of xt (g = 0: after BOS), so the
network's output row g lives on token g and the output has the shape of an LM head on the
packed xt. The insertion score s[g, v] estimates the posterior mean of
    rho[g, v] = N(Ins(xt, g, v), x0) / N(xt, x0)   (expected number of deleted v's in gap g),
and action (g, v) has reverse rate w(t) s[g, v], w(t) = -alpha'_t / (1 - alpha_t).
Head: s[g, v] = exp(l_g) softmax_v(W h_g), with a scalar l_g from a linear d -> 1 (``u_g``):
  * variable length (DISE, time-conditioned):  l_g = min(u_g, log L_max);
  * fixed length (DICE, no time input):  l_g = log(m - n) + log_softmax over the gaps of the
    same sequence of u_g, so sum_g exp(l_g) = m - n, the number of deletions.

Objective (§4, DISE, per x0):  L = E_t E_xt [ w(t) sum_g DISE_g ] with
    DISE_g = [e^{l_g} - r_g l_g + r_g log r_g - r_g]  +  r_g KL(rho[g,.]/r_g || p(.|g)),
r_g = sum_v rho[g, v]. The first bracket is the "rate" part (a Poisson term), the second the
"token" part (a soft-target cross-entropy); both are logged. With the fixed-length head,
sum_g e^{l_g} = sum_g r_g and DISE equals DICE = w sum rho (log rho - log s).
DISE >= -log p(x0) (-log p(x0 | m) for fixed length); evaluation uses exact weights.

Sampler (§6): from [BOS], on the grid t_k = linspace(1, t_min, T+1), step t -> s inserts in
every allowed gap independently with probability min(1, r e^{l_g}),
r = (alpha_s - alpha_t) / (1 - alpha_t) (r = 1 on the last step), a token drawn from p(.|g)
(temperature, top-p, float64 Gumbel); at most one insertion per gap per step. Fixed length:
outputs of unchanged sequences are reused (the model is time-independent), extra r = 1 steps
complete every sequence to exactly L. Variable length: the model is called every step and
lengths are capped at L_max. The insertion decisions need only the rates l_g, so a step
forwards the network to its final features f_g and l_g, and the output layer (d x V) runs on
the gaps that insert alone (about L rows over a whole sample instead of every gap at every
step); the cache holds f (d wide), not the logits (V wide).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ...config import RunConfig
from ...errors import ConfigError
from ...nn.dit import DiT, FinalLayer, Packing
from ...sampling.gumbel import adjust_logits, gumbel_argmax
from ...schedules import SAMPLE_T_MIN, get_schedule, sample_times, truncate
from .config import DIDSampleOptions
from ..base import Family, LossTerms, Regime, model_device, register


class InsertionLM(nn.Module):
    """DiT on packed ragged xt + insertion-score head.

    ``forward(tokens [T], packing, sigma [B] | None, rows [R] | None) -> (u [T], logits)``:
    ``u_g`` is the raw log-rate of gap g (linear d -> 1 on the final adaLN features) and
    ``logits`` the token distribution p(.|g) (the MDLM output linear without the [MASK] row),
    [T, V], or [R, V] for the gap rows ``rows`` only (the loss needs the rows with targets)."""

    def __init__(self, cfg: RunConfig):
        super().__init__()
        m = cfg.backbone
        self.vocab_size = m.vocab_size
        self.backbone = DiT(m, m.vocab_size)
        self.head = FinalLayer(m.d_model, m.cond_dim, m.vocab_size)
        self.rate = nn.Linear(m.d_model, 1)
        nn.init.zeros_(self.rate.weight)
        nn.init.zeros_(self.rate.bias)

    def features(self, tokens: torch.Tensor, packing: Packing,
                 sigma: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u [T], f [T, d])``: the raw log-rates and the output layer's input (the final
        adaLN features); ``token_logits(f[rows])`` gives those rows' logits."""
        h, c = self.backbone(tokens, sigma, packing=packing)
        f = self.head.features(h, c, packing)
        return self.rate(f).squeeze(-1).float(), f

    def token_logits(self, f: torch.Tensor) -> torch.Tensor:
        """p(.|g)'s logits [R, V] from features [R, d] (the output layer alone)."""
        return self.head.linear(f)

    def forward(self, tokens: torch.Tensor, packing: Packing,
                sigma: Optional[torch.Tensor] = None,
                rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        u, f = self.features(tokens, packing, sigma)
        return u, self.token_logits(f if rows is None else f[rows])


def segment_logsumexp(x: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """logsumexp of ``x`` [T] within segments ``seg`` [T] -> [n_seg] (-inf for empty ones)."""
    mx = torch.full((n_seg,), float("-inf"), dtype=x.dtype, device=x.device)
    mx = mx.scatter_reduce(0, seg, x, reduce="amax", include_self=True)
    safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s = torch.zeros(n_seg, dtype=x.dtype, device=x.device).index_add_(0, seg, (x - safe[seg]).exp())
    return s.log() + safe


def log_rates(u: torch.Tensor, packing: Packing, mode: str, deletions: Optional[torch.Tensor],
              max_len: int) -> torch.Tensor:
    """l_g from the raw u_g. ``deletions`` [B] = m - n (fixed length only)."""
    if mode == "variable":
        return u.clamp_max(math.log(max_len))
    lse = segment_logsumexp(u, packing.seq_id, packing.B)
    d = deletions.to(u.dtype)[packing.seq_id]
    l = d.log() + u - lse[packing.seq_id]
    return torch.where(d > 0, l, torch.full_like(l, float("-inf")))   # nothing deleted: rate 0


def xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * x.clamp_min(torch.finfo(x.dtype).tiny).log(), torch.zeros_like(x))


def dise_parts(l: torch.Tensor, logits: torch.Tensor, row: torch.Tensor, token: torch.Tensor,
               rho: torch.Tensor, packing: Packing,
               logit_row: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums over gaps of the DISE rate and token parts (§4).

    ``l`` [T], ``logits`` [T, V] on the packed xt; targets as sparse triples (row = packed
    gap row, token, rho). rate_g = e^{l_g} - r_g l_g + r_g log r_g - r_g (>= 0);
    token_g = sum_v rho log rho - r_g log r_g - sum_v rho log p(v|g) = r_g KL (>= 0).
    The V-wide work is one logsumexp per row and a gather at the K targets. ``logit_row``
    [K]: the targets' rows in ``logits`` when it holds only some gap rows ([R, V], e.g. the
    rows with targets: the token part of a row without targets is 0, so the result is the
    same)."""
    T = l.shape[0]
    dt = torch.promote_types(l.dtype, torch.float32)      # float32, or float64 in exact checks
    l, rho = l.to(dt), rho.to(dt)
    r = torch.zeros(T, dtype=dt, device=l.device).index_add_(0, row, rho)
    rl = torch.where(r > 0, r * l, torch.zeros_like(r))          # r = 0 and l = -inf -> 0
    rate_g = l.exp() - rl + xlogx(r) - r
    lrow = row if logit_row is None else logit_row
    lse = torch.logsumexp(logits.to(dt), dim=-1)                    # [T] or [R]
    logp_t = logits[lrow, token].to(dt) - lse[lrow]                  # [K]
    tok_k = xlogx(rho) - rho * logp_t
    tok_g = torch.zeros(T, dtype=dt, device=l.device).index_add_(0, row, tok_k) - xlogx(r)
    B = packing.B
    rate = torch.zeros(B, dtype=dt, device=l.device).index_add_(0, packing.seq_id, rate_g)
    tok = torch.zeros(B, dtype=dt, device=l.device).index_add_(0, packing.seq_id, tok_g)
    return rate, tok


def pack(full: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, Packing]:
    """Rows ``full[b, :lengths[b]]`` of a right-padded [B, L] tensor -> flat [T] + Packing."""
    keep = torch.arange(full.shape[1], device=full.device)[None, :] < lengths[:, None]
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=full.device)
    cu[1:] = lengths.cumsum(0)
    return full[keep], Packing(cu)


def unpack(flat: torch.Tensor, packing: Packing, fill: int = 0) -> torch.Tensor:
    """Inverse of ``pack``: flat [T] -> right-padded [B, max_len]."""
    out = flat.new_full((packing.B * packing.max_len,), fill)
    out[packing.pad_index] = flat
    return out.view(packing.B, packing.max_len)


@register("did")
class DeletionInsertion(Family):
    SampleOptions = DIDSampleOptions
    """Deletion-insertion diffusion (fixed or variable length; ``family.length``)."""
    variable_length = True
    layouts = ("packed_bos", "varlen")

    def describe(self) -> dict:
        return {"did_length": self.mode}

    def __init__(self, cfg: RunConfig, **resources):
        super().__init__(cfg)
        d = cfg.family
        self.schedule = get_schedule(d.schedule, d.eps)
        self.mode = cfg.family.length
        self.max_len = cfg.backbone.max_seq_len

    def build_model(self) -> nn.Module:
        return InsertionLM(self.cfg)

    # ---- data -> (x0 body, lengths) ----------------------------------------------------
    @staticmethod
    def split_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bos [B], body [B, M] right-padded, m [B]) from a dense (``input_ids`` [B, L] with
        BOS at position 0, ``valid``) or a ragged (``input_ids`` [T], ``cu_seqlens``) batch."""
        ids = batch["input_ids"]
        if "cu_seqlens" in batch:
            pk = Packing(batch["cu_seqlens"].to(ids.device))
            full = unpack(ids, pk)
            lengths = pk.lengths
        else:
            full = ids
            valid = batch.get("valid")
            lengths = (valid.sum(1) if valid is not None
                       else torch.full((ids.shape[0],), ids.shape[1], device=ids.device))
        return full[:, 0], full[:, 1:], (lengths - 1).clamp_min(0)

    def sigma_of(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        return self.schedule.time_input(t) if self.mode == "variable" else None

    # ---- objective ---------------------------------------------------------------------
    def terms(self, model: nn.Module, bos: torch.Tensor, x0: torch.Tensor, m: torch.Tensor,
              xt: torch.Tensor, n: torch.Tensor, t: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence (rate, token) sums of DISE_g for given x0 (body) and xt (body) at t:
        the score network on packed BOS+xt against the DP's exact targets. No weight."""
        from .dp import insertion_targets
        B = x0.shape[0]
        full = torch.cat([bos[:, None], xt], dim=1)
        tokens, pk = pack(full, n + 1)
        tg = insertion_targets(x0, m, xt, n, dtype=dtype)
        row = pk.cu_seqlens[tg.seq] + tg.gap
        if self.cfg.family.head_rows == "targets":      # the output layer on target rows only
            rows, logit_row = torch.unique(row, return_inverse=True)
            u, logits = model(tokens, pk, self.sigma_of(t), rows=rows)
        else:
            logit_row = None
            u, logits = model(tokens, pk, self.sigma_of(t))
        l = log_rates(u, pk, self.mode, m - n, self.max_len)
        return dise_parts(l, logits, row, tg.token, tg.rho, pk, logit_row=logit_row)

    def objective(self, model: nn.Module, batch: dict, generator: torch.Generator,
                  regime: Regime) -> LossTerms:
        from .process import delete
        bos, x0, m = self.split_batch(batch)
        B = x0.shape[0]
        dev = x0.device
        d = self.cfg.family
        t = truncate(sample_times(B, generator, d.antithetic, device=dev),
                     regime.t_min).float()
        alpha = self.schedule.alpha(t.double()).float()
        xt, n, _ = delete(x0, m, alpha, generator)
        rate, tok = self.terms(model, bos, x0, m, xt, n, t)
        w = self.schedule.weight(t.double()).float()
        if not regime.exact_weights:
            if self.cfg.family.train_weighting == "simple":
                w = torch.ones_like(w)
            elif self.cfg.family.train_weight_clip > 0:
                w = w.clamp_max(self.cfg.family.train_weight_clip)
        return LossTerms(nll=w * (rate + tok), n_tokens=m.float(),
                         parts={"rate": w * rate, "token": w * tok})

    # ---- sampler -----------------------------------------------------------------------
    @torch.no_grad()
    def run_sampler(self, model: nn.Module, num: int, seq_len: int, steps: int,
               generator: torch.Generator, temperature: float = 1.0, top_p: float = 1.0,
               bos_id: Optional[int] = None, prefix: Optional[torch.Tensor] = None,
               prompts: Optional[Sequence[Sequence[int]]] = None,
               allowed: Optional[Sequence[Sequence[bool]]] = None,
               t_min: float = SAMPLE_T_MIN, cache: bool = True, max_extra_steps: int = 0,
               trajectory: Optional[list] = None, on_forward: Optional[Callable] = None,
               stats: Optional[dict] = None, exclude_tokens: Optional[Sequence[int]] = None
               ) -> list[torch.Tensor]:
        """Tau-leaping insertion from [BOS] (+ prompt). Returns ``num`` 1-D token tensors
        (BOS included). ``seq_len``: the target length (fixed) or the cap L_max (variable).

        ``prompts`` (or ``prefix`` [num, k]) are kept fixed; by default insertions are allowed
        only in gaps at/after the last prompt token; ``allowed`` (one bool per initial token,
        BOS first) gives any allowed-gap mask (infilling). A token inserted into an allowed gap
        makes both resulting gaps allowed. ``trajectory`` (a list) receives every step's
        sequences; ``stats`` receives forward calls and tokens forwarded. ``exclude_tokens``
        are never inserted (e.g. BOS when it cannot occur inside a text)."""
        if bos_id is None:
            raise ConfigError("DID sampling needs the tokenizer's BOS id")
        if seq_len > self.max_len:
            raise ConfigError(f"seq_len {seq_len} exceeds the model's max_seq_len {self.max_len}")
        dev = model_device(model)
        if exclude_tokens is None and self.cfg.data.layout == "varlen":
            exclude_tokens = [int(bos_id)]          # BOS never occurs inside a varlen text
        x, ok, lengths = self._start(num, seq_len, int(bos_id), prefix, prompts, allowed, dev)
        fixed = self.mode == "fixed"
        ts = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)
        n_extra = (max_extra_steps or 4 * seq_len) if fixed else 0
        l_c = feats_c = None           # cached rates and features (fixed length) for x
        stale = torch.ones(num, dtype=torch.bool, device=dev)
        st = {"forward_calls": 0, "tokens_forwarded": 0, "sampler_steps": 0}
        pk = None                      # the packing of x, rebuilt only when x grows
        forward, head = self._split(model)
        for k in range(steps + n_extra):
            if pk is None:
                pk = Packing(torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]))
            full_now = lengths >= seq_len
            if k >= steps and bool(full_now.all()):
                break
            t, r = self._leap(k, steps, ts)
            need = stale if (fixed and cache and l_c is not None) else torch.ones_like(stale)
            l, feats = self._outputs(forward, x, pk, lengths, need, l_c, feats_c, t, seq_len)
            if bool(need.any()):
                st["forward_calls"] += 1
                st["tokens_forwarded"] += int(lengths[need].sum())
                if on_forward:
                    on_forward(k)
            ins = self._draw(l, r, ok & ~full_now[pk.seq_id], pk, seq_len - lengths, generator)
            st["sampler_steps"] = k + 1
            if bool(ins.any()):
                lg = head(feats[ins]).float()                # the inserting gaps' logits only
                if exclude_tokens:
                    lg[:, list(exclude_tokens)] = float("-inf")
                new_tok = gumbel_argmax(adjust_logits(lg, temperature, top_p), generator)
                x2, ok2, start = self._interleave(x, ok, ins, new_tok)
                added = torch.zeros(num, dtype=torch.long, device=dev).index_add_(
                    0, pk.seq_id, ins.long())
                if fixed and cache:     # outputs of unchanged sequences move with their rows
                    l_c, feats_c = self._moved(l, feats, start, ~(added > 0)[pk.seq_id],
                                               x2.numel())
                stale = added > 0
                x, ok, lengths, pk = x2, ok2, lengths + added, None
            else:
                # nothing inserted: x, its rows and (fixed length) the cached outputs stay as
                # they are; no [T, V] copy on the steps that only draw
                if fixed and cache:
                    l_c, feats_c = l, feats
                stale = torch.zeros_like(stale)
            if trajectory is not None:
                self._record(trajectory, k, t, r, x, lengths, num)
        if stats is not None:
            stats.update(st)
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        return list(torch.split(x, (cu[1:] - cu[:-1]).tolist()))

    def _leap(self, k: int, steps: int, ts: torch.Tensor) -> tuple[float, float]:
        """Time ``t = ts[k]`` of step ``k`` and its insertion probability factor
        ``r = (alpha_s - alpha_t) / (1 - alpha_t)`` (``s = ts[k+1]``; 1 at the last step and
        at the fixed-length completion steps after it)."""
        if k >= steps:
            return float(ts[-1]), 1.0
        t, s = float(ts[k]), float(ts[k + 1])
        a_t = float(self.schedule.alpha(torch.tensor(t)))
        a_s = float(self.schedule.alpha(torch.tensor(s)))
        return t, 1.0 if k == steps - 1 else (a_s - a_t) / (1 - a_t)

    def _draw(self, l: torch.Tensor, r: float, open_gaps: torch.Tensor, pk: Packing,
              room: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Insertion decisions, one per gap: ``P(insert at g) = min(1, r exp(l_g))`` on the
        open gaps, then at most ``room`` per sequence (:meth:`_cap`)."""
        p_ins = (r * l.double().exp()).clamp(max=1.0)
        p_ins = torch.where(open_gaps, p_ins, torch.zeros_like(p_ins))
        uu = torch.rand(p_ins.shape, generator=generator, device=l.device, dtype=torch.float64)
        return self._cap(uu < p_ins, pk, room, generator)

    @staticmethod
    def _moved(l: torch.Tensor, feats: torch.Tensor, start: torch.Tensor,
               keep_rows: torch.Tensor, T2: int):
        """The fixed-length cache after an insertion step: the rows in ``keep_rows`` (their
        sequence inserted nothing) moved to their new rows ``start``; the others are stale
        and get recomputed."""
        l_c = torch.empty(T2, dtype=l.dtype, device=l.device)
        feats_c = feats.new_empty((T2, feats.shape[1]))
        l_c[start[keep_rows]] = l[keep_rows]
        feats_c[start[keep_rows]] = feats[keep_rows]
        return l_c, feats_c

    @staticmethod
    def _start(num: int, seq_len: int, bos_id: int, prefix, prompts, allowed, dev):
        """The packed starting state ``(x [T], ok [T] allowed gaps, lengths [num])``: BOS +
        each prompt (``prefix`` rows if no ``prompts``); by default only the gap after the
        last initial token is allowed."""
        if prefix is not None and prompts is None:
            prompts = [list(map(int, row)) for row in prefix.tolist()]
        prompts = [list(p) for p in prompts] if prompts is not None else [[] for _ in range(num)]
        if len(prompts) != num:
            raise ConfigError(f"{len(prompts)} prompts given for num={num} samples")
        # a prompt given as a BOS-led row (``prefixes_from_validation``, a BOS-led --prompt)
        # already holds the BOS: varlen texts never contain it, so it is not added twice
        init = [p if p[:1] == [bos_id] else [bos_id] + p for p in prompts]
        if any(len(s) > seq_len for s in init):
            raise ConfigError(f"a prompt is longer than seq_len={seq_len} (BOS included)")
        if allowed is None:
            allowed = [[False] * (len(s) - 1) + [True] for s in init]
        else:
            allowed = [list(map(bool, a)) for a in allowed]
            if len(allowed) != num or any(len(a) != len(s) for a, s in zip(allowed, init)):
                raise ConfigError("allowed: one bool per initial token (BOS first) per sample")
        lengths = torch.tensor([len(s) for s in init], device=dev)
        x = torch.tensor([v for s in init for v in s], dtype=torch.long, device=dev)
        ok = torch.tensor([v for a in allowed for v in a], dtype=torch.bool, device=dev)
        return x, ok, lengths

    @staticmethod
    def _interleave(x: torch.Tensor, ok: torch.Tensor, ins: torch.Tensor, new_tok: torch.Tensor):
        """Each new token right after its gap's left token: (x2, ok2, start), ``start`` the new
        row of every old row; inserted tokens' gaps are allowed."""
        cnt = 1 + ins.long()
        start = cnt.cumsum(0) - cnt
        T2 = int(cnt.sum())
        x2, ok2 = x.new_empty(T2), ok.new_empty(T2)
        x2[start], ok2[start] = x, ok
        x2[start[ins] + 1] = new_tok
        ok2[start[ins] + 1] = True
        return x2, ok2, start

    @staticmethod
    def _record(trajectory: list, k: int, t: float, r: float, x, lengths, num: int) -> None:
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).tolist()
        xs = x.tolist()
        trajectory.append({"step": k, "t": t, "r": r,
                           "ids": [xs[cu[i]:cu[i + 1]] for i in range(num)]})

    @staticmethod
    def _split(model) -> tuple[Callable, Callable]:
        """``(forward(x, packing, sigma) -> (u, f), head(f[rows]) -> logits)``: the features
        and the output layer apart for an :class:`InsertionLM`; any other score module (one
        ``forward(x, packing, sigma) -> (u, logits)``) gives its logits, with the identity
        as head."""
        if hasattr(model, "token_logits"):
            return model.features, model.token_logits
        return model, (lambda f: f)

    def _outputs(self, forward, x, pk, lengths, need, l_c, feats_c, t, seq_len):
        """(l [T], f [T, d]) for the packed x: log-rates and final features; only sequences in
        ``need`` are forwarded, the rest come from the cache (fixed length: time-independent
        model)."""
        if not bool(need.any()):
            return l_c, feats_c
        sig = self.sigma_of(torch.full((1,), t, device=x.device))       # one t: shared
        if bool(need.all()) or l_c is None:
            u, f = forward(x, pk, sig)
            return log_rates(u, pk, self.mode, seq_len - lengths, seq_len), f
        rows = need[pk.seq_id]
        sub_len = lengths[need]
        sub_pk = Packing(torch.cat([sub_len.new_zeros(1), sub_len.cumsum(0)]))
        u, f = forward(x[rows], sub_pk, sig)
        l_sub = log_rates(u, sub_pk, self.mode, seq_len - sub_len, seq_len)
        # the cache is rebuilt from these after the step: update it in place
        l_c[rows] = l_sub
        feats_c[rows] = f.to(feats_c.dtype)
        return l_c, feats_c

    @staticmethod
    def _cap(ins: torch.Tensor, pk: Packing, room: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """Keep a uniformly random subset of each sequence's insertions of size <= room."""
        cnt = torch.zeros(pk.B, dtype=torch.long, device=ins.device).index_add_(0, pk.seq_id, ins.long())
        if not bool((cnt > room).any()):
            return ins
        key = torch.rand(ins.shape, generator=generator, device=ins.device, dtype=torch.float64)
        key = torch.where(ins, key, torch.full_like(key, 2.0))       # non-insertions last
        order = torch.argsort(pk.seq_id.double() * 4 + key)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=ins.device)
        rank = rank - pk.cu_seqlens[:-1][pk.seq_id]
        return ins & (rank < room.clamp_min(0)[pk.seq_id])
