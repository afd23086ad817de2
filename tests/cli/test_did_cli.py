"""DID through the shared machinery: presets beside MDLM in `tdlm info`, and
`tdlm train/eval/sample` with fixed-length and variable-length DID (prompt, trajectory, lengths,
histograms, exact resume on ragged batches); the Python API."""
import json

import pytest

from tdlm.api import load
from tdlm.cli import main
from test_cli import tiny_sets, write_corpus


def info(preset, capsys):
    capsys.readouterr()
    assert main(["info", "--preset", preset, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_did_presets_have_the_mdlm_backbone(capsys):
    for did, mdlm in (("did-small", "mdlm-small"), ("did-medium", "mdlm-medium"), ("did-tiny", "tiny-gpt2")):
        d, m = info(did, capsys), info(mdlm, capsys)
        assert d["parameters"]["blocks"] == m["parameters"]["blocks"]
        # no [MASK] row (-d in the embedding, -(d+1) in the head), plus the d -> 1 rate head (+d+1)
        assert d["parameters"]["total"] == m["parameters"]["total"] - d["d_model"]


@pytest.mark.parametrize("mode,layout", [("fixed", "packed_bos"), ("variable", "varlen")])
def test_train_eval_sample(mode, layout, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    sets = tiny_sets(corpus, cache, 'model.family="did"', f'model.did_length="{mode}"',
                     f'data.layout="{layout}"', f"model.time_conditioning={'true' if mode == 'variable' else 'false'}")
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", *sets]) == 0
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if r.get("split") == "val"]
    assert val and all(r["nelbo_per_token"] > 0 for r in val)
    if layout == "varlen":
        assert (run / "length_histogram.json").exists()
    # eval
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["nelbo_per_token"] > 0 and "rate" in res["parts_per_token"] and "token" in res["parts_per_token"]
    # sample with a prompt and a trajectory
    out = tmp_path / "s.jsonl"
    assert main(["sample", str(run), "--num", "3", "--steps", "8", "--prompt", "the cat",
                 "--trajectory", "--out", str(out)]) == 0
    samples = [json.loads(l) for l in out.read_text().splitlines()]
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["family"] == "did" and meta["steps"] == 8 and meta["forward_calls"] >= 1
    pipe = load(str(run))
    prompt = pipe.tokenizer.encode("the cat")
    for s in samples:
        assert s["ids"][0] == pipe.tokenizer.bos_id and s["ids"][1:1 + len(prompt)] == prompt
        assert s["length"] == len(s["ids"]) <= 32
        if mode == "fixed":
            assert s["length"] == 32
    traj = [json.loads(l) for l in out.with_suffix(".trajectory.jsonl").read_text().splitlines()]
    assert len(traj) >= 8 and len(traj[-1]["ids"]) == 3
    lens = [[len(x) for x in rec["ids"]] for rec in traj]
    assert all(all(b >= a for a, b in zip(p, q)) for p, q in zip(lens, lens[1:]))   # text only grows
    assert (tmp_path / "s.length_histogram.json").exists()
    # validation prefixes come as BOS-led rows: DID keeps their BOS, it does not add another
    out2 = tmp_path / "v.jsonl"
    assert main(["sample", str(run), "--num", "1", "--steps", "4", "--prefix-from-val", "3",
                 "--out", str(out2)]) == 0
    for s in (json.loads(l) for l in out2.read_text().splitlines()):
        assert s["ids"][0] == pipe.tokenizer.bos_id != s["ids"][1]
    # the Python API
    ids = pipe.generate_ids(2, 4, seed=1)
    assert len(ids) == 2 and all(int(x[0]) == pipe.tokenizer.bos_id for x in ids)
    assert pipe.nelbo(["the cat sat on the mat"], repeats=2)["nelbo_per_token"] > 0


def test_a_layout_the_family_does_not_take_is_refused(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    sets = tiny_sets(corpus, tmp_path / "cache", 'data.layout="packed"')
    capsys.readouterr()
    assert main(["train", "--preset", "did-tiny", "--out", str(tmp_path / "r"), "--no-progress",
                 *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.layout" in err[0] and "BOS-led" in err[0]


def test_mdlm_keep_first_conditions_on_bos_like_did():
    """diffusion.keep_first: position 0 is never masked and not counted, so MDLM's NELBO per
    token is per modeled (non-BOS) token, as DID's."""
    import torch
    from tdlm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
    from tdlm.families import get_family
    cfg = RunConfig(model=ModelConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, cond_dim=8,
                                      max_seq_len=8, dropout=0.0),
                    diffusion=DiffusionConfig(keep_first=True), data=DataConfig(seq_len=8))
    fam = get_family(cfg)
    model = fam.build_model()
    x = torch.randint(0, 10, (64, 8))
    x[:, 0] = 10 - 1
    seen = []
    model.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    terms = fam.loss(model, {"input_ids": x}, torch.Generator().manual_seed(0), exact=True)
    z = seen[-1]
    assert torch.equal(z[:, 0], x[:, 0])                   # BOS never masked
    assert (z[:, 1:] == fam.mask_id).any()                  # the rest is noised
    assert torch.equal(terms.n_tokens, torch.full((64,), 7.0))


def test_keep_first_mdlm_samples_start_with_its_bos(tmp_path, capsys):
    """The DID comparison's MDLM (packed [BOS] rows, position 0 never masked: keep_first)
    samples rows that start with BOS, with or without a prompt (a prompt goes after the BOS,
    as text follows it in every training row)."""
    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    sets = tiny_sets(corpus, tmp_path / "cache", 'data.layout="packed_bos"',
                     "family.keep_first=true")
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", *sets]) == 0
    pipe = load(str(run))
    bos, prompt = pipe.tokenizer.bos_id, pipe.tokenizer.encode("the cat")
    for extra in ([], ["--prompt", "the cat"]):
        out = tmp_path / f"s{len(extra)}.jsonl"
        assert main(["sample", str(run), "--num", "3", "--steps", "6", "--out", str(out),
                     *extra]) == 0
        for s in (json.loads(l) for l in out.read_text().splitlines()):
            assert s["ids"][0] == bos
            if extra:
                assert s["ids"][1:1 + len(prompt)] == prompt
