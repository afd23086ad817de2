"""``tdlm fit``: the breakdown, the largest micro-batch, JSON, and one-line errors."""
import json

import pytest

from tdlm.cli import main

SMALL = ["--preset", "tiny", "--set", "backbone.n_layers=1", "--set", "backbone.d_model=32",
         "--set", "backbone.n_heads=2", "--set", "backbone.cond_dim=16",
         "--set", "backbone.vocab_size=500", "--seq-len", "32"]


def test_fit_text(capsys):
    assert main(["fit", *SMALL, "--batch", "1", "2", "--memory", "0.005"]) == 0
    out = capsys.readouterr().out
    assert "tiny (mdlm" in out and "on cuda, fp32, L=32" in out
    assert "micro-batch 2: peak" in out
    for cat in ("parameters", "gradients", "optimizer", "activations", "temporaries"):
        assert cat in out
    assert "largest micro-batch with peak <= memory x (1 - 10% margin)" in out
    line = next(ln for ln in out.splitlines() if "0.005 GiB:" in ln)
    assert int(line.split(":")[1].split()[0]) >= 2


def test_fit_json(capsys):
    assert main(["fit", *SMALL, "--device", "cpu", "--checkpointing", "on", "--batch", "2",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    (e,) = d["estimates"]
    assert e["device"] == "cpu" and e["precision"] == "fp32"
    assert e["activation_checkpointing"] is True and e["micro_batch"] == 2
    assert e["peak_bytes"] == sum(e["breakdown"].values()) and d["fits"] == []


@pytest.mark.parametrize("argv,words", [
    (["--preset", "nope"], "unknown preset"),
    ([*SMALL, "--device", "cpu", "--precision", "bf16"], "bf16"),
    ([*SMALL, "--memory", "lots"], "memory"),
    ([*SMALL, "--set", "family.head_impl=fused"], "family.head_impl"),
    ([*SMALL, "--batch", "0"], "micro-batch"),
    ([*SMALL, "--margin", "1.5"], "--margin"),
])
def test_fit_errors_are_one_line(capsys, argv, words):
    assert main(["fit", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0]
