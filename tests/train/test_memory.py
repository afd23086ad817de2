"""The memory simulator (``tdlm.train.memory``, ``tdlm fit``) against exact counts.

* a Linear + cross-entropy step counted by hand (12 N V bytes at its peak);
* parameters and AdamW/EMA state by formula (fp32: 4 + 8 bytes per parameter, 4 per step
  counter, 4 per EMA weight; CUDA: every block rounded up to 512 bytes);
* the simulated step (fake tensors) equals the same byte counter run on the real CPU step
  of a small model, exactly for MDLM (no data-dependent shapes), as an upper bound for TDLM
  (its head is counted on every position, the real step on the moved ones);
* monotone in the micro-batch; checkpointing lowers the activations; the chunked MDLM head
  lowers the peak; CUDA's autocast lists, flash attention and fused dropout are applied;
* the largest micro-batch search and ``train.micro_batch = "auto"`` validation.
"""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from tdlm.config import RunConfig, TrainConfig
from tdlm.errors import ConfigError
from tdlm.train.fake_step import CUDA_BLOCK, CudaPolicy, LiveBytes, forward_phase
from tdlm.train.memory import (Target, auto_micro_batch, estimate_memory, largest_micro_batch,
                               parse_capacity)
from tdlm.train.parallel import derive_micro
from tdlm.train.step import family_for, single_process, train_step

V, L = 500, 32


def small(family="mdlm", ckpt=False, ema=0.0, **fam):
    f = {"name": "mdlm", "head_impl": "reference", **fam} if family == "mdlm" \
        else {"name": "tdlm", "K": 24, "H": 2}
    return RunConfig.from_dict({
        "version": 2, "family": f,
        "backbone": {"vocab_size": V, "d_model": 32, "n_layers": 1, "n_heads": 2,
                     "cond_dim": 16, "max_seq_len": L, "dropout": 0.1},
        "data": {"seq_len": L}, "train": {"global_batch": 4, "ema": ema,
                                          "activation_checkpointing": ckpt}})


_CACHE: dict = {}          # (variant, B) -> estimate, CUDA bf16: shared by the tests below


def cuda_bf16(B, variant="plain"):
    """The CUDA bf16 estimate of ``small()`` (plain), with checkpointing (ckpt) or the
    chunked head (chunked), made once per module."""
    if (variant, B) not in _CACHE:
        cfg = {"plain": small, "ckpt": lambda: small(ckpt=True),
               "chunked": lambda: small(head_impl="chunked", head_chunk=16)}[variant]()
        _CACHE[(variant, B)] = estimate_memory(cfg, B, Target("cuda", "bf16"))
    return _CACHE[(variant, B)]


def plain_cache() -> dict:
    return {b: e for (v, b), e in _CACHE.items() if v == "plain"}


def test_linear_cross_entropy_by_hand():
    N, d, C = 64, 16, 300
    tr = LiveBytes()
    with FakeTensorMode(), tr:
        W = torch.empty(C, d, requires_grad=True)
        x, t = torch.empty(N, d), torch.zeros(N, dtype=torch.long)
        base = tr.current
        tr.reset_peak()
        F.cross_entropy(F.linear(x, W), t).backward()
        tr.finish()
        # forward: logits and log-probabilities (8NC); backward of log_softmax: the saved
        # log-probabilities, the nll_loss gradient and the logits' gradient (12NC)
        assert 0 <= tr.peak - base - 12 * N * C <= 64      # + a few scalars
        assert tr.current - base == 4 * C * d             # W.grad is all that is left
        assert W.grad is not None


def _param_bytes(model, block=1):
    r = lambda n: -(-n // block) * block
    params = [p for p in model.parameters()]
    return params, sum(r(4 * p.numel()) for p in params)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_static_memory_by_formula(device):
    cfg = small(ema=0.9)
    e = estimate_memory(cfg, 1, Target(device, "fp32"))
    model = family_for(cfg).build_model()
    block = CUDA_BLOCK if device == "cuda" else 1
    params, pbytes = _param_bytes(model, block)
    buffers = sum(-(-b.numel() * b.element_size() // block) * block for b in model.buffers())
    n = len(params)
    assert e.n_params == sum(p.numel() for p in params)
    assert e.breakdown["parameters"] == pbytes + buffers
    # AdamW: two fp32 moments and a 4-byte step counter per tensor; EMA: one fp32 copy
    assert e.breakdown["optimizer"] == 3 * pbytes + n * (-(-4 // block) * block)
    assert e.static_bytes == e.breakdown["parameters"] + e.breakdown["optimizer"]
    assert e.peak_bytes == sum(e.breakdown.values())


def _real_peak(cfg, B):
    family = family_for(cfg)
    tr = LiveBytes(1, fake=False)
    with tr:
        torch.manual_seed(0)
        model = family.build_model()
        model.train()
        ctx = single_process(family, model, cfg, torch.device("cpu"), micro=B)
        x = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0))
        train_step(ctx, {"input_ids": x}, 0)          # creates the AdamW state
        tr.reset_peak()
        train_step(ctx, {"input_ids": x}, 1)
    return tr.peak


@pytest.mark.parametrize("family,ckpt", [("mdlm", False), ("mdlm", True), ("tdlm", False)])
def test_simulation_equals_the_real_count(family, ckpt):
    cfg = small(family, ckpt, ema=0.5)
    sim = estimate_memory(cfg, 3, Target("cpu", "fp32")).peak_bytes
    real = _real_peak(cfg, 3)
    if family == "mdlm":
        assert sim == real
    else:           # TDLM's head on every position (worst case) vs the moved ones
        assert real <= sim <= real * 1.02


def test_monotone_in_batch_and_checkpointing_lowers_activations():
    peaks = [cuda_bf16(b) for b in (1, 3)]
    assert peaks[0].peak_bytes < peaks[1].peak_bytes
    ck = cuda_bf16(3, "ckpt")
    assert ck.breakdown["activations"] < peaks[1].breakdown["activations"]
    assert ck.peak_bytes < peaks[1].peak_bytes
    assert peaks[1].kernels.get("flash attention") == 1          # one per block
    assert peaks[1].kernels.get("fused dropout (1-byte mask)") == 2


def test_chunked_head_lowers_the_peak():
    assert cuda_bf16(3, "chunked").peak_bytes < cuda_bf16(3).peak_bytes


def test_cuda_policy_casts_like_cuda_autocast():
    tr, pol = LiveBytes(), CudaPolicy()
    with FakeTensorMode(), tr, pol, forward_phase(tr, torch.bfloat16):
        x = torch.empty(4, 8)
        w = torch.empty(8, 8, requires_grad=True)
        h = F.linear(x, w)
        assert h.dtype == torch.bfloat16                  # lower-precision list (both)
        assert torch.exp(h).dtype == torch.float32        # fp32 on CUDA, not on the CPU
        assert F.softmax(h, -1).dtype == torch.float32    # fp32 output (set_opt_dtype)
        assert h.sum().dtype == torch.float32
        assert (h ** 2).dtype == torch.float32            # __pow__: fp32 on CUDA
        assert F.gelu(h).dtype == torch.bfloat16          # in no list
        assert h.exp_().dtype == torch.bfloat16           # in-place ops are not autocast
        q = torch.empty(2, 4, 256, 32, requires_grad=True)
        base = tr.current
        out = F.scaled_dot_product_attention(q, q, q)
        assert out.dtype == torch.bfloat16
        # flash: the bf16 q, k, v copy, O and the fp32 log-sum-exp; no 256 x 256 matrix
        assert tr.current - base < 2 * 4 * 256 * 256 * 2
    assert pol.kernels["flash attention"] == 1
    assert pol.corrections["exp"] == 1 and pol.corrections["softmax"] == 1


def test_largest_micro_batch_is_the_boundary():
    cfg, tgt = small(), Target("cuda", "bf16")
    p = {b: cuda_bf16(b).peak_bytes for b in (1, 2, 3, 4)}
    assert p[1] < p[2] < p[3] < p[4]
    cache = plain_cache()
    fit = largest_micro_batch(cfg, (p[3] + p[4]) // 2, tgt, cache=cache, limit=4)
    assert fit.micro_batch == 3 and fit.estimate.peak_bytes == p[3]
    assert largest_micro_batch(cfg, p[4], tgt, cache=cache, limit=4).micro_batch == 4
    assert largest_micro_batch(cfg, p[3], tgt, candidates=[1, 2, 4], cache=cache).micro_batch == 2
    assert largest_micro_batch(cfg, p[1] - 1, tgt, cache=cache).micro_batch == 0


def test_parse_capacity():
    assert parse_capacity("24") == ("24 GiB", 24 * 2**30)
    assert parse_capacity("40GB")[1] == 40 * 2**30
    for bad in ("abc", "-1"):
        with pytest.raises(ConfigError):
            parse_capacity(bad)


def test_micro_batch_auto_config():
    assert TrainConfig(micro_batch="auto").micro_batch == "auto"
    cfg = small().override(["train.micro_batch=auto"])
    assert cfg.train.micro_batch == "auto"
    assert RunConfig.from_dict(cfg.to_dict()).train.micro_batch == "auto"
    for bad in ("big", -1, True, 1.5):
        with pytest.raises(ConfigError, match="train.micro_batch"):
            TrainConfig(micro_batch=bad)
    with pytest.raises(ConfigError, match="train.micro_batch"):
        small().override(["train.micro_batch=big"])
    assert derive_micro(32, "auto", 1, largest=5) == (4, 8)
    assert derive_micro(32, "auto", 2, largest=100) == (16, 1)
    with pytest.raises(ConfigError, match="auto"):
        derive_micro(32, "auto", 1)
    with pytest.raises(ConfigError, match="CUDA"):
        auto_micro_batch(small(), family_for(small()), 1, "cpu")


def test_micro_batch_auto_on_a_cuda_device(monkeypatch):
    """The device's memory is all that is CUDA here: the estimate runs on fake tensors."""
    cfg = small()
    cfg.train.global_batch, cfg.train.precision = 12, "bf16"
    p3, p4 = cuda_bf16(3).peak_bytes, cuda_bf16(4).peak_bytes

    class Props:
        total_memory = int((p3 + p4) / 2 / 0.9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props())
    micro, fit = auto_micro_batch(cfg, family_for(cfg), 1, "cuda", cache=plain_cache())
    assert micro == 3 and fit.estimate.peak_bytes == p3        # 3 divides 12, 4 does not fit
