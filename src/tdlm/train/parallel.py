"""Everything distributed, in one place: the :class:`Runtime` (this process's place in a
single-process or torchrun job, and the collectives the trainer needs) and
:func:`parallelize`, which applies activation checkpointing -> compile -> DDP/FSDP to a model
from outside (torchtitan's ``parallelize``; the model code knows nothing of any of it).

Launch with ``torchrun --nproc_per_node N --no-python tdlm train ...`` (README, "Multi-device
training"). :meth:`Runtime.from_env` starts the process group from the torchrun environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): backend
``nccl`` on CUDA, ``gloo`` on CPU. Without those variables (or with ``WORLD_SIZE=1``) it is a
single-process runtime whose collectives return their inputs.

What is guaranteed (tests/test_distributed.py):

* **Same global batch.** Every rank builds the same global batch (a pure function of the run
  seed and the step), cuts it into the micro-batches a single process with the same
  ``train.micro_batch`` would use (:func:`rank_micro_batches`) and takes a contiguous block of
  them; the union of the ranks' rows is the global batch, without overlap. The per-device
  micro-batch and accumulation are :func:`derive_micro` (their only definition).
* **Same noise.** The noise of micro-batch ``j`` (its position in the global batch) is drawn
  from a generator seeded by (seed, step, j) (``tdlm.train.step.micro_seed``), on whatever
  rank it lands. So a W-rank run equals the single-process run with the same ``micro_batch``
  up to float summation order (parameters ``allclose``; bit-equal in the common 2-rank case of
  one micro-batch per rank).
* **Same normalisation.** Gradients are summed over all ranks' micro-batches and divided by the
  step's global token count (an all-reduce of the summed NELBO and token counts), as in the
  single-process loop.
* Only rank 0 writes files. Checkpoints hold the full (unsharded) model, EMA and optimizer
  state in the single-process format (:func:`full_state_dict`, :func:`full_optimizer_state`),
  so any run (1 or N processes, DDP or FSDP, with or without activation checkpointing or
  compile) resumes or loads any checkpoint: none of the wrappers changes a state-dict key.

:class:`LossModule` wraps ``family.loss`` so that DDP and FSDP see one ``forward`` per
micro-batch (families call model methods other than ``forward``, e.g. TDLM's
``model.features``).
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import AUTO
from ..errors import ConfigError, TdlmError

PARALLEL_MODES = ("ddp", "fsdp")


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; otherwise the named device (an error when
    it is a CUDA device and CUDA is not available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TdlmError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def _rank_device(device_name: str, local: int) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when CUDA is available,
    else the configured device."""
    if (device_name in ("auto", "cuda") and torch.cuda.is_available()) \
            or device_name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TdlmError(f"device {device_name!r} requested but CUDA is not available")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu" if device_name == "auto" else device_name)


@dataclass
class Runtime:
    """This process's place in the job and the collectives the trainer uses. A single
    process is ``Runtime.single(device)``: rank 0 of 1, every collective a no-op.
    ``owns_group``: the process group was started by :meth:`from_env` (and is destroyed by
    :meth:`teardown`)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @classmethod
    def single(cls, device) -> "Runtime":
        return cls(device=torch.device(device))

    @classmethod
    def from_env(cls, device_name: str = "auto", timeout_s: Optional[float] = None) -> "Runtime":
        """Join (or start) the process group described by the torchrun environment, on this
        rank's device; without torchrun, the single process on ``resolve_device(device_name)``.
        Collective time-out: ``timeout_s``, else ``$TDLM_DIST_TIMEOUT_S``, else 30 minutes."""
        import torch.distributed as dist
        world = env_world_size()
        if world <= 1:
            return cls.single(resolve_device(device_name))
        if not dist.is_available():
            raise TdlmError("torch.distributed is not available in this torch build")
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        device = _rank_device(device_name, local)
        owns = False
        if not dist.is_initialized():
            secs = timeout_s or float(os.environ.get("TDLM_DIST_TIMEOUT_S", "1800"))
            kw = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend=backend_for(device),
                                    timeout=datetime.timedelta(seconds=secs), **kw)
            owns = True
        rt = cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                 device=device, owns_group=owns)
        if rt.world_size != world or rt.rank != rank:
            raise TdlmError(f"process group (rank {rt.rank} of {rt.world_size}) does not match "
                            f"the environment (RANK={rank}, WORLD_SIZE={world})")
        return rt

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def all_reduce_sum(self, values) -> list[float]:
        """Element-wise float64 sum of ``values`` (a list of numbers) over all ranks; the
        values unchanged in a single process."""
        vals = [float(v) for v in values]
        if not self.distributed:
            return vals
        import torch.distributed as dist
        t = torch.tensor(vals, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def agree(self, ok: bool) -> bool:
        """True on every rank when ``ok`` is true on every rank (a collective: all ranks call
        it). Used so that an error on one rank (e.g. a failed checkpoint write on rank 0) stops
        all ranks instead of leaving the others waiting in a collective."""
        if not self.distributed:
            return bool(ok)
        import torch.distributed as dist
        t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    def teardown(self, barrier: bool = False) -> None:
        """Destroy the process group if :meth:`from_env` created it. ``barrier`` (a run that
        finished on every rank): wait for all ranks first, so no rank tears its group (and the
        backend's threads) down while another still talks to it -- a rank leaving early could
        abort at exit ("terminate called without an active exception"). Not after an error:
        the other ranks may never arrive."""
        import gc
        import torch.distributed as dist
        if self.owns_group and dist.is_initialized():
            gc.collect()    # the run's FSDP modules sit in reference cycles: free them (and
            # their hold on the group) before the group goes, not at interpreter exit
            if barrier:
                self.barrier()
            dist.destroy_process_group()

    def micro_batches(self, batch, micro: int, max_tokens: int) -> list[tuple[int, dict, float]]:
        """This process's ``(j, micro_batch, weight)`` share of a global batch: all of
        ``split_micro(batch, micro, max_tokens)`` with weight 1 in a single process, the
        rank's block (:func:`rank_micro_batches`) under torchrun."""
        if self.distributed:
            return rank_micro_batches(batch, micro, max_tokens, self.rank, self.world_size)
        from ..data.batches import split_micro
        return [(j, mb, 1.0) for j, mb in enumerate(split_micro(batch, micro, max_tokens))]


# ---- batch sharding ------------------------------------------------------------------------
def derive_micro(global_batch: int, micro_batch, world: int,
                 largest: Optional[int] = None) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps per device). ``micro_batch`` 0 means one
    micro-batch per device (``global_batch / world``); ``"auto"`` the largest divisor of
    ``global_batch / world`` not above ``largest`` (the largest micro-batch that fits the
    device, ``tdlm.train.memory.auto_micro_batch``; without it "auto" is an error: it is
    resolved when training starts). Raises ConfigError (one line) unless ``global_batch`` is
    divisible by ``world * micro``."""
    if world < 1:
        raise ConfigError(f"world size must be >= 1, got {world}")
    if micro_batch == AUTO:
        if largest is None or largest < 1 or global_batch % world:
            raise ConfigError("invalid config value for 'train.micro_batch': 'auto' is resolved "
                              "when training starts on a CUDA device; give a number here")
        per_dev = global_batch // world
        micro_batch = max(d for d in range(1, min(largest, per_dev) + 1) if per_dev % d == 0)
    if not micro_batch:
        if global_batch % world:
            raise ConfigError(f"invalid config value for 'train.global_batch': {global_batch} "
                              f"must be divisible by the world size {world} (one micro-batch "
                              "of global_batch/world_size rows per device)")
        return global_batch // world, 1
    micro = micro_batch
    if global_batch % (world * micro):
        raise ConfigError(f"invalid config value for 'train.global_batch': {global_batch} must "
                          f"be divisible by world_size x micro_batch = {world} x {micro} = "
                          f"{world * micro}")
    return micro, global_batch // (world * micro)


def rank_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous block [lo, hi) of ``n`` items for ``rank``: sizes differ by at most one."""
    return n * rank // world, n * (rank + 1) // world


def rank_micro_batches(batch, micro: int, max_tokens: int, rank: int, world: int
                       ) -> list[tuple[int, dict, float]]:
    """This rank's share of a global batch as ``(j, micro_batch, weight)`` triples.

    The global batch is cut exactly as the single-process loop cuts it
    (``split_micro(batch, micro, max_tokens)``: micro-batch ``j`` is the same rows there and
    here) and rank r takes the contiguous block ``rank_bounds(n, r, world)`` of the n
    micro-batches, so the union over ranks is the global batch without overlap. Ranks whose
    block is shorter (ragged batches only: dense batches always divide evenly) are padded to
    the longest block with copies of a real micro-batch of weight 0, because DDP and FSDP need
    the same number of forward/backward passes on every rank; a weight-0 entry adds nothing
    to the gradients or the loss."""
    from ..data.batches import split_micro
    mbs = split_micro(batch, micro, max_tokens)
    n = len(mbs)
    lo, hi = rank_bounds(n, rank, world)
    longest = max(b - a for a, b in (rank_bounds(n, r, world) for r in range(world)))
    out = [(j, mbs[j], 1.0) for j in range(lo, hi)]
    filler = mbs[lo] if hi > lo else mbs[0]
    while len(out) < longest:
        out.append((lo if hi > lo else 0, filler, 0.0))
    return out


# ---- applying parallelism from outside the model --------------------------------------------
class LossModule(nn.Module):
    """``forward(batch, generator, exact=False) -> family.loss`` (``family.nelbo`` if exact).

    DDP and FSDP hook ``forward``; families call other model methods too (TDLM's
    ``features``), so the wrappers go around this module instead of the model. The family is
    held as a plain attribute (its tensors are not parameters)."""

    def __init__(self, family, model: nn.Module):
        super().__init__()
        self.model = model
        object.__setattr__(self, "family", family)

    def forward(self, batch, generator, exact: bool = False):
        if exact:
            return self.family.nelbo(self.model, batch, generator)
        return self.family.loss(self.model, batch, generator)


class CheckpointWrapper(nn.Module):
    """Activation checkpointing of one module: in training mode its forward runs under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (activations recomputed in
    the backward pass, the RNG state replayed, so losses and gradients are bit-identical to
    the plain module); in eval mode it is the plain call.

    State dicts keep the wrapped module's names: the ``wrapped.`` level is removed from
    saved keys and added to loaded ones, so checkpoints move freely between plain and
    wrapped models."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.wrapped = module
        self.register_state_dict_post_hook(_strip_wrapped)
        self.register_load_state_dict_pre_hook(_add_wrapped)

    def forward(self, *args, **kwargs):
        if self.training:
            return checkpoint(self.wrapped, *args, use_reentrant=False, **kwargs)
        return self.wrapped(*args, **kwargs)


_WRAPPED = "wrapped."


def _strip_wrapped(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + _WRAPPED
    for k in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + k[len(inner):]] = state_dict.pop(k)


def _add_wrapped(module, state_dict, prefix, *args) -> None:
    inner = prefix + _WRAPPED
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + k[len(prefix):]] = state_dict.pop(k)


def block_units(module: nn.Module) -> list[nn.Module]:
    """The units that checkpointing, compile and FSDP apply to: every element of an
    ``nn.ModuleList`` (the transformer blocks); the rest belongs to the root."""
    units = []
    for m in module.modules():
        if isinstance(m, nn.ModuleList):
            units.extend(m)
    return units


def checkpoint_blocks(module: nn.Module) -> nn.Module:
    """Wrap every block (:func:`block_units`) in a :class:`CheckpointWrapper`, in place
    (blocks already wrapped are left as they are). Returns ``module``."""
    for m in list(module.modules()):
        if isinstance(m, nn.ModuleList):
            for i, block in enumerate(m):
                if not isinstance(block, CheckpointWrapper):
                    m[i] = CheckpointWrapper(block)
    return module


def parallelize(module: nn.Module, *, activation_checkpointing: bool, compile: bool,
                parallel: str, runtime: Runtime) -> nn.Module:
    """Apply, in this order and from outside the model: activation checkpointing of every
    block, ``torch.compile`` of every block (in place: state-dict names unchanged), and for
    ``runtime.world_size`` > 1 ranks ``parallel`` = ``ddp`` (DistributedDataParallel, full
    replicas) or ``fsdp`` (FSDP2 ``fully_shard``: each block, then the root). ``module`` is
    the model or, for training, its :class:`LossModule`. Returns the module to call (the same
    object unless DDP wraps it); the model inside keeps its single-process state-dict keys."""
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"invalid config value for 'train.parallel': {parallel!r} is not one "
                          f"of {', '.join(PARALLEL_MODES)}")
    if activation_checkpointing:
        checkpoint_blocks(module)
    if compile:
        for unit in block_units(module):     # block by block: every family's methods use them
            unit.compile()
    if not runtime.distributed:
        return module
    return _ddp(module, runtime) if parallel == "ddp" else _fsdp(module, runtime)


def _ddp(module: nn.Module, runtime: Runtime) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP
    # buffers (rotary tables) are identical on every rank: no per-forward broadcast.
    # Unused parameters are allowed (e.g. a tree level without moved positions).
    sync_kw = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
               else {"broadcast_buffers": False})
    dev = runtime.device
    return DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None,
               find_unused_parameters=True, **sync_kw)


def _fsdp(module: nn.Module, runtime: Runtime) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    for unit in reversed(block_units(module)):      # innermost first
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    # the root reshards after forward too, so that parameters are always sharded between
    # steps (EMA swaps and optimizer steps act on the shards)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return module


def grad_sync(wrapped: nn.Module, sync: bool):
    """A context for one micro-batch's forward/backward: gradient reduction across ranks
    only when ``sync`` (the last micro-batch of the step). No-op for an unwrapped module."""
    if hasattr(wrapped, "no_sync"):                          # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):       # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def reshard(wrapped: nn.Module) -> None:
    """Free FSDP's unsharded parameters (after evaluation); no-op for other modules."""
    for m in wrapped.modules():
        if hasattr(m, "reshard") and hasattr(m, "set_requires_gradient_sync"):
            m.reshard()


# ---- full (unsharded) state ----------------------------------------------------------------
def _is_dtensor(v) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:        # pragma: no cover
        return False
    return isinstance(v, DTensor)


def full_tensor(v: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank calls it); plain
    tensors are returned as they are. Detached, on the CPU."""
    if _is_dtensor(v):
        v = v.full_tensor()
    return v.detach().cpu()


def full_state_dict(sd: dict, keep: bool = True) -> dict:
    """``{name: full CPU tensor}``; every rank must call it (FSDP gathers shards). With
    ``keep=False`` (ranks that do not write) the gathered tensors are dropped one by one and
    an empty dict is returned, so no rank holds more than one full tensor at a time."""
    out = {}
    for k, v in sd.items():
        t = full_tensor(v)
        if keep:
            out[k] = t
    return out


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, keep: bool = True) -> dict:
    """The optimizer's ``state_dict`` with every DTensor gathered: keyed by parameter index
    (the order of ``model.parameters()``), exactly the single-process AdamW ``state_dict``."""
    sd = opt.state_dict()
    state = {}
    for pid, st in sd["state"].items():
        entry = {k: (full_tensor(v) if torch.is_tensor(v) else v) for k, v in st.items()}
        if keep:
            state[pid] = entry
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like``: this rank's shard when ``like`` is a DTensor (no
    communication: every rank holds ``full``), else ``full`` on ``like``'s device/dtype."""
    if _is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(device=like.device, dtype=like.dtype),
                                 like.device_mesh, like.placements, src_data_rank=None)
    return full.to(device=like.device, dtype=like.dtype)


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, full: dict) -> None:
    """Load a full (single-process format) optimizer state into ``opt`` whose parameters may
    be FSDP shards: each state tensor shaped like its parameter is cut to this rank's shard."""
    params = list(model.parameters())
    state = {}
    for pid, st in full["state"].items():
        p = params[int(pid)]
        state[pid] = {k: (shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape
                          and _is_dtensor(p) else v) for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": full["param_groups"]})


class StateView(nn.Module):
    """A module-like holder of a ready state dict: ``save_checkpoint`` only calls
    ``state_dict()`` on the model and optimizer, so gathered full states are passed as these."""

    def __init__(self, sd: dict):
        super().__init__()
        self._sd = sd

    def state_dict(self, *a, **kw):       # noqa: D401 - nn.Module signature
        return self._sd


class OptimizerView:
    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


def swap_in(model: nn.Module, shadow: dict) -> dict:
    """Copy ``shadow`` (e.g. EMA weights, laid out like ``model.state_dict()``) into the model in
    place; returns the previous values for :func:`swap_out`. Works on FSDP shards."""
    cur = model.state_dict()
    backup = {}
    with torch.no_grad():
        for k, v in shadow.items():
            t = cur[k]
            backup[k] = t.detach().clone()
            t.copy_(v.to(t.dtype))
    return backup


def swap_out(model: nn.Module, backup: dict) -> None:
    cur = model.state_dict()
    with torch.no_grad():
        for k, v in backup.items():
            cur[k].copy_(v)
