"""``tdlm convert`` end to end: a published-layout folder with the GPT-2 vocabulary becomes an
exported model that ``tdlm eval``/``tdlm sample``/``tdlm.load`` take; pickles and bad input are
one-line errors. (The numerical check against the authors' code: tests/families/test_convert.py.)"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tdlm
from paths import FIXTURES
from tdlm.cli import main

GPT2 = 50257


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The MDLM fixture widened to the GPT-2 vocabulary (+[MASK]), as the hub model is laid
    out: ``backbone.``-prefixed DIT weights and an HF-style config.json."""
    root = tmp_path_factory.mktemp("pub")
    state = load_file(str(FIXTURES / "published" / "mdlm" / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for k in ("backbone.vocab_embed.embedding", "backbone.output_layer.linear.weight",
              "backbone.output_layer.linear.bias"):
        w = state[k]
        extra = 0.1 * torch.randn((GPT2 + 1 - w.shape[0],) + tuple(w.shape[1:]), generator=g)
        state[k] = torch.cat([w[:-1], extra, w[-1:]]).contiguous()   # keep [MASK] last
    hub = json.loads((FIXTURES / "published" / "mdlm" / "config.json").read_text())
    hub.update(vocab_size=GPT2 + 1, model_length=64)
    (root / "mdlm").mkdir()
    save_file(state, str(root / "mdlm" / "model.safetensors"))
    (root / "mdlm" / "config.json").write_text(json.dumps(hub))
    return root


def test_convert_then_eval_sample_and_load(published, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(published / "mdlm"), "--out", str(out)]) == 0
    msg = capsys.readouterr().out
    assert "(mdlm layout) into a mdlm model: 2 blocks, d_model 32, 4 heads" in msg
    man = json.loads((out / "manifest.json").read_text())
    assert man["family"] == "mdlm" and man["converted_from"]["layout"] == "mdlm"
    assert "Provenance" in (out / "README.md").read_text()
    # the weights are the published ones, renamed
    src = load_file(str(published / "mdlm" / "model.safetensors"))
    ours = load_file(str(out / "model.safetensors"))
    assert torch.equal(ours["backbone.vocab_embed.weight"], src["backbone.vocab_embed.embedding"])
    assert torch.equal(ours["head.linear.weight"], src["backbone.output_layer.linear.weight"])
    pipe = tdlm.load(out)
    assert pipe.cfg.backbone.time_conditioning is False and pipe.cfg.data.seq_len == 64
    r = pipe.nelbo(["A converted model scores text like any other."], repeats=1)
    assert r["tokens"] > 0 and r["nelbo_per_token"] > 0
    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps({"text": f"Sentence number {i} of a tiny set, long enough to fill a block of sixty-four tokens or more once all are read."}) + "\n"
                             for i in range(12)))
    assert main(["eval", str(out), "--dataset", f"tiny={texts}", "--batches", "1",
                 "--out", str(tmp_path / "ev"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["datasets"][0]
    assert row["dataset"] == "tiny" and row["nelbo_per_token"] > 0
    assert main(["sample", str(out), "--num", "1", "--steps", "2", "--seq-len", "16",
                 "--out", str(tmp_path / "s.jsonl")]) == 0
    assert (tmp_path / "s.jsonl").is_file()
    # model scheduling takes converted models like trained ones
    assert main(["sample", "--model", f"H={out}", "--model", f"L={out}", "--schedule",
                 "sandwich:0.25", "--num", "1", "--steps", "4", "--seq-len", "16",
                 "--out", str(tmp_path / "sched.jsonl")]) == 0
    assert (tmp_path / "sched.jsonl").is_file()


def test_pickles_and_bad_input_are_refused_in_one_line(published, tmp_path, capsys):
    pk = tmp_path / "pk"
    pk.mkdir()
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (pk / "config.json").write_text("{}")
    assert main(["convert", str(pk), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pickle" in err and "weights_only=True" in err
    assert not (tmp_path / "o").exists()
    assert main(["convert", str(published / "mdlm"), "--from", "duo",
                 "--out", str(tmp_path / "o")]) == 2
    assert "looks like a 'mdlm' checkpoint" in capsys.readouterr().err
    assert main(["convert", "no such/thing/here", "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    (nocfg / "model.safetensors").write_bytes(
        (published / "mdlm" / "model.safetensors").read_bytes())
    assert main(["convert", str(nocfg), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
