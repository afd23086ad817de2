"""``tdlm convert``'s weight mapping against the authors' own modeling code.

tests/fixtures/published/{mdlm,duo} hold tiny random DiTs built and run by the MDLM and DUO
repositories' ``models/dit.py`` (scripts/make_published_fixture.py; commits and the two
flash-attn stand-ins in provenance.json): their weights as published (``backbone.`` + their
names), a hub-style config.json, and the logits their code computed. The converted
:class:`MaskedLM` must reproduce those logits from those weights.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from paths import FIXTURES
from tdlm.errors import CheckpointError
from tdlm.families.mdlm.convert import convert_published
from tdlm.families.mdlm.family import MaskedLM

PUB = FIXTURES / "published"
V = 64          # the fixture's vocabulary (MDLM adds a [MASK] row, DUO has none)


def _load(which):
    state = load_file(str(PUB / which / "model.safetensors"))
    hub = json.loads((PUB / which / "config.json").read_text())
    ref = load_file(str(PUB / which / "logits.safetensors"))
    return state, hub, ref


def _model(cfg, ours, time_conditioning=None):
    if time_conditioning is not None:
        cfg.backbone = replace(cfg.backbone, time_conditioning=time_conditioning)
    m = MaskedLM(cfg)
    m.load_state_dict(ours, strict=True)
    return m.eval()


def _all_logits(m, tokens, sigma):
    """Every output row of the head, [MASK] included (the reference computes them all)."""
    with torch.no_grad():
        return m.head.linear(m.features(tokens, sigma))


@pytest.mark.parametrize("which", ["mdlm", "duo"])
def test_converted_model_reproduces_the_authors_logits(which):
    state, hub, ref = _load(which)
    cfg, ours, notes = convert_published(state, hub, V, source=which)
    assert cfg.backbone.vocab_size == V and cfg.backbone.n_layers == 2
    assert cfg.backbone.d_model == 32 and cfg.backbone.n_heads == 4 and cfg.backbone.cond_dim == 16
    assert cfg.backbone.time_conditioning == hub["time_conditioning"]
    tokens, sigma = ref["tokens"], ref["sigma"]
    cols = ref["logits"].shape[-1]
    # time conditioning on: the reference fed sigma
    got = _all_logits(_model(cfg, ours, True), tokens, sigma)[..., :cols]
    torch.testing.assert_close(got, ref["logits"], rtol=1e-5, atol=1e-5)
    # the published setting (MDLM-OWT: time conditioning off = sigma replaced by zeros)
    m = _model(cfg, ours, False)
    got0 = _all_logits(m, tokens, sigma)[..., :cols]
    torch.testing.assert_close(got0, ref["logits_sigma0"], rtol=1e-5, atol=1e-5)
    # the family's forward drops only the [MASK] output (SUBS gives it -inf anyway)
    with torch.no_grad():
        torch.testing.assert_close(m(tokens, sigma), ref["logits_sigma0"][..., :V],
                                   rtol=1e-5, atol=1e-5)
    # the check can fail: the reference really depends on sigma and on every block
    assert (ref["logits"] - ref["logits_sigma0"]).abs().max() > 1e-2
    broken = dict(ours)
    broken["backbone.blocks.1.attn_qkv.weight"] = broken["backbone.blocks.1.attn_qkv.weight"].flip(0)
    assert not torch.allclose(_all_logits(_model(cfg, broken, False), tokens, sigma)[..., :cols],
                              ref["logits_sigma0"], atol=1e-3)


def test_duo_gets_a_mask_row_and_says_so():
    state, hub, _ = _load("duo")
    cfg, ours, notes = convert_published(state, hub, V, source="duo")
    assert ours["backbone.vocab_embed.weight"].shape[0] == V + 1
    assert torch.all(ours["backbone.vocab_embed.weight"][V] == 0)
    assert any("uniform-state" in n for n in notes)


def test_layout_mismatches_are_one_line_errors():
    state, hub, _ = _load("mdlm")
    with pytest.raises(CheckpointError, match="looks like a 'mdlm' checkpoint"):
        convert_published(state, hub, V, source="duo")
    with pytest.raises(CheckpointError, match="rotary frequencies"):
        convert_published(state, {**hub, "n_heads": 8}, V, source="mdlm")
    with pytest.raises(CheckpointError, match="no n_heads"):
        convert_published(state, {k: v for k, v in hub.items() if k != "n_heads"}, V)
    ar = {k: v for k, v in state.items() if "adaLN" not in k}
    with pytest.raises(CheckpointError, match="autoregressive"):
        convert_published(ar, hub, V)
    with pytest.raises(CheckpointError, match="unknown weight"):
        convert_published({**state, "backbone.extra.weight": torch.zeros(1)}, hub, V)


def test_layout_detection():
    from tdlm.families.base import detect_import
    for which in ("mdlm", "duo"):
        state, hub, _ = _load(which)
        assert detect_import(hub, state, V) == which                      # model_type
        bare = {k: v for k, v in hub.items() if k != "model_type"}
        assert detect_import(bare, state, V) == which                     # embedding rows
        assert detect_import(bare, state, V + 5) is None
