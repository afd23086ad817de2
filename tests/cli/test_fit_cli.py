"""``tdlm fit``: the breakdown, the largest micro-batch, JSON, and one-line errors."""
import json

import pytest

from tdlm.cli import main

SMALL = ["--preset", "tiny", "--set", "backbone.n_layers=1", "--set", "backbone.d_model=32",
         "--set", "backbone.n_heads=2", "--set", "backbone.cond_dim=16",
         "--set", "backbone.vocab_size=500", "--seq-len", "32"]


def test_fit_text(capsys):
    assert main(["fit", *SMALL, "--batch", "2", "--memory", "0.005"]) == 0
    out = capsys.readouterr().out
    assert "tiny (mdlm" in out and "on cuda, fp32, L=32" in out
    assert "micro-batch 2: peak" in out
    for cat in ("parameters", "gradients", "optimizer", "activations", "temporaries"):
        assert cat in out
    assert "largest micro-batch with peak <= memory x (1 - 10% margin)" in out
    assert "0.005 GiB:" in out


def test_fit_json(capsys):
    assert main(["fit", *SMALL, "--precision", "bf16", "--checkpointing", "on", "--batch", "1", "2",
                 "--memory", "0.004", "--margin", "0", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    e1, e2 = d["estimates"]
    assert e1["precision"] == "bf16" and e1["activation_checkpointing"] is True
    assert e1["peak_bytes"] < e2["peak_bytes"] == sum(e2["breakdown"].values())
    fit = d["fits"][0]
    assert fit["capacity_bytes"] == int(0.004 * 2**30)
    assert fit["micro_batch"] >= 1 and fit["peak_bytes"] <= fit["budget_bytes"]
    assert fit["tried"][str(fit["micro_batch"] + 1)] > fit["budget_bytes"]


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
