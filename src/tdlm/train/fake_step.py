"""The machinery behind :mod:`tdlm.train.memory`: the library's own ``train_step`` run on fake
tensors (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes, dtypes and devices, no
data, no compute), with every live byte counted.

* :class:`LiveBytes` (a ``TorchDispatchMode`` under autograd) sees every tensor an ATen op
  returns, keys it by its storage (views are free) and frees it when the storage dies (a weak
  reference). It keeps the current and peak live bytes and, at the peak, how many of them were
  parameters, gradients, optimizer state, activations (allocated during the forward pass and
  still alive) and temporaries (everything else). Sizes are rounded up as the CUDA caching
  allocator rounds them (512 bytes) when simulating CUDA. Data-dependent ops get their worst
  case: a boolean mask selects every position (``nonzero`` returns all indices), so a head
  applied to "the moved positions" is counted as applied to all of them; ``.item()`` returns 1.
* :class:`CudaPolicy` (a ``TorchFunctionMode`` above autograd) makes a CPU-only torch behave
  like CUDA where the step's memory depends on it. Fake CUDA tensors are not usable on a
  CPU-only build (autograd's gradient accumulator aborts the process on a CUDA device), so the
  simulation runs on fake CPU tensors and applies CUDA's choices itself:

  - **autocast**: bf16 autocast runs through ``torch.autocast("cpu", dtype=torch.bfloat16)``
    (same cast cache of the weights, re-entered by activation checkpointing in recompute);
    where CUDA's cast lists (``aten/src/ATen/autocast_mode.h``) differ from the CPU's for an op,
    CUDA's is applied here: :data:`CUDA_FP32` ops get fp32 inputs, :data:`CUDA_FP32_OUT` ops an
    fp32 ``dtype=``, :data:`CUDA_LOWER` ops bf16 inputs, :data:`CUDA_PROMOTE` ops their widest
    input type, and :data:`CPU_ONLY_FP32` ops run without the CPU's upcast. Each correction
    applied is counted (``CudaPolicy.corrections``) and reported.
  - **attention**: ``F.scaled_dot_product_attention`` becomes the kernel CUDA picks first under
    the trainer's flash-first order: flash attention (bf16/fp16, no mask, head dim <= 256 and
    a multiple of 8; saves O and the fp32 log-sum-exp), else memory-efficient attention (fp32 or
    with a mask; O and the log-sum-exp), else the math kernel (the L x L matrix). Flash
    backward's fp32 dQ accumulator and softmax row sums are added as a kernel workspace.
  - **dropout**: CUDA's fused ``native_dropout`` (a 1-byte mask saved for backward) instead of
    the CPU's multiply by a noise tensor of the input's dtype.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_DEVICE = torch.ops.prim.device.default
CUDA_BLOCK = 512            # the CUDA caching allocator rounds every block up to 512 bytes

# CUDA autocast cast lists where they differ from the CPU's (by Python function name)
CUDA_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "__rtruediv__",
    "__rdiv__", "softplus", "layer_norm", "group_norm", "cosine_similarity", "dist", "pdist",
    "renorm", "logsumexp", "norm", "frobenius_norm", "nuclear_norm"})
CUDA_FP32_OUT = frozenset({"softmax", "log_softmax", "cumprod", "cumsum", "sum",
                           "linalg_vector_norm", "vector_norm", "linalg_matrix_norm",
                           "matrix_norm"})
CUDA_LOWER = frozenset({"addmv", "addr", "einsum", "mv", "chain_matmul", "multi_dot",
                        "linalg_multi_dot", "lstm_cell", "gru_cell", "rnn_tanh_cell",
                        "rnn_relu_cell"})
CUDA_PROMOTE = frozenset({"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot",
                          "tensordot", "scatter_add"})
CPU_ONLY_FP32 = frozenset({"binary_cross_entropy", "polar", "quantile", "nanquantile",
                           "stft", "trace", "view_as_complex", "avg_pool3d", "max_pool3d",
                           "adaptive_avg_pool3d", "ctc_loss"})
_LOW = (torch.bfloat16, torch.float16)


def _is_low(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in _LOW


def _cast_args(args, kwargs, fn):
    cast = lambda x: fn(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    deep = lambda x: type(x)(cast(y) for y in x) if isinstance(x, (list, tuple)) else cast(x)
    return tuple(deep(a) for a in args), {k: deep(v) for k, v in kwargs.items()}


class CudaPolicy(TorchFunctionMode):
    """CUDA's autocast lists, attention kernel and dropout kernel on fake CPU tensors (module
    docstring). ``kernels`` and ``corrections`` count what was applied, for the report."""

    def __init__(self):
        super().__init__()
        self.kernels: Counter = Counter()
        self.corrections: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if func is F.dropout:
            return self._dropout(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inplace = name.endswith("_") and not name.endswith("__")     # autocast skips them
        if name and not inplace and torch.is_autocast_enabled("cpu"):
            return self._autocast(func, name, args, kwargs)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def everywhere(self):
        """This mode on during the step, and also around every module call made while it is
        off: activation checkpointing recomputes blocks inside backward, where Python
        torch-function modes are not active (the autograd engine does not carry them)."""
        from torch.nn.modules.module import (register_module_forward_hook,
                                             register_module_forward_pre_hook)
        from torch.overrides import _get_current_function_mode_stack
        entered: list = []

        def pre(mod, args):
            if self not in _get_current_function_mode_stack():
                self.__enter__()
                entered.append(mod)

        def post(mod, args, out):
            if entered and entered[-1] is mod:
                entered.pop()
                self.__exit__(None, None, None)

        hooks = (register_module_forward_pre_hook(pre), register_module_forward_hook(post))
        try:
            with self:
                yield self
        finally:
            for h in hooks:
                h.remove()

    def _autocast(self, func, name, args, kwargs):
        low = torch.get_autocast_dtype("cpu")
        first = args[0] if args else None
        if name in CUDA_FP32 and any(_is_low(a) for a in tree_flatten((args, kwargs))[0]):
            args, kwargs = _cast_args(args, kwargs, lambda x: x.float())
        elif name in CUDA_FP32_OUT and _is_low(first) and kwargs.get("dtype") is None:
            kwargs = dict(kwargs, dtype=torch.float32)
        elif name in CUDA_LOWER:
            args, kwargs = _cast_args(args, kwargs,
                                      lambda x: x.to(low) if x.dtype != torch.float64 else x)
        elif name in CUDA_PROMOTE:
            flat = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)
                    and x.is_floating_point() and x.dtype != torch.float64]
            wide = torch.float32 if any(x.dtype == torch.float32 for x in flat) else low
            args, kwargs = _cast_args(args, kwargs,
                                      lambda x: x.to(wide) if x.dtype != torch.float64 else x)
        elif name in CPU_ONLY_FP32:
            with torch.autocast("cpu", enabled=False):
                self.corrections[f"{name}: no upcast (not in CUDA's lists)"] += 1
                return func(*args, **kwargs)
        else:
            return func(*args, **kwargs)
        self.corrections[name] += 1
        return func(*args, **kwargs)

    def _attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        if torch.is_autocast_enabled("cpu"):             # sdpa is in CUDA's lower-precision list
            low = torch.get_autocast_dtype("cpu")
            q, k, v = (t.to(low) if t.dtype == torch.float32 else t for t in (q, k, v))
        hd = q.shape[-1]
        if q.dtype in _LOW and attn_mask is None and hd <= 256 and hd % 8 == 0:
            self.kernels["flash attention"] += 1
            return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal,
                                                            False, scale=scale)[0]
        if hd % 8 == 0 or (q.dtype == torch.float32 and hd % 4 == 0):
            self.kernels["memory-efficient attention"] += 1
            bias = attn_mask
            if bias is not None and bias.dtype == torch.bool:
                bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(
                    ~bias, float("-inf"))
            return aten._scaled_dot_product_efficient_attention(
                q, k, v, bias, True, dropout_p, is_causal, scale=scale)[0]
        self.kernels["math attention (L x L)"] += 1
        return aten._scaled_dot_product_attention_math(q, k, v, attn_mask, dropout_p,
                                                       is_causal, scale=scale)[0]

    def _dropout(self, x, p=0.5, training=True, inplace=False):
        if training and 0.0 < p < 1.0 and not inplace:
            self.kernels["fused dropout (1-byte mask)"] += 1
            return aten.native_dropout(x, p, True)[0]
        return F.dropout(x, p, training, inplace)        # this mode is off inside its handler


def _flash_workspace(args) -> int:
    """Bytes flash attention's backward allocates inside the kernel: an fp32 dQ accumulator
    and the fp32 row sums ``D = rowsum(dO * O)`` ([B, H, L])."""
    q = args[1]
    B, H, L = q.shape[0], q.shape[1], q.shape[2]
    return q.numel() * 4 + B * H * L * 4


_WORKSPACE = {aten._scaled_dot_product_flash_attention_backward.default: _flash_workspace}
_INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
              aten._unsafe_index_put.default, aten._index_put_impl_.default}


def _scalar(t: torch.Tensor):
    if t.dtype == torch.bool:
        return True
    return 1.0 if t.is_floating_point() else 1


def _all_selected(indices) -> list:
    """Boolean masks in an index list -> long indices selecting every masked position (the
    worst case of a data-dependent selection)."""
    out = []
    for ix in indices:
        if ix is not None and ix.dtype in (torch.bool, torch.uint8):
            n = ix.numel()
            out.extend(torch.zeros(n, dtype=torch.long, device=ix.device) for _ in range(ix.dim()))
        else:
            out.append(ix)
    return out


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of every tensor storage ATen creates (module docstring).

    ``phase`` tags new storages (``"static"``, ``"forward"``, ``"after"``); at every local
    maximum above the peak, ``categorize(tag_bytes)`` (set by the caller) turns the bytes per
    tag into the breakdown kept as ``at_peak``."""

    def __init__(self, round_to: int = 1, fake: bool = True):
        super().__init__()
        self.round_to = max(1, int(round_to))
        self.fake = fake             # False: count a real run (no worst cases, real .item())
        self.live: dict = {}                   # storage key -> [bytes, tag]
        self.refs: dict = {}
        self.tag_bytes: Counter = Counter()
        self.current = self.peak = 0
        self.phase = "static"
        self.pending = False
        self.at_peak: dict = {}
        self.categorize: Optional[Callable[[Counter], dict]] = None
        self._ws = 0
        self.worst_cases = 0         # data-dependent selections given their worst case

    # ---- bookkeeping ----------------------------------------------------------------------
    def size_of(self, nbytes: int) -> int:
        r = self.round_to
        return -(-nbytes // r) * r

    def _alloc(self, key, nbytes: int, tag: str) -> None:
        self.live[key] = [nbytes, tag]
        self.tag_bytes[tag] += nbytes
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.pending = True

    def _free(self, key) -> None:
        entry = self.live.pop(key, None)
        self.refs.pop(key, None)
        if entry is None:
            return
        if self.pending:
            self.snapshot()
        self.current -= entry[0]
        self.tag_bytes[entry[1]] -= entry[0]

    def snapshot(self) -> None:
        """Record the breakdown of the live bytes (called at a local maximum)."""
        self.pending = False
        cats = self.categorize(Counter(self.tag_bytes)) if self.categorize else {}
        self.at_peak = dict(cats, total=self.current)

    def reset_peak(self) -> None:
        self.peak = self.current
        self.pending = True
        self.snapshot()

    def finish(self) -> None:
        if self.pending:
            self.snapshot()

    def key_of(self, t: torch.Tensor):
        return t.untyped_storage()._cdata

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        n = self.size_of(st.nbytes())
        if key in self.live:
            if self.live[key][0] != n:             # resized storage
                old, tag = self.live[key]
                self.current += n - old
                self.tag_bytes[tag] += n - old
                self.live[key][0] = n
            return
        if n == 0:
            return
        self._alloc(key, n, self.phase)
        self.refs[key] = weakref.ref(st, lambda _r, k=key: self._free(k))

    # ---- dispatch -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE and hasattr(args[0], "fake_device"):     # most calls: answer fast
            return args[0].fake_device
        kwargs = kwargs or {}
        if self.fake:
            if func is aten._local_scalar_dense.default:
                return _scalar(args[0])
            if func is aten.nonzero.default:
                self.worst_cases += 1
                x = args[0]
                out = torch.zeros((x.numel(), x.dim()), dtype=torch.long, device=x.device)
                self.track(out)
                return out
            if func in _INDEX_OPS and any(i is not None and i.dtype in (torch.bool, torch.uint8)
                                          for i in args[1]):
                self.worst_cases += 1
                args = (args[0], _all_selected(args[1]), *args[2:])
        ws = _WORKSPACE[func](args) if func in _WORKSPACE else 0
        if ws:
            self._ws += 1
            key = ("workspace", self._ws)
            self._alloc(key, self.size_of(ws), self.phase)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        if ws:
            self._free(key)
        return out


@contextlib.contextmanager
def forward_phase(tracker: LiveBytes, autocast_dtype: Optional[torch.dtype]):
    """The forward pass of a simulated step: new storages are tagged ``forward``; with
    ``autocast_dtype`` the CPU autocast (corrected to CUDA's lists by :class:`CudaPolicy`)
    is on."""
    prev = tracker.phase
    tracker.phase = "forward"
    try:
        if autocast_dtype is None:
            yield
        else:
            with torch.autocast("cpu", dtype=autocast_dtype):
                yield
    finally:
        tracker.phase = prev
