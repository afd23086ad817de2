"""The ``tdlm`` command line: a happy path (train -> eval -> sample) and the bad-input list.

Every user error must give a non-zero exit, exactly one ``error: ...`` line on stderr that
names the problem, no traceback, and must leave existing files untouched. Most cases call
``tdlm.cli.main`` in-process (fast); two run the real console entry point in a subprocess.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdlm.cli import build_parser, main
from text_corpus import write_corpus as _write_corpus

WORDS = ("the a one two small large red green river stone house garden quickly slowly "
         "walks runs sees finds under over near behind with and but because today "
         "yesterday bird fish tree cloud mountain city road window light dark").split()


def write_corpus(folder: Path, n_docs: int = 24, seed: int = 0) -> Path:
    return _write_corpus(folder, n_docs, seed, words=WORDS)


def tiny_sets(corpus: Path, cache: Path, *extra: str) -> list[str]:
    sets = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.cond_dim=16",
            "model.max_seq_len=32", "data.seq_len=32", "data.tokenizer=bpe-512",
            f"data.source={corpus}", f"data.cache_dir={cache}", "train.global_batch=4",
            "train.max_steps=3", "train.warmup_steps=1", "train.log_every=1",
            "train.eval_every=3", "train.eval_batches=2", *extra]
    return [a for s in sets for a in ("--set", s)]


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"root": root, "corpus": write_corpus(root / "corpus"), "cache": root / "cache"}


@pytest.fixture(scope="module")
def run(env):
    """A trained tiny run made with `tdlm train` (the happy path's first half)."""
    out = env["root"] / "run"
    rc = main(["train", "--preset", "tiny", "--out", str(out), "--no-progress",
               *tiny_sets(env["corpus"], env["cache"])])
    assert rc == 0
    return out


def one_error_line(capsys, rc: int, *needles: str) -> str:
    """Assert the CLI error convention and return the message."""
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


# ---- happy path -------------------------------------------------------------------------------
def test_train_eval_sample(run, capsys):
    assert (run / "checkpoints" / "latest").is_file()
    for name in ("config.json", "metrics.jsonl", "loss_curve.png", "data.json"):
        assert (run / name).is_file(), name
    capsys.readouterr()

    vals = []
    for _ in range(2):
        assert main(["eval", str(run), "--json", "--batches", "2", "--seed", "3"]) == 0
        out = capsys.readouterr().out
        res = json.loads(out)
        saved = json.loads((run / "eval" / "metrics.json").read_text())
        assert saved == res
        for k in ("nelbo_per_token", "ppl_bound", "bits_per_token", "tokens", "data_layout"):
            assert k in res, k
        assert res["data_layout"] == "packed" and res["tokens"] > 0
        assert res["ppl_bound"] == pytest.approx(2.718281828 ** res["nelbo_per_token"], rel=1e-6)
        assert res["bits_per_token"] == pytest.approx(res["nelbo_per_token"] / 0.6931471805599453)
        vals.append(res["nelbo_per_token"])
    assert vals[0] == vals[1]          # fixed seed: the same estimate

    samples = run / "s" / "samples.jsonl"
    assert main(["sample", str(run), "--num", "2", "--steps", "4", "--out", str(samples)]) == 0
    recs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(recs) == 2
    for r in recs:
        assert isinstance(r["text"], str) and len(r["ids"]) == 32
        assert all(isinstance(i, int) for i in r["ids"])
    meta = json.loads(samples.with_suffix(".meta.json").read_text())
    assert meta["steps"] == 4 and meta["num"] == 2


def test_resume_from_cli(env, run, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(run, out)
    capsys.readouterr()
    # --resume uses the run's saved config: extra settings are refused, not ignored
    rc = main(["train", "--out", str(out), "--resume", "--set", "train.max_steps=9"])
    one_error_line(capsys, rc, "--resume")
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "trained to step 3" in capsys.readouterr().out


# ---- bad input: data ----------------------------------------------------------------------------
def _train_fails(env, capsys, out: Path, *needles, sets=()):
    rc = main(["train", "--out", str(out), "--no-progress",
               *tiny_sets(env["corpus"], env["cache"], *sets)])
    msg = one_error_line(capsys, rc, *needles)
    assert not out.exists(), "a failed run must not leave a folder behind"
    return msg


def test_missing_corpus(env, tmp_path, capsys):
    missing = tmp_path / "no-such-corpus"
    _train_fails(env, capsys, tmp_path / "out", "not found", str(missing),
                 sets=[f"data.source={missing}"])


def test_empty_corpus(env, tmp_path, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "a.txt").write_text("   \n\n")
    (d / "b.txt").write_text("")
    _train_fails(env, capsys, tmp_path / "out", "empty corpus", sets=[f"data.source={d}"])
    e = tmp_path / "nofiles"
    e.mkdir()
    _train_fails(env, capsys, tmp_path / "out", "no .txt", sets=[f"data.source={e}"])


@pytest.mark.parametrize("content,needle", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary"),
    ("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, d\u00e9j\u00e0 vu".encode("latin-1"), "0xe9"),
])
def test_undecodable_corpus(env, tmp_path, capsys, content, needle):
    d = write_corpus(tmp_path / "docs", n_docs=3)
    (d / "bad.txt").write_bytes(content)
    _train_fails(env, capsys, tmp_path / "out", "not UTF-8", "bad.txt", needle,
                 sets=[f"data.source={d}"])


# ---- bad input: configuration -------------------------------------------------------------------
@pytest.mark.parametrize("args,needles", [
    (["--preset", "no-such-preset"], ["unknown preset", "no-such-preset", "tiny"]),
    (["--set", "model.d_model=-32"], ["d_model", "> 0"]),
    (["--set", "train.global_batch=0"], ["global_batch", "> 0"]),
    (["--set", "data.seq_len=0"], ["seq_len"]),
    (["--set", "train.max_steps=abc"], ["max_steps", "number"]),
    (["--set", "train.max_steps=2.5"], ["max_steps", "integer"]),
    (["--set", "model.time_conditioning=3"], ["time_conditioning", "true/false"]),
    (["--set", "train.no_such_field=1"], ["unknown config field", "train.no_such_field"]),
    (["--set", "nosection.x=1"], ["unknown config section"]),
    (["--set", "model.family=gpt"], ["family", "mdlm"]),
    (["--set", "data.seq_len=64"], ["seq_len", "max_seq_len"]),
    (["--set", "train.micro_batch=3"], ["micro_batch", "multiple"]),
    (["--set", "justtext"], ["section.field=value"]),
    (["--config", "/no/such/config.json"], ["config file not found"]),
])
def test_invalid_config(env, tmp_path, capsys, args, needles):
    out = tmp_path / "out"
    rc = main(["train", "--out", str(out), "--no-progress",
               *tiny_sets(env["corpus"], env["cache"]), *args])
    one_error_line(capsys, rc, *needles)
    assert not out.exists()


def test_usage_errors_are_one_line(run, capsys):
    for argv in (["sample"], ["sample", str(run), "--steps", "many"], ["nosuchcommand"],
                 ["train"], ["info", "--bogus"]):
        rc = main(argv)
        one_error_line(capsys, rc)
        assert rc == 2


# ---- bad input: checkpoints and outputs ----------------------------------------------------------
def test_existing_run_folder_without_resume(env, run, capsys):
    before = tree_hash(run)
    rc = main(["train", "--out", str(run), "--no-progress",
               *tiny_sets(env["corpus"], env["cache"])])
    one_error_line(capsys, rc, "already holds a run", "--resume")
    assert tree_hash(run) == before


def test_not_a_checkpoint(env, run, capsys):
    before = tree_hash(run)
    for cmd in ("sample", "eval"):
        rc = main([cmd, str(env["corpus"])])
        one_error_line(capsys, rc, "no checkpoint", str(env["corpus"]))
        rc = main([cmd, str(env["root"] / "missing")])
        one_error_line(capsys, rc, "not found")
        rc = main([cmd, str(env["corpus"] / "doc00.txt")])
        one_error_line(capsys, rc, "not a tdlm checkpoint")
    assert tree_hash(run) == before


def test_truncated_and_altered_checkpoint(run, tmp_path, capsys):
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    bad = tmp_path / "bad"
    shutil.copytree(latest, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    before = tree_hash(bad)
    for cmd in (["eval", str(bad)], ["sample", str(bad), "--num", "1", "--steps", "2"]):
        rc = main(cmd)
        one_error_line(capsys, rc, "corrupt", "model.safetensors")
    assert tree_hash(bad) == before and not (tmp_path / "eval").exists()
    alt = tmp_path / "alt"
    shutil.copytree(latest, alt)
    (alt / "trainer.json").write_text((alt / "trainer.json").read_text() + " ")
    one_error_line(capsys, main(["eval", str(alt)]), "corrupt", "trainer.json")


def test_checkpoint_of_another_family(run):
    import tdlm
    from tdlm.errors import CheckpointError
    with pytest.raises(CheckpointError, match="holds a 'mdlm' model, expected 'ar'") as ei:
        tdlm.load(run, expect_family="ar")
    assert "\n" not in str(ei.value)
    assert tdlm.load(run, expect_family="mdlm").cfg.model.family == "mdlm"


@pytest.mark.parametrize("args,needles", [
    (["--steps", "0"], ["--steps", ">= 1"]),
    (["--num", "0"], ["--num"]),
    (["--seq-len", "64"], ["--seq-len 64", "max_seq_len 32"]),
    (["--seq-len", "0"], ["--seq-len"]),
    (["--temperature", "0"], ["--temperature"]),
    (["--top-p", "1.5"], ["--top-p"]),
])
def test_bad_sample_arguments(run, capsys, args, needles):
    before = tree_hash(run)
    rc = main(["sample", str(run), *args])
    one_error_line(capsys, rc, *needles)
    assert tree_hash(run) == before


def test_bad_eval_arguments(run, capsys):
    one_error_line(capsys, main(["eval", str(run), "--batches", "-1"]), "--batches")
    one_error_line(capsys, main(["eval", str(run), "--repeats", "0"]), "--repeats")


def test_unwritable_output_folder(env, run, tmp_path, capsys):
    ro = tmp_path / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write to a 0o500 folder (root)")
        rc = main(["train", "--out", str(ro / "run"), "--no-progress",
                   *tiny_sets(env["corpus"], env["cache"])])
        one_error_line(capsys, rc, "not writable", str(ro / "run"))
        rc = main(["eval", str(run), "--batches", "1", "--out", str(ro / "ev")])
        one_error_line(capsys, rc, "permission denied")
        rc = main(["sample", str(run), "--num", "1", "--steps", "2",
                   "--out", str(ro / "s.jsonl")])
        one_error_line(capsys, rc, "permission denied")
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o700)


def test_output_path_is_a_file(env, run, tmp_path, capsys):
    """Also covers unwritable outputs when running as root (chmod does not stop root)."""
    f = tmp_path / "afile"
    f.write_text("keep me")
    rc = main(["train", "--out", str(f), "--no-progress", *tiny_sets(env["corpus"], env["cache"])])
    one_error_line(capsys, rc, "is a file")
    rc = main(["train", "--out", str(f / "run"), "--no-progress",
               *tiny_sets(env["corpus"], env["cache"])])
    one_error_line(capsys, rc, "not writable", str(f / "run"))
    rc = main(["eval", str(run), "--batches", "1", "--out", str(f / "ev")])
    one_error_line(capsys, rc, str(f))
    rc = main(["sample", str(run), "--num", "1", "--steps", "2", "--out", str(f / "s.jsonl")])
    one_error_line(capsys, rc, str(f))
    assert f.read_text() == "keep me"


# ---- the real entry point ---------------------------------------------------------------------
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tdlm.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_subprocess_errors_have_no_traceback(env, tmp_path):
    d = write_corpus(tmp_path / "docs", n_docs=3)
    (d / "bad.txt").write_bytes("na\u00efve".encode("latin-1"))
    p = _cli("train", "--out", str(tmp_path / "o"), "--no-progress",
             *tiny_sets(d, env["cache"]), cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ")
    assert "not UTF-8" in p.stderr and "Traceback" not in p.stderr
    p = _cli("sample", str(tmp_path), "--steps", "0", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--steps" in p.stderr


def test_tree_hook_is_optional():
    # `tdlm tree` appears only when tdlm.tree.cli provides add_tree_parser
    ap = build_parser()
    sub = next(a for a in ap._actions if a.dest == "cmd")
    assert {"run", "train", "eval", "sample", "info"} <= set(sub.choices)
    try:
        from tdlm.tree.cli import add_tree_parser  # noqa: F401
    except ImportError:
        assert "tree" not in sub.choices
    else:
        assert "tree" in sub.choices
