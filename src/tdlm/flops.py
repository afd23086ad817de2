"""Analytic FLOPs of the DiT backbone (``tdlm.nn.dit``) for given per-sequence lengths.

A forward pass over sequences of lengths ``l_1 .. l_B`` (T = sum l_b tokens; dense batches are
B equal lengths, packed ragged batches their real lengths, so padding is never counted) costs,
with d = d_model, r = mlp_ratio, c = cond_dim, n = n_layers, counting a multiply-add as 2 FLOPs:

* **blocks** (the paper's convention, "per transformer block"), per block:
  ``2 * P_tok * T``  token-wise linear layers, ``P_tok = 3d^2 (qkv) + d^2 (out) + 2 r d^2 + r d + d``
  (MLP weights and biases);
  ``4 * d * sum_b l_b^2``  attention scores ``QK^T`` and the weighted sum ``AV`` (all heads,
  full square also for causal models);
  ``2 * (6 d c + 6 d) * B``  the adaLN modulation, computed once per sequence.
* **embedding**: ``2 * n_embed * d * T`` (the input table counted as a one-hot matmul, the
  convention of Hoffmann et al. 2022, App. F; a lookup costs almost nothing in practice).
* **head**: ``2 * (d * head_out + head_out) * T`` (output linear) + ``2 * (2 d c + 2 d) * B``
  (final adaLN).
* **other**: the time embedding MLP, ``2 * (256 c + c + c^2 + c) * B``.

B in the conditioning terms (adaLN, final adaLN, time MLP) is the number of conditioning rows
computed: one per sequence, or 1 for a model without time input (one row shared by all).

``full = blocks + embedding + head + other``. Norms, softmax, rotary and activations
(O(d) per token) are not counted. Training costs ``train_flops = 3 x forward`` (backward =
2 x forward). Model-specific shapes (``head_out``, ``n_embed``):
MDLM: head_out = V (the [MASK] row is never computed), n_embed = V + 1; AR: V, V; TDLM: K
(x H for per-level heads), tree nodes.

The formulas live beside the modules they count (``tdlm.nn.dit.dit_flops``,
``tdlm.nn.heads.final_layer_flops``); a built model reports its own FLOPs through the
``tdlm.nn.accounting`` protocol (:func:`model_forward_flops`), so nothing here matches
parameter or module names.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch

from .nn.accounting import model_flops, seq_stats
from .nn.dit import TimestepEmbedder, block_token_params, dit_flops  # noqa: F401
from .nn.heads import final_layer_flops

FREQ_DIM = TimestepEmbedder.FREQ_DIM          # TimestepEmbedder frequency features


def forward_flops(model_cfg, lengths: Union[Iterable[int], torch.Tensor], head_out: int,
                  n_embed: int) -> dict:
    """Forward FLOPs of one pass over sequences of the given lengths (module docstring).
    ``model_cfg``: a ``BackboneConfig`` (d_model, n_layers, mlp_ratio, cond_dim). Returns
    ``{"blocks", "embedding", "head", "other", "full", "tokens", "sequences"}``."""
    s = seq_stats(lengths)
    if not getattr(model_cfg, "time_conditioning", True):    # one conditioning row (DiT)
        s = s.shared_conditioning()
    f = {**dit_flops(model_cfg, n_embed, s),
         **final_layer_flops(model_cfg.d_model, model_cfg.cond_dim, head_out, s)}
    out = {k: f[k] for k in ("blocks", "embedding", "head", "other")}
    out["full"] = sum(out.values())
    return {**out, "tokens": s.tokens, "sequences": s.sequences}


def train_flops(model_cfg, lengths, head_out: int, n_embed: int) -> dict:
    """Training FLOPs of one step over the given sequences: 3 x forward (backward = 2 x)."""
    f = forward_flops(model_cfg, lengths, head_out, n_embed)
    return {k: (3 * v if k not in ("tokens", "sequences") else v) for k, v in f.items()}


def model_forward_flops(model: torch.nn.Module, lengths,
                        shared_conditioning: Optional[bool] = None) -> dict:
    """``forward_flops`` of one forward of a built library model, as its modules report it
    (``tdlm.nn.accounting.model_flops``: the backbone's and heads' shapes, ``model.head_out``
    when the model computes fewer outputs than its head holds; ``shared_conditioning`` as
    there)."""
    return model_flops(model, lengths, shared_conditioning)
def flops_from_log(log, models: dict) -> dict:
    """Total FLOPs of the forward calls recorded in a ``ForwardLog``: per model name and in
    all, ``{"per_model": {name: {...}}, "blocks": ..., "full": ...}``. Every dense call of
    shape (num, seq_len) counts ``num`` sequences of length ``seq_len``. Model-FLOPs
    convention: ``head`` (and so ``full``) counts the output layer at every position of a
    call, although MDLM's sampler runs it on the positions that move alone (and DID's on the
    gaps that insert), so a sampler's arithmetic is lower than ``full`` by up to ``head``."""
    per = {}
    tot = {"blocks": 0, "embedding": 0, "head": 0, "other": 0, "full": 0}
    for name, shapes in log.shapes.items():
        acc = dict.fromkeys(tot, 0)
        for (num, L), cnt in shapes.items():
            f = model_forward_flops(models[name], [L] * num)
            for k in acc:
                acc[k] += cnt * f[k]
        acc["calls"] = log.calls[name]
        per[name] = acc
        for k in tot:
            tot[k] += acc[k]
    return {"per_model": per, **tot}


class TrainingFlops:
    """Cumulative training FLOPs of the forwards a model's backbone actually runs.

    A forward pre-hook on the model's DiT (every family calls it, whatever its head does)
    records the lengths of the sequences each forward sees: the real lengths for packed and
    ragged layouts (DID forwards shortened sequences), ``[L] * B`` for dense batches.
    :meth:`step_done` turns the lengths recorded since the last call into
    ``train_flops = 3 x forward`` (:func:`model_forward_flops`, ``full``: blocks, embedding,
    head and the rest) and adds them to ``total`` (and the tokens forwarded to ``tokens``);
    :meth:`discard` drops forwards that are not
    training (validation). Activation checkpointing re-runs blocks inside the backward, not
    the DiT's forward, so recomputation is not counted (the usual convention: model FLOPs).
    A model without a DiT is not counted (``total`` stays None)."""

    def __init__(self, model: torch.nn.Module, total: float = 0.0):
        from .nn.dit import backbone_of
        self.model = model
        self._seen: list = []
        dit = backbone_of(model)
        self.total = None if dit is None else float(total)
        self.tokens = 0
        self._handle = None if dit is None else dit.register_forward_pre_hook(
            self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs) -> None:
        lay = kwargs.get("packing") or kwargs.get("layout")
        lens = getattr(lay, "lengths_list", None)
        if lens is None and lay is not None and getattr(lay, "lengths", None) is not None:
            lens = lay.lengths.tolist()
        if lens is None:
            x = args[0] if args else kwargs["tokens"]
            lens = [x.shape[1]] * x.shape[0]
        sigma = args[1] if len(args) > 1 else kwargs.get("sigma")
        self._seen.append((lens, mod.shares_conditioning(sigma)))     # one forward

    def discard(self) -> None:
        self._seen.clear()

    def step_done(self) -> float:
        """Add the FLOPs of the forwards since the last call (each counted as the forward it
        was: its lengths, its conditioning rows); returns this step's FLOPs."""
        seen, self._seen = self._seen, []
        if self.total is None or not seen:
            return 0.0
        self.tokens += sum(sum(lens) for lens, _ in seen)
        f = 3.0 * sum(model_forward_flops(self.model, lens, shared)["full"]
                      for lens, shared in seen)
        self.total += f
        return f

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
