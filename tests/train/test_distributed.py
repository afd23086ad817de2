"""Multi-process training (tdlm.train.parallel) with real processes: 2 ranks over gloo on
the CPU, launched exactly as the README says (``python -m torch.distributed.run
--nproc_per_node 2 ... tdlm train``; ``--standalone`` picks a free port).

What is checked:

* DDP, 2 ranks, micro-batch 2, global batch 4 (so one micro-batch per rank), with dropout,
  EMA, clipping: the final weights, EMA and AdamW state and the logged losses equal the
  single-process run with the same ``micro_batch`` (accumulation 2), and both ranks end with
  identical parameters.
* FSDP (``train.parallel=fsdp``), 2 ranks, resuming a single-process checkpoint (full state
  cut into shards): it finishes with the single-process run's weights, EMA and AdamW state
  (allclose), and the checkpoint rank 0 writes is the single-process format (same files,
  tensor names, shapes, optimizer layout) and loads with ``load_checkpoint`` and ``tdlm.load``
  in a single process.
* DDP on ragged (varlen, DID) batches whose micro-batches do not divide evenly among the
  ranks (weight-0 fillers keep the ranks in step) equals the single-process run.
* A NaN loss on one rank stops every rank with the one-line error; the last good checkpoint
  stays.
* Without processes: the per-device micro-batch/accumulation derivation and its one-line error,
  and the sharding of a global batch (dense and ragged): the ranks' rows partition the batch.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tdlm.data.batches import collate_ragged, num_rows, split_micro
from tdlm.errors import ConfigError
from tdlm.train.checkpoint import load_checkpoint
from tdlm.train.parallel import derive_micro, rank_micro_batches
from tdlm.train.loop import train

from test_cli import write_corpus  # noqa: E402
from test_train import tiny_cfg  # noqa: E402

# dropout, EMA, clipping, cosine LR: every source of randomness and state is exercised
DIST_SET = ("train.micro_batch=2", "train.ema=0.9", "model.dropout=0.1", "train.max_steps=3",
            "train.eval_every=3", "train.ckpt_every=100", "train.lr_schedule=cosine")

# Runs `tdlm train` (the CLI entry) under torchrun; afterwards every rank also dumps the
# parameters it holds (DDP: full replicas) so that the test can compare the ranks.
_DRIVER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import tdlm.train.parallel as P
    captured = {}
    real = P.parallelize
    def wrap(loss_module, **kw):
        captured["model"] = loss_module.model
        return real(loss_module, **kw)
    if not os.environ.get("NO_CAPTURE"):    # (a captured model stays reachable to the end)
        P.parallelize = wrap
    nan_rank, nan_call = os.environ.get("NAN_RANK"), int(os.environ.get("NAN_CALL", "0"))
    if nan_rank == os.environ["RANK"]:        # this rank's loss turns NaN at that forward
        real_fwd, calls = P.LossModule.forward, [0]
        def forward(self, *a, **kw):
            terms = real_fwd(self, *a, **kw)
            if self.training:
                calls[0] += 1
                if calls[0] >= nan_call:
                    terms.nll = terms.nll * float("nan")
            return terms
        P.LossModule.forward = forward
    import gc
    import torch.distributed as dist
    real_destroy = dist.destroy_process_group
    def fsdp_objects():
        return sum("FSDP" in type(o).__name__ for o in gc.get_objects())
    def destroy(*a, **kw):      # FSDP modules that are garbage (unreachable) when the group goes
        alive = fsdp_objects()
        gc.collect()
        print(f"rank {os.environ['RANK']}: FSDP garbage at destroy: {alive - fsdp_objects()}",
              flush=True)
        return real_destroy(*a, **kw)
    dist.destroy_process_group = destroy
    from tdlm.cli import main
    rc = main(sys.argv[1:])
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    if rc == 0 and "model" in captured:
        from safetensors.torch import save_file
        sd = captured["model"].state_dict()
        if not any(hasattr(v, "to_local") for v in sd.values()):     # DDP: full tensors
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()},
                      str(out / f"rank{os.environ['RANK']}.safetensors"))
    sys.exit(rc)
""")


def torchrun(tmp: Path, *args: str, nproc: int = 2, timeout: int = 240, **env_extra):
    driver = tmp / "driver.py"
    driver.write_text(_DRIVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1",
               TDLM_DIST_TIMEOUT_S="120", **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), str(driver), "train", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(root / "corpus")
    cache = root / "cache"
    cfg = tiny_cfg(corpus, cache, *DIST_SET)
    # the single-process reference (also trains the tokenizer into the shared cache)
    ref = train(cfg, root / "single", progress=False, log=lambda s: None)
    return root, corpus, cache, cfg, ref


def _train_losses(run: Path) -> list:
    return [(r["step"], r["split"], r.get("loss"), r.get("nelbo_per_token"))
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _assert_close_states(ck, ref, rtol=1e-5, atol=1e-6):
    assert ck.model_state.keys() == ref.model_state.keys()
    for k, v in ref.model_state.items():
        assert ck.model_state[k].shape == v.shape and ck.model_state[k].dtype == v.dtype, k
        torch.testing.assert_close(ck.model_state[k], v, rtol=rtol, atol=atol, msg=k)
    assert ck.ema_state.keys() == ref.ema_state.keys()
    for k, v in ref.ema_state.items():
        torch.testing.assert_close(ck.ema_state[k], v, rtol=rtol, atol=atol, msg=f"ema {k}")
    o1, o2 = ck.optimizer_state(), ref.optimizer_state()
    assert o1["param_groups"] == o2["param_groups"]
    assert o1["state"].keys() == o2["state"].keys()
    for pid in o2["state"]:
        for k, v in o2["state"][pid].items():
            torch.testing.assert_close(o1["state"][pid][k], v, rtol=rtol, atol=atol,
                                       msg=f"optimizer {pid}.{k}")


def _assert_trained(ck):
    """The weights moved away from the initialisation (so equality is not trivial)."""
    from tdlm.families import get_family
    torch.manual_seed(ck.config.train.seed)
    init = get_family(ck.config).build_model().state_dict()
    moved = [k for k in init if not torch.allclose(init[k], ck.model_state[k], atol=1e-4)]
    assert len(moved) > len(init) // 2


def _assert_close_metrics(run: Path, ref: Path):
    a, b = _train_losses(run), _train_losses(ref)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for x, y in zip(a, b):
        for u, v in zip(x[2:], y[2:]):
            assert (u is None) == (v is None)
            if u is not None:
                assert u == pytest.approx(v, rel=1e-6)


def test_ddp_two_ranks_equal_single_process(setup):
    root, _, _, cfg, ref = setup
    cfg_file = root / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    out = root / "ddp"
    proc = torchrun(root, "--config", str(cfg_file), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ck, ck_ref = load_checkpoint(out), load_checkpoint(ref.run_dir)
    assert ck.trainer["step"] == ck_ref.trainer["step"] == cfg.train.max_steps
    _assert_trained(ck_ref)
    _assert_close_states(ck, ck_ref)
    _assert_close_metrics(out, ref.run_dir)
    # both ranks hold the same replica, equal to what rank 0 saved
    from safetensors.torch import load_file
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert r0.keys() == r1.keys() == ck.model_state.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], ck.model_state[k]), k
    # only rank 0 wrote: one set of metrics records, no stray files
    recs = _train_losses(out)
    assert len(recs) == len(set((r[0], r[1]) for r in recs))


def test_fsdp_resumes_and_writes_single_process_checkpoint(setup):
    """FSDP, 2 ranks, both directions of the checkpoint format: the run resumes from a
    checkpoint written by a single process (full state cut into shards), finishes with the
    single-process run's weights, EMA and AdamW state (allclose), and its own checkpoint
    (gathered by rank 0) has the single-process layout and loads with ``load_checkpoint`` and
    ``tdlm.load`` in a single process."""
    root, _, _, cfg, _ = setup
    cfg_f = cfg.override(["train.parallel=fsdp", "train.ckpt_every=1"])
    full = train(cfg_f, root / "s-full", progress=False, log=lambda s: None)
    part = root / "s-part"
    shutil.copytree(full.run_dir, part)
    last = f"step_{cfg.train.max_steps:07d}"
    shutil.rmtree(part / "checkpoints" / last)
    (part / "checkpoints" / "latest").write_text(f"step_{cfg.train.max_steps - 1:07d}\n")
    proc = torchrun(root, "--out", str(part), "--resume", NO_CAPTURE="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    # the run's FSDP modules (in reference cycles) are freed before the process group is
    # destroyed, not at interpreter exit, where gloo's threads could abort the process
    for r in (0, 1):
        assert f"rank {r}: FSDP garbage at destroy: 0" in proc.stdout, proc.stdout[-2000:]
    ck, ck_ref = load_checkpoint(part), load_checkpoint(full.run_dir)
    assert ck.path.name == last and ck.config.train.parallel == "fsdp"
    _assert_trained(ck_ref)
    _assert_close_states(ck, ck_ref)
    _assert_close_metrics(part, full.run_dir)
    # the single-process format: the same files (names, shapes, dtypes checked above)
    files = sorted(p.relative_to(ck_ref.path).as_posix() for p in ck_ref.path.rglob("*"))
    assert sorted(p.relative_to(ck.path).as_posix() for p in ck.path.rglob("*")) == files
    import tdlm
    pipe = tdlm.load(part)
    assert pipe.checkpoint.path == ck.path
    for k, v in pipe.model.state_dict().items():
        if k in ck.ema_state:
            torch.testing.assert_close(v, ck.ema_state[k].to(v.dtype))
    res = pipe.nelbo(["the small bird sees the river"])
    assert 0 < res["nelbo_per_token"] < 50


def test_ddp_ragged_uneven_micro_batches(setup):
    """DID on ragged (varlen) batches with a token budget: 6 rows of ~32 tokens, micro-batch
    3, 70 tokens -> 3 micro-batches per step for 2 ranks, so one rank also runs a weight-0
    filler; the result still equals the single-process run."""
    root, _, _, cfg, _ = setup
    rag = cfg.override(["model.family=did", "model.did_length=variable", "data.layout=varlen",
                        "train.global_batch=6", "train.micro_batch=3", "data.micro_tokens=70"])
    from tdlm.data import BatchIterator, build_data
    data = build_data(rag.data, None)
    it = BatchIterator(data.train, 6, rag.train.seed, bucket_factor=rag.data.bucket_factor)
    assert all(len(split_micro(it.batch(k), 3, 70)) % 2 == 1 for k in range(rag.train.max_steps))
    ref = train(rag, root / "rag-single", progress=False, log=lambda s: None)
    f = root / "cfg_rag.json"
    f.write_text(rag.to_json())
    out = root / "rag-ddp"
    proc = torchrun(root, "--config", str(f), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_close_states(load_checkpoint(out), load_checkpoint(ref.run_dir))
    _assert_close_metrics(out, ref.run_dir)


def test_nan_on_one_rank_stops_every_rank(setup):
    """Rank 1's loss turns NaN at step 3 (its 3rd micro-batch forward): both ranks stop with
    the one-line error (exit 2, no hang), the step-2 checkpoint stays ``latest`` and
    loadable, nothing of step 3 is written."""
    root, _, _, cfg, _ = setup
    cfg_file = root / "cfg_nan.json"
    cfg_file.write_text(cfg.override(["train.ckpt_every=1"]).to_json())
    out = root / "nan"
    proc = torchrun(root, "--config", str(cfg_file), "--out", str(out), NAN_RANK="1",
                    NAN_CALL="3")
    assert proc.returncode != 0
    errs = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    # one line per rank (torchrun may stop the second rank before it prints its line)
    assert 1 <= len(errs) <= 2, proc.stderr[-3000:]
    assert all(e.startswith("error: non-finite loss at step 3;") for e in errs), errs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["latest", "step_0000001", "step_0000002"]
    assert load_checkpoint(out).trainer["step"] == 2
    assert max(r[0] for r in _train_losses(out)) == 2


# ---- no processes ------------------------------------------------------------------------------
def test_parallel_config_field():
    from tdlm.config import TrainConfig, get_preset
    assert TrainConfig().parallel == "ddp"
    assert get_preset("tiny").override(["train.parallel=fsdp"]).train.parallel == "fsdp"
    with pytest.raises(ConfigError, match=r"'train.parallel': 'zero' is not one of ddp, fsdp"):
        get_preset("tiny").override(["train.parallel=zero"])


def test_derive_micro_and_error():
    assert derive_micro(32, 0, 1) == (32, 1)
    assert derive_micro(32, 0, 4) == (8, 1)
    assert derive_micro(32, 4, 2) == (4, 4)
    assert derive_micro(32, 16, 2) == (16, 1)
    with pytest.raises(ConfigError, match=r"divisible by world_size x micro_batch = 2 x 4 = 8") as ei:
        derive_micro(12, 4, 2)
    assert "\n" not in str(ei.value) and "train.global_batch" in str(ei.value)
    with pytest.raises(ConfigError, match="world size 3"):
        derive_micro(8, 0, 3)


def _rows(batch) -> list:
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].tolist()
        return [tuple(batch["input_ids"][a:b].tolist()) for a, b in zip(cu, cu[1:])]
    return [tuple(r.tolist()) for r in batch["input_ids"]]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_sharding_partitions_the_global_batch(world):
    g = torch.Generator().manual_seed(0)
    dense = {"input_ids": torch.randint(0, 1000, (8, 5), generator=g),
             "valid": torch.ones(8, 5, dtype=torch.bool)}
    micro = 8 // world // 2 if world < 8 else 1
    got = [rank_micro_batches(dense, micro, 0, r, world) for r in range(world)]
    # the same micro-batches as a single process, each on exactly one rank, in order
    single = split_micro(dense, micro)
    flat = [(j, mb) for share in got for j, mb, w in share if w]
    assert [j for j, _ in flat] == list(range(len(single)))
    for j, mb in flat:
        assert torch.equal(mb["input_ids"], single[j]["input_ids"])
    rows = [r for _, mb in flat for r in _rows(mb)]
    assert rows == _rows(dense)
    assert all(len(s) == len(got[0]) for s in got)           # lockstep
    assert all(w == 1.0 for s in got for _, _, w in s)        # dense: no padding needed


def test_rank_sharding_ragged_pads_with_zero_weight():
    lengths = [3, 9, 2, 7, 5, 6]
    rows = [(torch.arange(n) + 10 * i, torch.ones(n, dtype=torch.bool))
            for i, n in enumerate(lengths)]
    batch = collate_ragged(rows)
    single = split_micro(batch, 4, 10)          # token budget 10: uneven groups
    n = len(single)
    world = 2
    assert n == 5          # groups [3] [9] [2, 7] [5] [6]: one rank gets a weight-0 filler
    got = [rank_micro_batches(batch, 4, 10, r, world) for r in range(world)]
    assert all(len(s) == max(len(x) for x in got) for s in got)
    real = [(j, mb) for s in got for j, mb, w in s if w]
    assert [j for j, _ in real] == list(range(n))
    assert [r for _, mb in real for r in _rows(mb)] == _rows(batch)
    pads = [(j, mb) for s in got for j, mb, w in s if not w]
    assert len(pads) == world * max(len(x) for x in got) - n
    assert sum(num_rows(mb) for _, mb in real) == len(lengths)
