"""TDLM through the shared machinery: presets at equal budget, `tdlm tree build/show`, and
`tdlm train/eval/sample` on a TDLM preset (tree built from the corpus at train time)."""
import json

import numpy as np
import pytest

from tdlm.cli import main
from tdlm.config import get_preset
from tdlm.tree import VocabTree
from test_cli import tiny_sets, write_corpus


def info(preset, capsys):
    capsys.readouterr()
    assert main(["info", "--preset", preset, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("tdlm_p,mdlm_p", [("tdlm-small", "mdlm-small"), ("tdlm-base", "mdlm-base"),
                                           ("tdlm-tiny", "tiny-gpt2")])
def test_equal_parameter_budget_presets(tdlm_p, mdlm_p, capsys):
    t, m = info(tdlm_p, capsys), info(mdlm_p, capsys)
    assert abs(t["parameters"]["total"] / m["parameters"]["total"] - 1) < 0.01
    assert t["parameters"]["head_share"] < 0.005
    assert t["n_layers"] > m["n_layers"]
    if tdlm_p == "tdlm-small":
        assert t["n_layers"] == 17 and t["tree_K"] == 512 and t["tree_H"] == 2


def test_tree_build_show_and_train_eval_sample(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    tree_file = tmp_path / "tree.safetensors"
    assert main(["tree", "build", "--source", "corpus", "--K", "40", "--H", "3", "--dim", "8",
                 "--data-source", str(corpus), "--tokenizer", "gpt2", "--cache-dir", str(cache),
                 "--out", str(tree_file)]) == 0
    tree = VocabTree.load(tree_file)
    tree.validate()
    assert tree.V == 50257 and tree.H == 3 and tree.n_children.max() <= 40
    capsys.readouterr()
    assert main(["tree", "show", str(tree_file)]) == 0
    shown = capsys.readouterr().out
    assert "height" in shown.lower()
    # train a TDLM with a small tree built from the corpus at train time
    run = tmp_path / "run"
    sets = tiny_sets(corpus, cache, "model.family=\"tdlm\"", "model.tree_K=16", "model.tree_H=4",
                     "model.tree_embed_dim=8", "data.tokenizer=\"bpe-512\"")
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", *sets]) == 0
    assert (run / "tree.safetensors").exists()
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--batches", "2"]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(m["parts_per_token"]) == {f"level_{h}" for h in range(4)}
    assert abs(sum(m["parts_per_token"].values()) - m["nelbo_per_token"]) < 1e-6 * max(1, m["nelbo_per_token"])
    assert main(["sample", str(run), "--num", "2", "--steps", "8"]) == 0
    recs = [json.loads(l) for l in (run / "samples" / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(max(r["ids"]) < 512 for r in recs)
    assert main(["sample", str(run), "--num", "1", "--steps", "8", "--steps-split", "1,1,2,4",
                 "--out", str(tmp_path / "s.jsonl")]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--num", "1", "--steps", "8", "--steps-split", "4,4"]) == 2
    assert "steps split" in capsys.readouterr().err


def test_tree_for_another_tokenizer_is_refused(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    tree = VocabTree.from_assignment([np.arange(512) // 32, np.zeros(16, dtype=np.int64)], K=32,
                                     vocab_hash="not-this-tokenizer")
    tree.save(tmp_path / "t.safetensors")
    sets = tiny_sets(corpus, tmp_path / "cache", "model.family=\"tdlm\"", "model.tree_source=\"file\"",
                     f"model.tree_path=\"{tmp_path / 't.safetensors'}\"")
    rc = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--no-progress", *sets])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "tokenizer" in err[0]
