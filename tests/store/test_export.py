"""Shareable models (tdlm.export): save_pretrained / from_pretrained / `tdlm export`.

For each family (MDLM with EMA, TDLM, AR, DID) a tiny run is trained for two steps; its
export must reload with bit-identical weights, the same config and tokenizer, the same
``nelbo`` and the same ``generate`` output at a fixed seed as the source checkpoint. The
exported folder is verified on load (an altered file is named), refuses to be overwritten,
and the hub path is exercised with a stand-in ``snapshot_download`` (nothing is downloaded).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import tdlm
from tdlm.cli import main
from tdlm.errors import CheckpointError, TdlmError
from tdlm.train.checkpoint import load_checkpoint

from test_cli import tiny_sets, tree_hash, write_corpus  # noqa: E402

FAMILY_SETS = {
    "mdlm": ["train.ema=0.9"],                       # EMA on: the export holds the EMA weights
    "tdlm": ['model.family="tdlm"', "model.tree_K=16", "model.tree_H=3",
             "model.tree_embed_dim=8"],
    "ar": ['model.family="ar"'],
    "did": ['model.family="did"', 'model.did_length="fixed"', 'data.layout="packed_bos"',
            "model.time_conditioning=false"],
}
TEXTS = ["The small bird sees a red house near the river.", "Today the road runs over a stone."]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {"root": root, "corpus": write_corpus(root / "corpus", n_docs=12),
            "cache": root / "cache", "runs": {}}


def trained(env, family: str) -> Path:
    """A two-step run of ``family`` (trained once per module)."""
    if family not in env["runs"]:
        out = env["root"] / f"run-{family}"
        sets = tiny_sets(env["corpus"], env["cache"], "train.max_steps=2", "train.eval_every=2",
                         "train.eval_batches=1", *FAMILY_SETS[family])
        assert main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", *sets]) == 0
        env["runs"][family] = out
    return env["runs"][family]


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family,how", [("mdlm", "api"), ("tdlm", "cli"), ("ar", "pipeline"),
                                        ("did", "api")])
def test_export_roundtrip(env, family, how, capsys):
    run = trained(env, family)
    src = tdlm.load(run)
    out = env["root"] / f"export-{family}"
    if how == "api":
        assert tdlm.save_pretrained(run, out) == out
    elif how == "pipeline":
        src.save_pretrained(out)
    else:
        capsys.readouterr()
        assert main(["export", str(run), "--out", str(out)]) == 0
        assert str(out) in capsys.readouterr().out

    files = {p.name for p in out.iterdir()}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_meta.json",
                "README.md", "manifest.json"} | ({"tree.safetensors"} if family == "tdlm" else set())
    assert files == expected
    manifest = json.loads((out / "manifest.json").read_text())
    has_ema = load_checkpoint(run).ema_state is not None
    assert has_ema == (family == "mdlm")
    assert manifest["weights"] == src.weights == ("ema" if has_ema else "raw")
    assert manifest["family"] == family and set(manifest["files"]) == expected - {"README.md",
                                                                                   "manifest.json"}
    assert json.loads((out / "config.json").read_text()) == json.loads(src.cfg.to_json())

    for pipe in (tdlm.load(out), tdlm.from_pretrained(out)):
        assert pipe.cfg.to_dict() == src.cfg.to_dict() and pipe.weights == src.weights
        _same_state(pipe.model.state_dict(), src.model.state_dict())
        assert pipe.tokenizer.vocab_hash() == src.tokenizer.vocab_hash()
        assert pipe.nelbo(TEXTS, seed=1, repeats=2) == src.nelbo(TEXTS, seed=1, repeats=2)
        a = [row.tolist() for row in pipe.generate_ids(num=2, steps=4, seed=3)]
        b = [row.tolist() for row in src.generate_ids(num=2, steps=4, seed=3)]
        assert a == b and len(a) == 2 and all(a)
        assert pipe.generate(num=1, steps=4, seed=5) == src.generate(num=1, steps=4, seed=5)
    if family == "tdlm":
        t0, t1 = src.family.tree, tdlm.load(out).family.tree
        assert (t0.V, t0.K, t0.H, t0.vocab_hash) == (t1.V, t1.K, t1.H, t1.vocab_hash)
        assert (t0.anc == t1.anc).all()
    if family == "mdlm":           # the raw weights can be exported too, and differ from EMA
        raw = env["root"] / "export-mdlm-raw"
        assert main(["export", str(run), "--out", str(raw), "--no-ema"]) == 0
        pr = tdlm.load(raw)
        assert pr.weights == "raw"
        _same_state(pr.model.state_dict(), tdlm.load(run, use_ema=False).model.state_dict())
        assert any(not torch.equal(v, src.model.state_dict()[k])
                   for k, v in pr.model.state_dict().items())


def test_exported_folder_works_with_the_cli(env, capsys):
    out = env["root"] / "export-cli-use"
    tdlm.save_pretrained(trained(env, "mdlm"), out)
    before = tree_hash(out)
    s = env["root"] / "s" / "samples.jsonl"
    assert main(["sample", str(out), "--num", "1", "--steps", "3", "--out", str(s)]) == 0
    assert len(s.read_text().splitlines()) == 1
    capsys.readouterr()
    assert main(["eval", str(out), "--batches", "1", "--json", "--out",
                 str(env["root"] / "ev")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["weights"] == "ema" and res["nelbo_per_token"] > 0
    # an export of an export is the same model
    again = env["root"] / "export-again"
    assert main(["export", str(out), "--out", str(again)]) == 0
    _same_state(tdlm.load(again).model.state_dict(), tdlm.load(out).model.state_dict())
    assert tree_hash(out) == before


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def test_exported_folder_is_verified(env, tmp_path):
    good = tdlm.save_pretrained(trained(env, "tdlm"), tmp_path / "good")
    for name in ("model.safetensors", "tokenizer.json", "tree.safetensors", "config.json"):
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(good, bad)
        data = bytearray((bad / name).read_bytes())
        data[len(data) // 2] ^= 1
        (bad / name).write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="corrupt") as ei:
            tdlm.load(bad)
        assert name in _one_line(ei.value)
    # truncated weights
    bad = tmp_path / "truncated"
    shutil.copytree(good, bad)
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        tdlm.load(bad)
    # a missing file
    bad = tmp_path / "missing"
    shutil.copytree(good, bad)
    (bad / "tokenizer_meta.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer_meta.json"):
        tdlm.load(bad)
    # a file the manifest does not cover is refused, not read unverified
    bad = tmp_path / "unlisted"
    shutil.copytree(good, bad)
    (bad / "tree.safetensors").rename(bad / "tree2.safetensors")
    shutil.copy(bad / "tree2.safetensors", bad / "tree.safetensors")
    with pytest.raises(CheckpointError, match="tree2.safetensors is not listed"):
        tdlm.load(bad)
    # the model card is free to edit
    card = tmp_path / "card"
    shutil.copytree(good, card)
    (card / "README.md").write_text("# my model\n")
    assert tdlm.load(card).cfg.model.family == "tdlm"
    # family checks and the training-checkpoint loader's message
    with pytest.raises(CheckpointError, match="holds a 'tdlm' model, expected 'ar'"):
        tdlm.load(good, expect_family="ar")
    with pytest.raises(CheckpointError, match="exported model") as ei:
        load_checkpoint(good)
    _one_line(ei.value)


def test_export_never_overwrites(env, tmp_path, capsys, monkeypatch):
    run = trained(env, "ar")
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    rc = main(["export", str(run), "--out", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not empty" in err[0] and "Traceback" not in err[0]
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(TdlmError, match="is a file"):
        tdlm.save_pretrained(run, f)
    assert f.read_text() == "x"
    # an empty folder is fine; overwrite=True replaces a finished export
    empty = tmp_path / "empty"
    empty.mkdir()
    tdlm.save_pretrained(run, empty)
    tdlm.save_pretrained(run, target, overwrite=True)
    assert not (target / "keep.txt").exists() and tdlm.load(target).cfg.model.family == "ar"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp leftovers
    # a failure midway leaves nothing behind and the old export intact
    from tdlm.store import export as ex
    before = tree_hash(target)

    def boom(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ex, "_model_card", boom)
    with pytest.raises(TdlmError, match="No space left") as ei:
        tdlm.save_pretrained(run, target, overwrite=True)
    _one_line(ei.value)
    assert tree_hash(target) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_from_pretrained_hub_path(env, tmp_path, monkeypatch):
    """Hub ids go through huggingface_hub.snapshot_download (stood in for: no network)."""
    out = tdlm.save_pretrained(trained(env, "ar"), tmp_path / "exp")
    # without huggingface_hub: one line naming the package
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="huggingface_hub is not installed") as ei:
        tdlm.from_pretrained("someone/tdlm-tiny-ar")
    _one_line(ei.value)
    # a path-like name that does not exist is not sent to the hub
    with pytest.raises(CheckpointError, match="model not found"):
        tdlm.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    monkeypatch.undo()
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(repo_id, revision=None, cache_dir=None, **kw):
        calls.append((repo_id, revision))
        return str(out)
    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    pipe = tdlm.from_pretrained("someone/tdlm-tiny-ar", revision="v1")
    assert calls == [("someone/tdlm-tiny-ar", "v1")] and pipe.cfg.model.family == "ar"

    def failing(repo_id, **kw):
        raise RuntimeError("Repository Not Found for url: https://huggingface.co/api/x\nmore")
    monkeypatch.setattr(hub, "snapshot_download", failing)
    with pytest.raises(CheckpointError, match="Hugging Face hub failed") as ei:
        tdlm.from_pretrained("someone/missing")
    _one_line(ei.value)
    # a hub repository that is not a tdlm export
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: str(foreign))
    with pytest.raises(CheckpointError, match="not a tdlm exported model"):
        tdlm.from_pretrained("someone/bert")
