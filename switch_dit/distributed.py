"""Processes: one CPU process, or N ranks under torchrun (DDP or FSDP2), with the same code.

    ctx = setup("auto")                   reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    net = wrap(model, ctx, "ddp")         TrainingModule inside DDP or fully_shard
    out, prior = net(x_t, t, y, gen)      the prior loss is computed inside forward
    sampler = ShardedBatchSampler(...)    global batches, this rank's slice, resumable

Why the prior is computed inside forward: ``diffusion.training_losses`` calls
``model.prior_loss(t)`` after the forward. Under FSDP2 the parameters are sharded
outside the forward (the prior would read shards); under DDP the prior's gradient
reaches the same parameters as the forward's and is averaged with it only because the
loss is one graph. ``TrainingModule`` computes both in one forward, so every
wrapper sees one ordinary forward and averages every gradient over the ranks.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "Context",
    "resolve_device",
    "set_tf32",
    "rank_and_world",
    "barrier",
    "setup",
    "cleanup",
    "init_group",
    "TrainingModule",
    "wrap",
    "unwrap",
    "gather_state",
    "shard_optimizer_state",
    "all_gather_objects",
    "ShardedBatchSampler",
]


@dataclass
class Context:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup() created the process group (and cleanup() should end it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def resolve_device(name: str = "auto", local_rank: int = 0, world_size: int = 1) -> torch.device:
    """A device name, checked: "auto" is GPU ``local_rank`` when there are GPUs, else the CPU;
    "cuda" without an index is GPU ``local_rank`` too (torchrun gives each rank its own)."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available (use --device cpu or auto)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        elif world_size > 1:
            raise ValueError(f"device {name!r} names one GPU, but {world_size} processes run: use 'cuda' or 'auto'")
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def set_tf32(device: torch.device, enabled: bool = True) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (``enabled``) or not.

    Training, sampling and evaluation all call this, so that a model is sampled with the
    arithmetic it was trained with; DiT's public scripts do the same. The flags are global to
    the process. Nothing changes on the CPU, which has no TF32. See docs/design.md §4."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if enabled else "highest")  # the legacy and new flags alike
    torch.backends.cudnn.allow_tf32 = enabled


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def barrier() -> None:
    """Wait for every rank when a process group is up; nothing otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def setup(device: str = "auto") -> Context:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPUs), or stay alone.

    device "auto" gives rank r the GPU LOCAL_RANK when there are GPUs, else the CPU.
    Without torchrun's variables this is one process and no process group.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK ({rank}) and WORLD_SIZE ({world}) from the environment are inconsistent")
    dev = resolve_device(device, local_rank=local, world_size=world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        init_group(dev)
        owns = True
    return Context(rank=rank, world_size=world, local_rank=local, device=dev, owns_group=owns)


# Longer than NCCL's default 10 minutes: ranks wait in a barrier while rank 0 writes and
# fsyncs an XL checkpoint (~13 GB with the optimizer state), or while others sample.
TIMEOUT = datetime.timedelta(minutes=60)


def init_group(device: torch.device) -> None:
    """The process group of a torchrun job: NCCL bound to ``device`` on CUDA, else gloo."""
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=TIMEOUT)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class TrainingModule(nn.Module):
    """The model and its diffusion prior loss in one forward (see module doc).

    forward(x, t, y, prior_generator=None) -> (model output, prior loss scalar). The
    prior is zero (and not computed) when ``with_prior`` is false or the model has no
    prior (DiT, DTR); Switch-DiT's is the gates' L_dp, Remix-DiT's the coefficient prior.
    For DiffMoE the slot carries its weighted capacity-predictor loss (``model.aux_loss()``, the
    public ``cp_loss``) after a training-mode forward.
    """

    def __init__(self, model: nn.Module, with_prior: bool = True):
        super().__init__()
        self.model = model
        self.with_prior = with_prior and getattr(model, "routing", None) in ("switch", "remix")
        self.with_aux = with_prior and hasattr(model, "aux_loss") and hasattr(model, "moe_layers")

    def forward(self, x, t, y, prior_generator: torch.Generator | None = None):
        out = self.model(x, t, y)
        if self.with_prior:
            prior = self.model.prior_loss(t, generator=prior_generator)
        elif self.with_aux and self.model.training:
            prior = self.model.aux_loss()
        else:
            prior = out.new_zeros(())
        return out, prior


def wrap(model: nn.Module, ctx: Context, parallel: str = "ddp", with_prior: bool = True) -> nn.Module:
    """TrainingModule(model) on one process; inside DDP or FSDP2 (fully_shard) on several.

    FSDP2 shards every transformer block as its own unit (gathered just before its
    forward, freed after) and the rest of the model as the root unit; the parameters of
    every rank must be identical before this call (seed the initialisation alike).
    """
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    net = TrainingModule(model, with_prior)
    if not ctx.distributed:
        return net
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DDP(net, device_ids=ids, **_no_forward_buffer_sync(DDP))
    shard_module(net, ctx)
    return net


def _no_forward_buffer_sync(ddp_class) -> dict:
    """DDP's argument that skips the buffer broadcast before every forward. The buffers
    (position embedding, prior table) are fixed and equal on every rank, so the broadcast
    is pure overhead. torch >= 2.13 names it ``forward_sync_buffers`` and warns on every
    construction with the deprecated ``broadcast_buffers``; older versions know only that."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}  # buffers still synced once at init: they are equal anyway
    return {"broadcast_buffers": False}


def shard_module(module: nn.Module, ctx: Context) -> nn.Module:
    """fully_shard every DiTBlock of ``module`` and then ``module`` itself (FSDP2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .layers import DiTBlock

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for sub in module.modules():
        if isinstance(sub, DiTBlock):
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def unwrap(net: nn.Module) -> nn.Module:
    """The bare model inside DDP / TrainingModule."""
    if hasattr(net, "module") and isinstance(net.module, nn.Module):  # DDP
        net = net.module
    if isinstance(net, TrainingModule):
        net = net.model
    return net


def _full(value):
    """A DTensor shard -> the whole tensor (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value


def gather_state(state, keep: bool = True):
    """A (possibly FSDP-sharded, nested) state dict with whole tensors, for rank 0 to save.

    Every rank must call it (gathering a DTensor is a collective); ranks with ``keep``
    false get None back. Tensors come back as CPU copies (a snapshot, off the GPU).
    """
    if isinstance(state, dict):
        out = {k: gather_state(v, keep) for k, v in state.items()}
    elif isinstance(state, (list, tuple)):
        out = type(state)(gather_state(v, keep) for v in state)
    elif isinstance(state, torch.Tensor):
        out = _full(state).detach()
        if keep:  # host copies: whole FSDP tensors on rank 0's GPU would undo the sharding
            out = out.cpu()
    else:
        out = state
    return out if keep else None


def shard_optimizer_state(state: dict, opt: torch.optim.Optimizer) -> dict:
    """Whole optimizer state tensors (from a checkpoint) -> shards laid out like each FSDP parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in opt.param_groups for p in group["params"]]
    out = {"param_groups": state["param_groups"], "state": {}}
    for index, per_param in state["state"].items():
        p = params[int(index)]
        entry = {}
        for key, value in per_param.items():
            if isinstance(p, DTensor) and isinstance(value, torch.Tensor) and value.shape == p.shape:
                value = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            entry[key] = value
        out["state"][index] = entry
    return out


def all_gather_objects(obj, ctx: Context) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one alone)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ShardedBatchSampler:
    """Endless global batches of dataset indices, this rank's slice of each, resumable.

    Epoch e visits the dataset in a permutation drawn from (seed, e) and cuts it into
    global batches of ``global_batch`` (the ragged tail is dropped); rank r takes the
    r-th of ``world_size`` equal slices. The stream of global batches does not depend
    on the number of processes, and the whole state is (epoch, batches done), so a run
    resumes exactly where it stopped, with any world size.
    """

    def __init__(self, num_items: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be a positive integer, got {num_items!r}")
        if not isinstance(global_batch, int) or isinstance(global_batch, bool) or not 1 <= global_batch <= num_items:
            raise ValueError(f"batch_size must be <= {num_items} (the training set size), got {global_batch}")
        if global_batch % world_size:
            raise ValueError(f"batch_size ({global_batch}) must be divisible by the number of processes ({world_size})")
        self.num_items, self.global_batch = num_items, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.local_batch = global_batch // world_size
        self.batches_per_epoch = num_items // global_batch
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            # A fresh generator per epoch: the permutation is a function of (seed, epoch) alone.
            seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0] >> 1)
            self._perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(seed))
        return self._perm

    def global_indices(self) -> torch.Tensor:
        """The next global batch without consuming it (int64, (global_batch,))."""
        start = self.position * self.global_batch
        return self._permutation()[start : start + self.global_batch]

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        """This rank's indices of the next global batch, (local_batch,) int64."""
        idx = self.global_indices()[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return idx

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_items", "global_batch", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"the checkpoint's data position is for {key}={state[key]}, this run has "
                    f"{getattr(self, key)}: the data or batch size changed"
                )
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None
