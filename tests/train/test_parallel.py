"""``tdlm.train.parallel``: the Runtime of a single process, and ``parallelize`` applying
activation checkpointing -> compile -> DDP/FSDP from outside the model.

* Activation checkpointing gives bit-identical losses and gradients (every family, dropout on,
  dense, causal and packed layouts), really recomputes each block in the backward pass, and
  is inactive in eval mode.
* State dicts keep their keys: a state dict of a plain model loads into a parallelized one and
  vice versa (strict), so checkpoints written before or without the wrappers load.
* The order is checkpointing, then compile (compile sees the checkpointed blocks); a
  checkpointed block compiled by dynamo (eager backend) computes the same losses and gradients.
* A training run with ``model.activation_checkpointing=true`` equals the plain run bit for bit.
* The single-process Runtime: collectives return their inputs, its micro-batches are the
  single-process split; ``tdlm.train.distributed`` is the same module (old imports work).
(Two-process DDP/FSDP: tests/test_distributed.py.)
"""
from __future__ import annotations

import copy

import pytest
import torch

from tdlm.config import DataConfig, ModelConfig, RunConfig
from tdlm.errors import ConfigError
from tdlm.families.base import family_names, get_family_class
from tdlm.train.parallel import (CheckpointWrapper, LossModule, Runtime, block_units,
                                 checkpoint_blocks, derive_micro, parallelize)

from test_family_conformance import batch  # noqa: E402

V, L = 24, 10
CPU = Runtime.single("cpu")


def make(name: str, dropout: float = 0.2, seed: int = 0):
    cls = get_family_class(name)
    cfg = RunConfig(model=ModelConfig(family=name, vocab_size=V, d_model=32, n_layers=2,
                                      n_heads=2, cond_dim=16, max_seq_len=L, dropout=dropout,
                                      tree_K=5, tree_H=2),
                    data=DataConfig(seq_len=L, layout=cls.layouts[0]))
    fam = cls(cfg, **cls.shape_resources(cfg))
    torch.manual_seed(seed)
    model = fam.build_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():            # zero-initialised heads/adaLN would be trivial
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return fam, model


def count_block_calls(model) -> list:
    """Forward calls of the (inner) transformer blocks, counted by hooks."""
    calls = [0]
    for unit in block_units(model):
        inner = unit.wrapped if isinstance(unit, CheckpointWrapper) else unit
        # a pre-hook: recomputation stops early, before a forward hook would run
        inner.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def loss_and_grads(wrapped, model, b, train=True):
    wrapped.train(train)
    torch.manual_seed(123)                       # dropout
    terms = wrapped(b, torch.Generator().manual_seed(7))
    loss = terms.nll.float().sum() / terms.n_tokens.sum()
    loss.backward()
    # keyed by the single-process names (without the checkpoint wrappers' level)
    return loss.detach(), {n.replace(".wrapped.", "."): p.grad.clone()
                           for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", family_names())
def test_checkpointing_is_bit_identical_and_recomputes(name):
    fam, plain = make(name)
    ckpt = copy.deepcopy(plain)
    wrapped = parallelize(LossModule(fam, ckpt), activation_checkpointing=True, compile=False,
                          parallel="ddp", runtime=CPU)
    units = block_units(ckpt)
    assert units and all(isinstance(u, CheckpointWrapper) for u in units)
    assert not any(isinstance(u, CheckpointWrapper) for u in block_units(plain))
    b = batch(fam.layouts[0], 6, 1)
    calls_p, calls_c = count_block_calls(plain), count_block_calls(ckpt)
    l0, g0 = loss_and_grads(LossModule(fam, plain), plain, b)
    l1, g1 = loss_and_grads(wrapped, ckpt, b)
    assert torch.isfinite(l0) and l0 > 0
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) == len(list(plain.parameters()))
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    assert sum(int(g.abs().sum() > 0) for g in g0.values()) > len(g0) // 2
    n = len(units)
    assert calls_p[0] == n and calls_c[0] == 2 * n        # recomputed in the backward pass
    # eval mode: the plain call, no recomputation, the same outputs
    calls_c[0] = 0
    with torch.no_grad():
        wrapped.eval()
        plain.eval()
        g = torch.Generator().manual_seed(3)
        a = LossModule(fam, plain)(b, g).nll
        c = wrapped(b, torch.Generator().manual_seed(3)).nll
    assert torch.equal(a, c) and calls_c[0] == n


def test_state_dicts_move_between_plain_and_parallelized_models():
    fam, plain = make("mdlm", seed=0)
    _, other = make("mdlm", seed=1)
    par = copy.deepcopy(other)
    parallelize(LossModule(fam, par), activation_checkpointing=True, compile=True,
                parallel="ddp", runtime=CPU)     # compile is lazy: nothing runs here
    assert par.state_dict().keys() == plain.state_dict().keys()
    assert not any("wrapped" in k or "_orig_mod" in k for k in par.state_dict())
    par.load_state_dict(plain.state_dict())     # plain (e.g. an old checkpoint) -> wrapped
    for k, v in plain.state_dict().items():
        assert torch.equal(par.state_dict()[k], v), k
    fresh = copy.deepcopy(other)
    fresh.load_state_dict(par.state_dict())     # wrapped -> plain
    for k, v in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match="Missing key"):
        par.load_state_dict({k: v for k, v in plain.state_dict().items()
                             if "blocks.0.norm1" not in k})
    checkpoint_blocks(par)                      # idempotent: no wrapper around a wrapper
    assert not any(isinstance(u.wrapped, CheckpointWrapper) for u in block_units(par))


def test_order_checkpointing_then_compile(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    fam, model = make("ar")
    out = parallelize(LossModule(fam, model), activation_checkpointing=True, compile=True,
                      parallel="fsdp", runtime=CPU)
    assert isinstance(out, LossModule) and out.model is model     # single process: no wrapper
    assert compiled == block_units(model) and all(isinstance(u, CheckpointWrapper)
                                                  for u in compiled)
    with pytest.raises(ConfigError, match="'zero' is not one of ddp, fsdp"):
        parallelize(model, activation_checkpointing=False, compile=False, parallel="zero",
                    runtime=CPU)


def test_compiled_checkpointed_blocks_match_plain():
    """What CUDA runs with ``train.compile`` and checkpointing: dynamo traces the checkpointed
    block (with its Layout argument); the eager backend keeps the arithmetic, so equal."""
    import torch._dynamo
    torch._dynamo.reset()
    for name in ("mdlm", "did"):                 # dense and packed layouts
        fam, plain = make(name, dropout=0.0)
        comp = copy.deepcopy(plain)
        checkpoint_blocks(comp)
        for unit in block_units(comp):
            unit.compile(backend="eager")
        b = batch(fam.layouts[0], 4, 2)
        l0, g0 = loss_and_grads(LossModule(fam, plain), plain, b)
        l1, g1 = loss_and_grads(LossModule(fam, comp), comp, b)
        torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=k)
    torch._dynamo.reset()


def test_single_process_runtime(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = Runtime.from_env("cpu")
    assert (rt.rank, rt.world_size, rt.is_main, rt.distributed) == (0, 1, True, False)
    assert rt.device == torch.device("cpu")
    assert rt.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert rt.agree(True) and not rt.agree(False)
    rt.barrier()
    rt.teardown()
    from tdlm.data.batches import split_micro
    b = batch("crop_pad", 8, 0)
    got = rt.micro_batches(b, 2, 0)
    assert [j for j, _, _ in got] == [0, 1, 2, 3] and all(w == 1.0 for _, _, w in got)
    for (_, mb, _), ref in zip(got, split_micro(b, 2)):
        assert torch.equal(mb["input_ids"], ref["input_ids"])


def test_old_import_path_is_the_same_module():
    import tdlm.train.distributed as D
    import tdlm.train.parallel as P
    assert D is P
    from tdlm.train.distributed import LossModule as LM, backend_for, rank_micro_batches  # noqa
    assert LM is LossModule and backend_for(torch.device("cpu")) == "gloo"


def test_single_process_step_context_uses_the_one_micro_batch_rule(tmp_path):
    from tdlm.train.step import single_process
    fam, model = make("mdlm", dropout=0.0)
    cfg = fam.cfg
    cfg.train.global_batch, cfg.train.micro_batch = 8, 0
    ctx = single_process(fam, model, cfg, torch.device("cpu"))
    assert ctx.micro == derive_micro(8, 0, 1)[0] == 8 and ctx.device == torch.device("cpu")
    cfg.train.micro_batch = 2
    cfg.model.activation_checkpointing = True
    _, model2 = make("mdlm", dropout=0.0)
    ctx = single_process(fam, model2, cfg, torch.device("cpu"))
    assert ctx.micro == 2
    assert all(isinstance(u, CheckpointWrapper) for u in block_units(model2))


def test_training_run_with_checkpointing_equals_plain(tmp_path):
    from test_cli import write_corpus  # noqa: E402
    from test_train import tiny_cfg  # noqa: E402
    from tdlm.store.checkpoint import load_checkpoint
    from tdlm.train.loop import train
    corpus = write_corpus(tmp_path / "corpus")
    base = ("train.max_steps=3", "train.eval_every=3", "model.dropout=0.1",
            "train.micro_batch=2", "train.ema=0.9")
    runs = []
    for ac in ("false", "true"):
        cfg = tiny_cfg(corpus, tmp_path / "cache", *base, f"model.activation_checkpointing={ac}")
        runs.append(train(cfg, tmp_path / f"ac-{ac}", progress=False, log=lambda s: None))
    assert runs[0].losses == runs[1].losses and runs[0].val == runs[1].val
    a, b = (load_checkpoint(r.run_dir) for r in runs)
    assert a.model_state.keys() == b.model_state.keys()
    for k, v in a.model_state.items():
        assert torch.equal(v, b.model_state[k]), k
    for k, v in a.ema_state.items():
        assert torch.equal(v, b.ema_state[k]), k
