"""GPU code paths of the training loop: bf16 autocast, torch.compile of the blocks, fused
AdamW, flash-first SDPA, the nccl backend.

On the CPU (always run): ``resolve_runtime`` turns every GPU option off for a CPU device and on
(as configured) for a CUDA device; it agrees with ``autocast_ctx``; the optimizer and the SDPA
context follow it; and a CPU run configured with ``precision=bf16`` and ``compile=true`` trains
exactly like the plain fp32 run (the options really are off).

With CUDA (skipped cleanly otherwise): autocast computes in bf16, fused AdamW steps, the
flash-first SDPA context gives the math kernel's result, a bf16 + compile training run is
finite and its checkpoint loads on the CPU, and (two or more GPUs) 2-rank DDP over nccl
runs to completion and writes a checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tdlm.config import TrainConfig
from tdlm.families.base import autocast_ctx
from tdlm.train.checkpoint import load_checkpoint
from tdlm.train.parallel import backend_for
from tdlm.train.loop import make_optimizer, resolve_runtime, sdpa_context, train
from tdlm.train.step import cpu_compiler

from test_cli import write_corpus  # noqa: E402
from test_train import tiny_cfg  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("compile_", [False, True])
def test_runtime_options_by_device(precision, compile_):
    tc = TrainConfig(precision=precision, compile=compile_)
    cpu = resolve_runtime(tc, torch.device("cpu"))
    assert (cpu.autocast_bf16, cpu.flash_sdpa) == (False,) * 2
    assert cpu.fused_adamw                  # PyTorch's fused AdamW has a CPU kernel
    assert cpu.compile == (compile_ and cpu_compiler() is not None)   # inductor needs a C++ compiler
    assert cpu.backend == "gloo" == backend_for(torch.device("cpu"))
    gpu = resolve_runtime(tc, torch.device("cuda", 0))    # no CUDA needed to resolve
    assert gpu.autocast_bf16 == (precision == "bf16")
    assert gpu.compile == compile_
    assert gpu.fused_adamw and gpu.flash_sdpa
    assert gpu.backend == "nccl" == backend_for(torch.device("cuda", 0))


def test_cpu_contexts_and_optimizer_follow_the_options():
    tc = TrainConfig(precision="bf16", compile=True)
    cpu = resolve_runtime(tc, torch.device("cpu"))
    # autocast: the families' context is a no-op on the CPU, as the options say
    assert isinstance(autocast_ctx(torch.device("cpu"), "bf16"), contextlib.nullcontext)
    with autocast_ctx(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert isinstance(sdpa_context(cpu), contextlib.nullcontext)
    p = [torch.nn.Parameter(torch.ones(3))]
    assert make_optimizer(p, tc, cpu).defaults.get("fused")       # fused AdamW on the CPU too
    gpu = resolve_runtime(tc, torch.device("cuda", 0))
    assert make_optimizer(p, tc, gpu).defaults["fused"] is True
    # the flash-first context restricts nothing a CPU attention needs (math stays allowed)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    with sdpa_context(gpu):
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), ref)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    return write_corpus(root / "corpus"), root / "cache"


def test_cpu_run_ignores_gpu_options(data, tmp_path):
    """bf16 requested on the CPU: the same losses and weights as fp32 (bf16 autocast would
    change the float results). ``train.compile`` does compile on the CPU now (when a C++
    compiler is there): tests/train/test_lean_step.py."""
    corpus, cache = data
    base = ("train.max_steps=2", "train.eval_every=100", "train.device=cpu")
    plain = train(tiny_cfg(corpus, cache, *base), tmp_path / "plain", progress=False,
                  log=lambda s: None)
    gpu_opts = train(tiny_cfg(corpus, cache, *base, "train.precision=bf16"),
                     tmp_path / "opts", progress=False, log=lambda s: None)
    assert gpu_opts.losses == plain.losses and all(math.isfinite(x) for x in plain.losses)
    a, b = load_checkpoint(plain.run_dir), load_checkpoint(gpu_opts.run_dir)
    for key, t in a.model_state.items():
        assert torch.equal(t, b.model_state[key]), key


# ---- CUDA ---------------------------------------------------------------------------------------
@needs_cuda
def test_cuda_autocast_and_fused_adamw():
    dev = torch.device("cuda")
    tc = TrainConfig(precision="bf16")
    opts = resolve_runtime(tc, dev)
    assert opts.autocast_bf16 and opts.fused_adamw
    with autocast_ctx(dev, "bf16"):
        assert (torch.ones(4, 4, device=dev) @ torch.ones(4, 4, device=dev)).dtype == torch.bfloat16
    lin = torch.nn.Linear(8, 8).to(dev)
    opt = make_optimizer(lin.parameters(), tc, opts)
    assert opt.defaults["fused"] is True
    lin(torch.randn(2, 8, device=dev)).sum().backward()
    before = lin.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, lin.weight)


@needs_cuda
def test_cuda_flash_sdpa_matches_math():
    dev = torch.device("cuda")
    opts = resolve_runtime(TrainConfig(precision="bf16"), dev)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, device=dev, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    with sdpa_context(opts):
        out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@needs_cuda
def test_cuda_bf16_compile_training_run(data, tmp_path):
    corpus, cache = data
    cfg = tiny_cfg(corpus, cache, "train.max_steps=3", "train.eval_every=3", "train.device=cuda",
                   "train.precision=bf16", "train.compile=true")
    res = train(cfg, tmp_path / "cuda", progress=False, log=lambda s: None)
    assert res.step == 3 and all(math.isfinite(x) for x in res.losses)
    ck = load_checkpoint(res.run_dir)            # loads on the CPU
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in ck.model_state.values())
    # no "_orig_mod." prefixes: compiled blocks keep the single-process state-dict names
    assert not any("_orig_mod" in k for k in ck.model_state)


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_cuda_two_rank_ddp_over_nccl(data, tmp_path):
    corpus, cache = data
    cfg = tiny_cfg(corpus, cache, "train.max_steps=2", "train.eval_every=2", "train.device=auto")
    f = tmp_path / "cfg.json"
    f.write_text(cfg.to_json())
    out = tmp_path / "nccl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "tdlm.cli", "train", "--config", str(f),
                           "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(out).trainer["step"] == 2
