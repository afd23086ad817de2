"""Published MDLM and DUO DiT checkpoints -> this library's MDLM model (:class:`MaskedLM`).

Both papers' DiT (``models/dit.py`` of github.com/kuleshov-group/mdlm and s-sahoo/duo; the
hub models ``kuleshov-group/mdlm-owt``, ``s-sahoo/duo``, ``s-sahoo/duo-distilled`` wrap it as
``backbone``) computes, for tokens x [B, L] and noise level sigma [B]::

    c = silu(sigma_map(sigma))                         TimestepEmbedder: 256 sinusoids -> MLP
    h = vocab_embed.embedding[x]                       EmbeddingLayer (a raw [rows, d] matrix)
    h = block_i(h, rotary(L), c)        i = 0..n-1     adaLN-zero, rotate-half rotary, no bias
    logits = output_layer(h, c)                        adaLN final norm + Linear(d, rows)

which is :class:`~tdlm.nn.dit.DiT` + :class:`~tdlm.nn.heads.FinalLayer` parameter for
parameter. The mapping (their name -> ours, after the ``backbone.`` prefix)::

    vocab_embed.embedding      -> backbone.vocab_embed.weight
    sigma_map.mlp.{0,2}.*      -> backbone.sigma_map.mlp.{0,2}.*
    blocks.<i>.<name>          -> backbone.blocks.<i>.<name>     (norm1, attn_qkv, attn_out,
                                                                  norm2, mlp.0, mlp.2, adaLN)
    output_layer.<name>        -> head.<name>                    (norm_final, linear, adaLN)
    rotary_emb.inv_freq        -> (not stored: checked equal to ours, base 10000)

Rows: MDLM's table has ``len(tokenizer) + 1`` rows, the last being [MASK] (our layout
exactly). DUO is a uniform-state model with ``len(tokenizer)`` rows and no [MASK]: the
converted model gets a zero [MASK] row in the embedding and the output layer, so its outputs
on mask-free inputs are DUO's, and a masked input is one the network never saw. A converted
DUO is therefore a *starting point* (fine-tuning as MDLM, scheduling experiments), not a
calibrated masked-diffusion model; :func:`convert_published` says so in its ``notes``.

Sizes are read from the weights (d, blocks, cond_dim, MLP ratio, rows); ``n_heads``, the
sequence length and ``time_conditioning`` from the hub ``config.json`` (MDLM's field names:
``hidden_dim``, ``n_blocks``, ``n_heads``, ``cond_dim``, ``model_length``, ``vocab_size``,
``time_conditioning``; Hydra-style names ``hidden_size``/``length`` are accepted too).
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from ...config import RunConfig, get_preset
from ...errors import CheckpointError

EMBED = "vocab_embed.embedding"
SOURCES = {   # layout -> what differs between the two papers' published checkpoints
    "mdlm": {"mask_row": True, "time_conditioning": False},
    "duo": {"mask_row": False, "time_conditioning": True},
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1\.weight|attn_qkv\.weight|attn_out\.weight|"
                    r"norm2\.weight|mlp\.[02]\.(weight|bias)|adaLN_modulation\.(weight|bias))$")
_FIXED = {"sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias", "sigma_map.mlp.2.weight",
          "sigma_map.mlp.2.bias"}
_HEAD = {"output_layer.norm_final.weight": "head.norm_final.weight",
         "output_layer.linear.weight": "head.linear.weight",
         "output_layer.linear.bias": "head.linear.bias",
         "output_layer.adaLN_modulation.weight": "head.adaLN_modulation.weight",
         "output_layer.adaLN_modulation.bias": "head.adaLN_modulation.bias"}


def _strip_prefix(state: dict) -> dict:
    """Their names without whatever wraps the DIT (``backbone.`` in the hub and Lightning
    checkpoints); keys outside the DIT (e.g. a Lightning EMA copy) are an error."""
    hits = [k for k in state if k.endswith(EMBED)]
    if len(hits) != 1:
        raise CheckpointError(f"not an MDLM/DUO DiT checkpoint: expected one '*{EMBED}' "
                              f"weight, found {len(hits)}")
    prefix = hits[0][: -len(EMBED)]
    outside = [k for k in state if not k.startswith(prefix)]
    if outside:
        raise CheckpointError(f"unexpected weight {outside[0]!r} outside the DiT "
                              f"(prefix {prefix!r})")
    return {k[len(prefix):]: v for k, v in state.items()}


def detect(hub_config: dict, state: dict, vocab_size: int) -> Optional[str]:
    """"mdlm" or "duo" for a published checkpoint: the config's ``model_type`` when it names
    one, else the embedding's rows (vocabulary + [MASK]: mdlm; vocabulary only: duo)."""
    mt = str(hub_config.get("model_type", "")).lower()
    for src in SOURCES:
        if mt.startswith(src):
            return src
    rows = [v.shape[0] for k, v in state.items() if k.endswith(EMBED)]
    for src, spec in SOURCES.items():
        if rows and rows[0] == vocab_size + int(spec["mask_row"]):
            return src
    return None


def _field(cfg: dict, *names, default=None):
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    return default


def convert_published(state: dict, hub_config: dict, vocab_size: int, source: str = "mdlm",
                      base: Optional[RunConfig] = None) -> tuple[RunConfig, dict, list[str]]:
    """``(cfg, our_state, notes)`` for a published DiT ``state`` (their names, any wrapping
    prefix), its hub ``config.json`` and the tokenizer's ``vocab_size``. ``source``: "mdlm" or
    "duo" (module docstring). ``base``: the run config whose family, data and training
    sections are kept (default: the ``mdlm-small`` preset); the backbone comes from the
    weights. Raises :class:`CheckpointError` (one line) on anything that does not fit."""
    if source not in SOURCES:
        raise CheckpointError(f"unknown source layout {source!r}; one of {sorted(SOURCES)}")
    spec = SOURCES[source]
    theirs = _strip_prefix(state)
    emb = theirs[EMBED]
    rows, d = emb.shape
    want = vocab_size + 1 if spec["mask_row"] else vocab_size
    if rows != want:
        other = [s for s, v in SOURCES.items()
                 if (vocab_size + 1 if v["mask_row"] else vocab_size) == rows]
        hint = f" (it looks like a {other[0]!r} checkpoint: --from {other[0]})" if other else ""
        raise CheckpointError(f"the checkpoint's embedding has {rows} rows, but a {source} "
                              f"model of a {vocab_size}-token vocabulary has {want}{hint}")
    if "output_layer.adaLN_modulation.weight" not in theirs:
        raise CheckpointError("the checkpoint has no adaLN modulation (an autoregressive "
                              "baseline): only the diffusion DiT converts to an MDLM model")
    blocks = sorted({int(m.group(1)) for k in theirs if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))) or not blocks:
        raise CheckpointError("the checkpoint's blocks are not numbered 0..n-1")
    n_heads = _field(hub_config, "n_heads", "num_attention_heads")
    if n_heads is None:
        raise CheckpointError("config.json has no n_heads (it cannot be read from the weights)")
    cond_dim, freq = theirs["sigma_map.mlp.0.weight"].shape
    ratio = theirs["blocks.0.mlp.0.weight"].shape[0] // d
    L = int(_field(hub_config, "model_length", "length", "max_seq_len", default=1024))
    tc = bool(_field(hub_config, "time_conditioning", default=spec["time_conditioning"]))
    declared = _field(hub_config, "hidden_dim", "hidden_size")
    if declared is not None and int(declared) != d:
        raise CheckpointError(f"config.json says hidden size {declared}, the weights {d}")

    cfg = (base or get_preset("mdlm-small")).to_dict()
    cfg["backbone"].update(vocab_size=vocab_size, d_model=int(d), n_layers=len(blocks),
                           n_heads=int(n_heads), cond_dim=int(cond_dim), mlp_ratio=int(ratio),
                           max_seq_len=L, time_conditioning=tc,
                           dropout=float(_field(hub_config, "dropout", default=0.1)))
    cfg["data"]["seq_len"] = min(cfg["data"].get("seq_len", L), L)
    cfg = RunConfig.from_dict(cfg)

    ours: dict = {}
    for k, v in theirs.items():
        if k == EMBED:
            ours["backbone.vocab_embed.weight"] = v
        elif k in _FIXED or _BLOCK.match(k):
            ours["backbone." + k] = v
        elif k in _HEAD:
            ours[_HEAD[k]] = v
        elif k == "rotary_emb.inv_freq":
            ref = 1.0 / (10000 ** (torch.arange(0, d // int(n_heads), 2).float()
                                   / (d // int(n_heads))))
            if v.shape != ref.shape or not torch.allclose(v.float(), ref, rtol=1e-6):
                raise CheckpointError("the checkpoint's rotary frequencies are not base-10000 "
                                      f"over head_dim {d // int(n_heads)} (n_heads wrong?)")
            continue
        else:
            raise CheckpointError(f"unknown weight {k!r} in the checkpoint")
    notes = [f"converted from a published {source.upper()} DiT: {len(blocks)} blocks, d={d}, "
             f"{n_heads} heads, cond {cond_dim}, {rows} embedding rows"]
    if not spec["mask_row"]:
        for name in ("backbone.vocab_embed.weight", "head.linear.weight", "head.linear.bias"):
            if name in ours:
                w = ours[name]
                ours[name] = torch.cat([w, w.new_zeros((1,) + tuple(w.shape[1:]))])
        notes.append("DUO is a uniform-state model: a zero [MASK] row was added to the "
                     "embedding and output layer; as an MDLM model it is a starting point "
                     "(fine-tune it), not a calibrated masked-diffusion model")
    if freq != 256:
        raise CheckpointError(f"time embedding of {freq} frequencies, expected 256")
    return cfg, {k: v.contiguous() for k, v in ours.items()}, notes
