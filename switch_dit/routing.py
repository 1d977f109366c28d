"""Routing plan: top-k experts of every block for the batch, grouped by expert, in one op.

The gate of a Switch-DiT block depends only on the timestep, so the gate of all N blocks is
one table ``gate_probs`` (N, T, M) of softmax probabilities. :func:`plan` turns it and the
batch's timesteps (B,) into everything the routed kernels need, for all blocks at once and
without a host sync on CUDA (the reference implementation syncs once per block to turn expert
sizes into a Python list).

Op ``torch.ops.switch_dit.routing_plan`` comes from the compiled extension (``csrc/``, CPU and
CUDA kernels). Where it is missing, ``torch.ops.switch_dit.routing_plan_torch`` (built on
:func:`reference_plan`, argsort based) computes the same plan and one
:class:`~switch_dit._extension.ExtensionFallbackWarning` says so. Both ops have fake kernels
(``torch.compile(fullgraph=True)`` traces through them) and autograd: ``topk_w`` is
differentiable with respect to ``gate_probs``.
"""

import os
from typing import NamedTuple

import torch
from torch import Tensor

from switch_dit import _extension

__all__ = [
    "RoutingPlan",
    "BlockRouting",
    "ExpertGroups",
    "block_groups",
    "plan",
    "reference_plan",
    "block_routing",
    "num_tiles",
    "TILE_BLOCK",
    "TILE_EXPERT",
    "TILE_SAMPLE",
    "TILE_TOKEN",
]

# Columns of a row of RoutingPlan.tiles.
TILE_BLOCK, TILE_EXPERT, TILE_SAMPLE, TILE_TOKEN = 0, 1, 2, 3

_OP = "switch_dit::routing_plan"
_TORCH_OP = "switch_dit::routing_plan_torch"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class RoutingPlan(NamedTuple):
    """Routing of a batch through all blocks. N blocks, M experts, B samples, k = top_k,
    P = B * k (sample, slot) pairs, pair id p = b * k + slot, NLT = ceil(seq_len / block_l).

    topk_idx  (N, B, k) int64: experts of sample b in block n, best first; ties between equal
              probabilities go to the lower expert index.
    topk_w    (N, B, k) gate_probs.dtype: their probabilities, copied from gate_probs (the gate
              weights g, not renormalised).
    counts    (N, M) int64: pairs routed to each expert (= samples, as a sample's k experts
              are distinct).
    offsets   (N, M + 1) int64: exclusive prefix sum of counts; expert e of block n owns ranks
              offsets[n, e] : offsets[n, e + 1] of order.
    order     (N, P) int64: pair ids sorted by expert, stably (ascending sample within an expert).
    position  (N, P) int64: inverse of order, position[n, order[n, r]] = r.
    tiles     (N * P * NLT, 4) int32: the static tile schedule, one row (block, expert, sample,
              first token) per (block, rank in order, token block), row
              (n * P + r) * NLT + j, first token j * block_l. The size N*B*k*NLT is a bound
              known on the host, so kernels launch a fixed grid; it is reached exactly
              unless samples were dropped (below). A tile's pair is order[n, r] with
              r = row // NLT % P, its slot that pair % k.

    A sample whose timestep is out of range (possible only on CUDA with the value check off)
    gets no expert: topk_idx -1, topk_w 0, position -1, and is left out of counts; the unused
    tail of order (ranks >= offsets[n, M]) and of each block's tiles is -1.
    """

    topk_idx: Tensor
    topk_w: Tensor
    counts: Tensor
    offsets: Tensor
    order: Tensor
    position: Tensor
    tiles: Tensor


class BlockRouting(NamedTuple):
    """Per-sample routing of one block: topk_idx (B, k) int64, topk_w (B, k)."""

    topk_idx: Tensor
    topk_w: Tensor


def block_routing(routing: RoutingPlan, block: int) -> BlockRouting:
    """Views (no copy) of block ``block``'s (B, k) expert indices and weights, the inputs of
    the routed-linear kernels."""
    n = routing.topk_idx.shape[0]
    if not -n <= block < n:
        raise IndexError(f"block must be in [-{n}, {n}) for a plan of {n} blocks, got {block}")
    return BlockRouting(routing.topk_idx[block], routing.topk_w[block])


class ExpertGroups(NamedTuple):
    """One block's (sample, slot) pairs grouped by expert, the input of the "grouped" strategy of
    the routed linear (``switch_dit.ops.expert_mask(..., groups=)``): order (P,), position (P,),
    offsets (M + 1,), all int64, as in RoutingPlan."""

    order: Tensor
    position: Tensor
    offsets: Tensor


def block_groups(routing: RoutingPlan, block: int) -> ExpertGroups:
    """Views (no copy) of block ``block``'s grouping by expert."""
    n = routing.order.shape[0]
    if not -n <= block < n:
        raise IndexError(f"block must be in [-{n}, {n}) for a plan of {n} blocks, got {block}")
    return ExpertGroups(routing.order[block], routing.position[block], routing.offsets[block])


def num_tiles(num_blocks: int, batch: int, top_k: int, seq_len: int, block_l: int) -> int:
    """Rows of RoutingPlan.tiles: N * B * k * ceil(seq_len / block_l)."""
    return num_blocks * batch * top_k * (-(-seq_len // block_l))


def reference_plan(
    gate_probs: Tensor, timesteps: Tensor, top_k: int, seq_len: int = 0, block_l: int = 64
) -> RoutingPlan:
    """The plan in plain PyTorch (argsort based): the test oracle and the fallback.

    Checks nothing: out-of-range timesteps give the dropped samples described in RoutingPlan.
    """
    N, T, M = gate_probs.shape
    B, k = timesteps.shape[0], top_k
    P = B * k
    dev = gate_probs.device
    valid = (timesteps >= 0) & (timesteps < T)  # (B,)
    probs = gate_probs.index_select(1, timesteps.clamp(0, T - 1))  # (N, B, M)
    # Stable descending argsort ranks NaN first and ties by lower index, as the kernels do.
    top = torch.argsort(probs, dim=-1, descending=True, stable=True)[..., :k]
    topk_w = torch.where(valid[:, None], probs.gather(-1, top), 0).to(gate_probs.dtype)
    topk_idx = torch.where(valid[:, None], top, -1)

    flat = topk_idx.reshape(N, P)
    key = torch.where(flat >= 0, flat, M)  # dropped pairs sort last
    order = torch.argsort(key, dim=1, stable=True)
    rank = torch.arange(P, device=dev).expand(N, P)
    position = torch.empty_like(order).scatter_(1, order, rank)
    position = torch.where(flat >= 0, position, -1)
    counts = torch.zeros(N, M + 1, dtype=torch.int64, device=dev)
    counts = counts.scatter_add_(1, key, torch.ones_like(key))[:, :M].contiguous()
    offsets = torch.cat([counts.new_zeros(N, 1), counts.cumsum(1)], dim=1)
    used = rank < offsets[:, M:]  # (N, P)

    nlt = -(-seq_len // block_l)
    shape = (N, P, nlt)
    tiles = torch.stack(
        [
            torch.arange(N, device=dev)[:, None, None].expand(shape),
            key.gather(1, order)[:, :, None].expand(shape),
            (order // k)[:, :, None].expand(shape),
            (torch.arange(nlt, device=dev) * block_l).expand(shape),
        ],
        dim=-1,
    )
    tiles = torch.where(used[:, :, None, None], tiles, -1).reshape(N * P * nlt, 4).to(torch.int32)
    order = torch.where(used, order, -1)
    return RoutingPlan(topk_idx, topk_w, counts, offsets, order, position, tiles)


def _check_args(gate_probs: Tensor, timesteps: Tensor, top_k: int, seq_len: int, block_l: int) -> None:
    """The binding's checks (no tensor values read), with the same messages and types."""
    for name, x in (("gate_probs", gate_probs), ("timesteps", timesteps)):
        if not isinstance(x, Tensor):
            raise TypeError(f"routing_plan: {name} must be a torch.Tensor, got {type(x).__name__}")
    if gate_probs.dim() != 3:
        raise ValueError(
            f"routing_plan: gate_probs must have shape (N, T, M), got "
            f"{gate_probs.dim()} dimensions with shape {tuple(gate_probs.shape)}"
        )
    if gate_probs.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"routing_plan: gate_probs must be float32, float16, bfloat16 or float64, got {gate_probs.dtype}"
        )
    if timesteps.dim() != 1:
        raise ValueError(
            f"routing_plan: timesteps must have shape (B,), got {timesteps.dim()} "
            f"dimensions with shape {tuple(timesteps.shape)}"
        )
    if timesteps.dtype != torch.int64:
        raise TypeError(f"routing_plan: timesteps must be int64, got {timesteps.dtype}")
    if timesteps.device != gate_probs.device:
        raise ValueError(
            f"routing_plan: timesteps must be on the device of gate_probs ({gate_probs.device}), got {timesteps.device}"
        )
    if not gate_probs.is_contiguous():
        raise ValueError("routing_plan: gate_probs must be contiguous")
    if not timesteps.is_contiguous():
        raise ValueError("routing_plan: timesteps must be contiguous")
    N, T, M = gate_probs.shape
    if T < 1 or M < 1:
        raise ValueError(
            "routing_plan: gate_probs must have at least one timestep and one "
            f"expert, got shape {tuple(gate_probs.shape)}"
        )
    if not 1 <= top_k <= M:
        raise ValueError(
            f"routing_plan: top_k must be in [1, M] with M = {M} experts (gate_probs.size(2)), got {top_k}"
        )
    if seq_len < 0:
        raise ValueError(f"routing_plan: seq_len must be >= 0, got {seq_len}")
    if block_l < 1:
        raise ValueError(f"routing_plan: block_l must be >= 1, got {block_l}")
    big = 2**31 - 1
    if N > big or M > big or timesteps.shape[0] * top_k > big or seq_len + block_l > big:
        raise ValueError("routing_plan: sizes must fit int32")


def _check_timestep_values(timesteps: Tensor, num_timesteps: int) -> None:
    """Raise if a timestep lies outside [0, T) (one host sync on a device)."""
    if timesteps.numel() == 0:
        return
    lo, hi = torch.stack([timesteps.min(), timesteps.max()]).tolist()
    if lo < 0 or hi >= num_timesteps:
        raise ValueError(
            f"routing_plan: timesteps must lie in [0, T) with T = {num_timesteps} "
            f"(gate_probs.size(1)), got values in [{lo}, {hi}]"
        )


def _fake_plan(gate_probs, timesteps, top_k, seq_len, block_l, check):
    _check_args(gate_probs, timesteps, top_k, seq_len, block_l)
    N, _, M = gate_probs.shape
    B = timesteps.shape[0]
    i64 = dict(dtype=torch.int64)
    nlt = (seq_len + block_l - 1) // block_l
    return (
        gate_probs.new_empty((N, B, top_k), **i64),
        gate_probs.new_empty((N, B, top_k)),
        gate_probs.new_empty((N, M), **i64),
        gate_probs.new_empty((N, M + 1), **i64),
        gate_probs.new_empty((N, B * top_k), **i64),
        gate_probs.new_empty((N, B * top_k), **i64),
        gate_probs.new_empty((N * B * top_k * nlt, 4), dtype=torch.int32),
    )


@torch.library.custom_op(_TORCH_OP, mutates_args=())
def _plan_torch(
    gate_probs: Tensor, timesteps: Tensor, top_k: int, seq_len: int, block_l: int, check: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fallback of switch_dit::routing_plan (same schema and checks), any device."""
    _check_args(gate_probs, timesteps, top_k, seq_len, block_l)
    if check or timesteps.device.type == "cpu":
        _check_timestep_values(timesteps, gate_probs.shape[1])
    return tuple(reference_plan(gate_probs, timesteps, top_k, seq_len, block_l))


def _gate_grad(grad_w: Tensor, timesteps: Tensor, topk_idx: Tensor, shape, dtype) -> Tensor:
    """d loss / d gate_probs (N, T, M) from d loss / d topk_w (N, B, k).

    Samples sharing a timestep add into the same row; a one-hot (T, B) matmul in float64 sums
    them in a fixed order (deterministic, unlike index_add_ atomics, and exact enough that
    TF32 or bf16 rounding never enters)."""
    N, T, M = shape
    rows = grad_w.new_zeros((N, timesteps.shape[0], M), dtype=torch.float64)
    rows.scatter_(2, topk_idx.clamp(min=0), torch.where(topk_idx >= 0, grad_w.double(), 0))
    one_hot = timesteps[None, :] == torch.arange(T, device=timesteps.device)[:, None]
    return torch.matmul(one_hot.double(), rows).to(dtype)


def _setup_context(ctx, inputs, output):
    gate_probs, timesteps = inputs[0], inputs[1]
    ctx.save_for_backward(timesteps, output[0])
    ctx.gate_shape = tuple(gate_probs.shape)
    ctx.gate_dtype = gate_probs.dtype


def _backward(ctx, *grads):
    grad_w = grads[1]
    if grad_w is None:
        return None, None, None, None, None, None
    timesteps, topk_idx = ctx.saved_tensors
    return (_gate_grad(grad_w, timesteps, topk_idx, ctx.gate_shape, ctx.gate_dtype), None, None, None, None, None)


_plan_torch.register_fake(_fake_plan)
_plan_torch.register_autograd(_backward, setup_context=_setup_context)
if _extension.available():
    torch.library.register_fake(_OP)(_fake_plan)
    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
else:
    _extension.warn_fallback(
        "switch_dit.routing.plan", f"the compiled extension switch_dit._C is not available ({_extension.load_error})"
    )

# Devices whose kernels the extension registered; plan() uses the fallback op elsewhere.
_EXT_DEVICES = frozenset(d for d in ("cpu", "cuda") if _extension.has_kernel(_OP, d))


def _default_check() -> bool:
    """The project's value-check switch (switch_dit._checks: SWITCH_DIT_CHECK_VALUES=1 or
    set_value_checks(True)); off unless asked, so a CUDA step stays free of host syncs."""
    try:
        from switch_dit import _checks

        return bool(_checks._value_checks_on_device)
    except (ImportError, AttributeError):
        return os.environ.get("SWITCH_DIT_CHECK_VALUES", "0") not in ("", "0")


def plan(
    gate_probs: Tensor, timesteps: Tensor, top_k: int, *, seq_len: int = 0, block_l: int = 64, check: bool | None = None
) -> RoutingPlan:
    """Routing plan of all N blocks for a batch, in one launch (see RoutingPlan for the fields).

    gate_probs: (N, T, M) float32/float16/bfloat16/float64, contiguous, every block's gate
        probabilities for every timestep. topk_w comes back in this dtype.
    timesteps: (B,) int64, contiguous, same device, values in [0, T).
    top_k: experts per sample, 1 <= top_k <= M.
    seq_len, block_l: tokens per sample and tokens per tile of the tile schedule
        (seq_len=0, the default, gives an empty schedule).
    check: whether to verify timesteps values. CPU inputs are always checked. On CUDA the check
        costs a host sync, so None (default) follows the project switch (SWITCH_DIT_CHECK_VALUES=1
        or switch_dit._checks.set_value_checks(True)), off by default; unchecked out-of-range
        timesteps give dropped samples (see RoutingPlan), never an out-of-bounds read.
    Bad arguments raise TypeError (dtype) or ValueError naming the argument.
    """
    if not isinstance(gate_probs, Tensor):
        raise TypeError(f"routing_plan: gate_probs must be a torch.Tensor, got {type(gate_probs).__name__}")
    if check is None:
        check = _default_check()
    if gate_probs.device.type in _EXT_DEVICES:
        out = torch.ops.switch_dit.routing_plan(gate_probs, timesteps, top_k, seq_len, block_l, check)
    else:
        if _extension.available() and not torch.compiler.is_compiling():
            _extension.warn_fallback(
                "switch_dit.routing.plan",
                f"switch_dit._C has no kernel for device {gate_probs.device.type!r} (built without it)",
            )
        out = torch.ops.switch_dit.routing_plan_torch(gate_probs, timesteps, top_k, seq_len, block_l, check)
    return RoutingPlan(*out)


# switch_dit::group_tokens (switch_dit.grouping) lives in the same op library, whose Python home
# is this module: its fake kernel has to be registered from here.
from switch_dit import grouping as _grouping  # noqa: E402

if _grouping._HAS_OP:

    @torch.library.register_fake(_grouping._OP)
    def _fake_group_tokens(index, valid, block_m):
        return _grouping._fake(index, valid, block_m)
