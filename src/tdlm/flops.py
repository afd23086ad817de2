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

``full = blocks + embedding + head + other``. Norms, softmax, rotary and activations
(O(d) per token) are not counted. Training costs ``train_flops = 3 x forward`` (backward =
2 x forward). Model-specific shapes come from :func:`model_head_and_embed`
(MDLM: head_out = V (the [MASK] row is never computed), n_embed = V + 1; AR: V, V; TDLM: K (x H for per-level heads), tree nodes).
"""
from __future__ import annotations

from typing import Iterable, Union

import torch

FREQ_DIM = 256          # TimestepEmbedder frequency features


def _lengths(lengths) -> tuple[int, int, int]:
    """(B, T = sum l, S2 = sum l^2) of a sequence of lengths (ints, a 1-D tensor/array)."""
    if isinstance(lengths, torch.Tensor):
        ls = [int(v) for v in lengths.reshape(-1).tolist()]
    else:
        ls = [int(v) for v in lengths]
    if any(v < 0 for v in ls):
        raise ValueError("sequence lengths must be >= 0")
    return len(ls), sum(ls), sum(v * v for v in ls)


def block_token_params(d: int, mlp_ratio: int) -> int:
    """Weights + biases of one block's token-wise linear layers (qkv, out, MLP)."""
    return 3 * d * d + d * d + 2 * mlp_ratio * d * d + mlp_ratio * d + d


def forward_flops(model_cfg, lengths: Union[Iterable[int], torch.Tensor], head_out: int,
                  n_embed: int) -> dict:
    """Forward FLOPs of one pass over sequences of the given lengths (module docstring).
    ``model_cfg``: a ``BackboneConfig`` (d_model, n_layers, mlp_ratio, cond_dim). Returns
    ``{"blocks", "embedding", "head", "other", "full", "tokens", "sequences"}``."""
    d, n, r, c = model_cfg.d_model, model_cfg.n_layers, model_cfg.mlp_ratio, model_cfg.cond_dim
    B, T, S2 = _lengths(lengths)
    per_block = 2 * block_token_params(d, r) * T + 4 * d * S2 + 2 * (6 * d * c + 6 * d) * B
    blocks = n * per_block
    embedding = 2 * n_embed * d * T
    head = 2 * (d * head_out + head_out) * T + 2 * (2 * d * c + 2 * d) * B
    other = 2 * (FREQ_DIM * c + c + c * c + c) * B
    return {"blocks": blocks, "embedding": embedding, "head": head, "other": other,
            "full": blocks + embedding + head + other, "tokens": T, "sequences": B}


def train_flops(model_cfg, lengths, head_out: int, n_embed: int) -> dict:
    """Training FLOPs of one step over the given sequences: 3 x forward (backward = 2 x)."""
    f = forward_flops(model_cfg, lengths, head_out, n_embed)
    return {k: (3 * v if k not in ("tokens", "sequences") else v) for k, v in f.items()}


def model_head_and_embed(model: torch.nn.Module) -> tuple[int, int]:
    """``(head_out, n_embed)`` of a library model: the output width of its head's linear
    layer(s) (``model.head_out`` when the model computes fewer outputs than its head holds,
    else every ``nn.Linear`` under ``model.head`` except adaLN modulations) and the rows
    of its input embedding table."""
    head = getattr(model, "head", None)
    backbone = getattr(model, "backbone", None)
    if head is None or backbone is None:
        raise ValueError("FLOPs need a library model with .backbone and .head")
    head_out = getattr(model, "head_out", None) or sum(
        m.out_features for name, m in head.named_modules()
        if isinstance(m, torch.nn.Linear) and "adaLN" not in name)
    return head_out, backbone.vocab_embed.num_embeddings


def model_forward_flops(model: torch.nn.Module, lengths) -> dict:
    """``forward_flops`` of a built library model (its backbone config and head shape)."""
    head_out, n_embed = model_head_and_embed(model)
    return forward_flops(model.backbone.cfg, lengths, head_out, n_embed)


def flops_from_log(log, models: dict) -> dict:
    """Total FLOPs of the forward calls recorded in a ``ForwardLog``: per model name and in
    all, ``{"per_model": {name: {...}}, "blocks": ..., "full": ...}``. Every dense call of
    shape (num, seq_len) counts ``num`` sequences of length ``seq_len``."""
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
