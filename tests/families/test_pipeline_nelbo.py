"""``Pipeline.nelbo`` scores texts laid out as the model's training data: packed layouts as
one EOS-joined stream cut into blocks (a shorter last block, never padded), ``varlen`` as a
ragged batch, ``crop_pad`` padded as in training. Packed and ragged training rows hold no
padding, so the model must never be shown a pad token on these layouts (until session 23
each text was padded to L on its own, and the model saw the pads)."""
from __future__ import annotations

import pytest
import torch

from tdlm.pipeline import Pipeline

from test_family_conformance import BOS, L, V, make

EOS, PAD = V - 3, V - 2
assert L == 10 and BOS == V - 1


class CharTok:
    """Letters a..u -> 0..20; EOS, PAD and BOS are the ids above them."""
    eos_id, pad_id, bos_id = EOS, PAD, BOS

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]


def watch_inputs(model, seen):
    """Record the token ids every forward pass embeds (the first embedding table's input)."""
    emb = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return emb.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))


def pipe_for(layout, name="mdlm"):
    fam, model = make(name, layout=layout)
    return Pipeline(fam.cfg, fam, model.eval(), CharTok())


TEXTS = ["abc", "defghijk"]
a, b, c, d, e, f, g, h, i, j, k = range(11)


@pytest.mark.parametrize("layout,rows", [
    ("packed", [[a, b, c, EOS, d, e, f, g, h, i], [j, k, EOS]]),
    ("packed_bos", [[BOS, a, b, c, EOS, d, e, f, g, h], [BOS, i, j, k, EOS]]),
    ("varlen", [[BOS, a, b, c], [BOS, d, e, f, g, h, i, j, k]]),
    ("crop_pad", [[BOS, a, b, c, EOS], [BOS, d, e, f, g, h, i, j, k, EOS]]),
])
def test_rows_follow_the_training_layout(layout, rows):
    assert pipe_for(layout).nelbo_rows(TEXTS) == rows


@pytest.mark.parametrize("name,layout", [
    ("mdlm", "packed"), ("mdlm", "packed_bos"), ("mdlm", "varlen"), ("tdlm", "packed"),
    ("tdlm", "varlen"), ("ar", "packed"), ("did", "packed_bos"), ("did", "varlen")])
def test_no_pad_token_is_shown_on_layouts_trained_without_padding(name, layout):
    pipe = pipe_for(layout, name)
    seen = []
    hook = watch_inputs(pipe.model, seen)
    try:
        res = pipe.nelbo(TEXTS + ["lmnopqrstlmn", "t"], repeats=8)
    finally:
        hook.remove()
    assert seen and not any(bool((z == PAD).any()) for z in seen)
    assert res["rows"] == len(pipe.nelbo_rows(TEXTS + ["lmnopqrstlmn", "t"]))
    if layout == "packed" and name != "ar":      # every stream token is scored once (3+1 + 8+1 + 12+1 + 1+1)
        assert res["tokens"] == 28


def test_crop_pad_pads_as_in_training_and_does_not_score_padding():
    pipe = pipe_for("crop_pad")
    seen = []
    hook = watch_inputs(pipe.model, seen)
    try:
        res = pipe.nelbo(TEXTS, repeats=8)
    finally:
        hook.remove()
    assert all(z.shape[-1] == L for z in seen)
    assert any(bool((z == PAD).any()) for z in seen)
    assert res["tokens"] == 5 + 10


def test_batch_rows_do_not_change_the_rows_scored():
    pipe = pipe_for("varlen")
    r1 = pipe.nelbo(TEXTS * 3, repeats=2, batch_rows=1)
    r2 = pipe.nelbo(TEXTS * 3, repeats=2, batch_rows=64)
    assert r1["tokens"] == r2["tokens"] and r1["rows"] == r2["rows"] == 6
