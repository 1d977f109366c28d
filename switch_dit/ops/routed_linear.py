"""Routed expert linear: the SMoE mask of Switch-DiT and the general per-sample mixed linear.

    mixed_linear(x, W, b, idx, c)[b] = x_b @ (sum_j c_bj W_idx[b,j]) + sum_j c_bj b_idx[b,j]
    expert_mask(x, W, b, idx, g)     = 1 + mixed_linear(x, W, b, idx, g)            (= m)
    expert_mask_and_apply(...)       = (m, x * m)                                    (= m, r0)

Shapes: x (B, L, D_in); weight (M, D_in, D_out) stored (in, out); bias (M, D_out) or None;
idx (B, k) int64/int32 with values in [0, M) and 1 <= k <= M; coef (B, k) float (any float
dtype, may differ from x's: gate probabilities are often float32 under bf16 autocast).
Outputs in x's dtype. expert_mask* need D_in == D_out. ``groups`` (optional): idx's (sample,
slot) pairs grouped by expert, ``switch_dit.routing.ExpertGroups`` of the routing plan; the
"grouped" strategy reads it instead of sorting idx itself, the others ignore it.

Strategies (``backend=``, see switch_dit.ops.dispatch; ``strategies("mixed_linear")`` lists
them all): "reference" (plain PyTorch, a per-slot loop of gathered bmm: the ground truth, any
dtype, float64 and gradcheck included), "fused" (alias "triton": the kernels of
switch_dit.kernels.routed_linear, fp16/bf16/fp32; CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), None/"auto" (chosen per call, docs/design.md §3). The fused path is one
torch.library custom op per call (forward) and one for the backward, with fake
implementations, so torch.compile(fullgraph=True) and CUDA graphs see through it. Under
autocast, x, weight and bias are cast to the autocast dtype (like F.linear); coef keeps its
dtype, gradients come back in each input's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from switch_dit import _checks
from switch_dit.ops import dispatch
from switch_dit.routing import ExpertGroups

__all__ = ["mixed_linear", "expert_mask", "expert_mask_and_apply", "mixed_linear_reference"]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    return dispatch.kernels("routed_linear")


# --------------------------------------------------------------------------- reference


def mixed_linear_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], idx: Tensor, coef: Tensor, add_one: bool = False
) -> Tensor:
    """The plain twin: one gathered bmm per slot j, exactly the formula; differentiable by autograd."""
    y = None
    for j in range(idx.shape[1]):
        e = idx[:, j]
        t = torch.bmm(x, weight[e])
        if bias is not None:
            t = t + bias[e][:, None, :]
        t = coef[:, j, None, None].to(x.dtype) * t
        y = t if y is None else y + t
    if y is None:  # k = 0 cannot pass validation; kept total for direct callers
        y = x.new_zeros(x.shape[0], x.shape[1], weight.shape[2])
    return 1 + y if add_one else y


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("switch_dit::mixed_linear", mutates_args=())
def _mixed_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], idx: Tensor, coef: Tensor, add_one: bool
) -> Tensor:
    _checks.check_expert_index_values(idx, weight.shape[0])
    with dispatch.on_device(x), dispatch.no_autocast(x.device.type):
        return _kernels().mixed_linear_forward(x, weight, bias, idx, coef, add_one=add_one)


@_mixed_linear_op.register_fake
def _(x, weight, bias, idx, coef, add_one):
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[2]))


@torch.library.custom_op("switch_dit::expert_mask_apply", mutates_args=())
def _expert_mask_apply_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], idx: Tensor, coef: Tensor
) -> tuple[Tensor, Tensor]:
    _checks.check_expert_index_values(idx, weight.shape[0])
    with dispatch.on_device(x), dispatch.no_autocast(x.device.type):
        return _kernels().mixed_linear_forward(x, weight, bias, idx, coef, add_one=True, apply=True)


@_expert_mask_apply_op.register_fake
def _(x, weight, bias, idx, coef):
    shape = (x.shape[0], x.shape[1], weight.shape[2])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("switch_dit::mixed_linear_backward", mutates_args=())
def _mixed_linear_backward_op(
    grad_y: Optional[Tensor],
    grad_r: Optional[Tensor],
    x: Tensor,
    m: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    idx: Tensor,
    coef: Tensor,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    need_dc: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with dispatch.on_device(x), dispatch.no_autocast(x.device.type):
        dx, dw, db, dc = _kernels().mixed_linear_backward(
            grad_y,
            grad_r,
            x,
            m,
            weight,
            bias,
            idx,
            coef,
            need_dx=need_dx,
            need_dw=need_dw,
            need_db=need_db and bias is not None,
            need_dc=need_dc,
        )
    # custom ops return tensors only: a fresh empty tensor stands for "not computed"
    # (one each: returns may not alias each other).
    return tuple(t if t is not None else x.new_empty((0,)) for t in (dx, dw, db, dc))


@_mixed_linear_backward_op.register_fake
def _(grad_y, grad_r, x, m, weight, bias, idx, coef, need_dx, need_dw, need_db, need_dc):
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
        weight.new_empty(weight.shape) if need_dw else x.new_empty((0,)),
        bias.new_empty(bias.shape) if need_db and bias is not None else x.new_empty((0,)),
        coef.new_empty(coef.shape) if need_dc else x.new_empty((0,)),
    )


def _setup_linear(ctx, inputs, output):
    x, weight, bias, idx, coef, _ = inputs
    ctx.save_for_backward(x, weight, bias, idx, coef)


def _backward_linear(ctx, grad):
    x, weight, bias, idx, coef = ctx.saved_tensors
    nx, nw, nb, _, nc, _ = ctx.needs_input_grad
    dx, dw, db, dc = _mixed_linear_backward_op(
        grad, None, x, None, weight, bias, idx, coef, nx, nw, nb and bias is not None, nc
    )
    return (
        dx if nx else None,
        dw if nw else None,
        db if nb and bias is not None else None,
        None,
        dc if nc else None,
        None,
    )


def _setup_apply(ctx, inputs, output):
    x, weight, bias, idx, coef = inputs
    ctx.save_for_backward(x, weight, bias, idx, coef, output[0])


def _backward_apply(ctx, grad_m, grad_r):
    x, weight, bias, idx, coef, m = ctx.saved_tensors
    nx, nw, nb, _, nc = ctx.needs_input_grad
    dx, dw, db, dc = _mixed_linear_backward_op(
        grad_m, grad_r, x, m, weight, bias, idx, coef, nx, nw, nb and bias is not None, nc
    )
    return (dx if nx else None, dw if nw else None, db if nb and bias is not None else None, None, dc if nc else None)


_mixed_linear_op.register_autograd(_backward_linear, setup_context=_setup_linear)
_expert_mask_apply_op.register_autograd(_backward_apply, setup_context=_setup_apply)


# --------------------------------------------------------------------------- public API


def _validate(x, weight, bias, idx, coef, square: bool) -> None:
    for name, t in (("x", x), ("weight", weight), ("topk_idx", idx), ("topk_w", coef)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dim() != 3 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating (B, L, D_in) tensor, got {x.dtype} {tuple(x.shape)}")
    B, L, D = x.shape
    if weight.dim() != 3 or weight.shape[1] != D:
        raise ValueError(f"weight must have shape (M, D_in={D}, D_out), got {tuple(weight.shape)}")
    M, _, D_out = weight.shape
    if square and D_out != D:
        raise ValueError(f"weight must be square (M, {D}, {D}) for the expert mask, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (M, D_out):
        raise ValueError(f"bias must have shape (M={M}, D_out={D_out}), got {tuple(bias.shape)}")
    if idx.dim() != 2 or idx.shape[0] != B:
        raise ValueError(f"topk_idx must have shape (B={B}, k), got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_idx must be int64 (or int32), got {idx.dtype}")
    k = idx.shape[1]
    if not 1 <= k <= M:
        raise ValueError(f"topk_idx has k = {k} columns: need 1 <= k <= M = {M} (weight.shape[0])")
    if tuple(coef.shape) != (B, k):
        raise ValueError(f"topk_w must have shape (B={B}, k={k}) like topk_idx, got {tuple(coef.shape)}")
    if not coef.dtype.is_floating_point:
        raise ValueError(f"topk_w must be a floating tensor, got {coef.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("topk_idx", idx), ("topk_w", coef)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _validate_groups(groups, idx: Tensor, num_experts: int) -> None:
    """``groups`` must be None or an ExpertGroups of idx: order, position (B*k,) and offsets
    (M + 1,), int64, on idx's device; where values are checked (CPU, or the project switch on
    CUDA: a host sync), equal to idx's own grouping, so a stale plan fails loudly."""
    if groups is None:
        return
    if not isinstance(groups, tuple) or len(groups) != 3:
        raise TypeError(f"groups must be None or a switch_dit.routing.ExpertGroups, got {type(groups).__name__}")
    P = idx.numel()
    for name, t, n in zip(ExpertGroups._fields, groups, (P, P, num_experts + 1)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (n,) or t.device != idx.device:
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"groups.{name} must be an int64 tensor of shape ({n},) on {idx.device}, got {got}")
    if _checks._should_check_values(idx) and P:
        _checks.check_expert_index_values(idx, num_experts)  # (before idx indexes anything here)
        # The one grouping of idx: order a permutation sorting the pairs by expert, stably;
        # position its inverse; offsets the prefix sum of the pairs per expert. O(P), no sort.
        order, position, offsets = groups
        flat = idx.reshape(-1).long()
        rank = torch.arange(P, device=idx.device)
        counts = torch.zeros(num_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, rank * 0 + 1)
        ok = bool(((order >= 0) & (order < P)).all())
        if ok:
            e = flat[order]
            same = e[1:] == e[:-1]
            ok = (
                torch.equal(position[order], rank)
                and bool((e[1:] >= e[:-1]).all())
                and bool((~same | (order[1:] > order[:-1])).all())
                and torch.equal(offsets, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
            )
        if not ok:
            raise ValueError(
                "groups does not describe topk_idx (a plan of another batch or block?): groups must be "
                "topk_idx's pairs sorted by expert, as switch_dit.routing.plan gives them"
            )


def _check_dtypes(x, weight, bias) -> None:
    # After the autocast cast: under autocast, mixed input dtypes are fine (as for F.linear).
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"bias dtype {bias.dtype} must match x dtype {x.dtype}")


def _prepare(x, weight, bias, idx, coef, square, groups=None):
    _validate(x, weight, bias, idx, coef, square)
    _validate_groups(groups, idx, weight.shape[0])
    x, weight, bias = dispatch.autocast_inputs(x, weight, bias)  # coef keeps its dtype (mixed in fp32)
    _check_dtypes(x, weight, bias)
    return x, weight, bias


def _groups_kw(groups: Optional[ExpertGroups]) -> dict:
    # Passed on only when given: every strategy of these ops takes groups=None.
    return {} if groups is None else {"groups": ExpertGroups(*groups)}


def mixed_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    idx: Tensor,
    coef: Tensor,
    *,
    backend: Optional[str] = None,
    groups: Optional[ExpertGroups] = None,
) -> Tensor:
    """y_b = x_b @ (sum_j coef_bj weight[idx_bj]) + sum_j coef_bj bias[idx_bj].

    x (B, L, D_in), weight (M, D_in, D_out), bias (M, D_out) or None, idx (B, k), coef (B, k)
    -> (B, L, D_out) in x's dtype. Differentiable in x, weight, bias and coef.
    backend: a name of ``switch_dit.ops.strategies("mixed_linear")``, "auto" or None.
    groups: idx grouped by expert (``switch_dit.routing.block_groups`` of the batch's plan) or None.
    """
    x, weight, bias = _prepare(x, weight, bias, idx, coef, False, groups)
    return dispatch.call("mixed_linear", backend, x, weight, bias, idx, coef, **_groups_kw(groups))


def expert_mask(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    topk_idx: Tensor,
    topk_w: Tensor,
    *,
    backend: Optional[str] = None,
    groups: Optional[ExpertGroups] = None,
) -> Tensor:
    """m = 1 + sum_j topk_w[b, j] (x_b @ weight[topk_idx[b, j]] + bias[topk_idx[b, j]]).

    x (B, L, D), weight (M, D, D), bias (M, D) or None, topk_idx (B, k), topk_w (B, k)
    -> m (B, L, D) in x's dtype. groups: as in mixed_linear.
    """
    x, weight, bias = _prepare(x, weight, bias, topk_idx, topk_w, True, groups)
    return dispatch.call("expert_mask", backend, x, weight, bias, topk_idx, topk_w, **_groups_kw(groups))


def expert_mask_and_apply(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    topk_idx: Tensor,
    topk_w: Tensor,
    *,
    backend: Optional[str] = None,
    groups: Optional[ExpertGroups] = None,
) -> tuple[Tensor, Tensor]:
    """(m, r0 = x * m) in one pass; shapes as expert_mask. The block's fast path consumes both."""
    x, weight, bias = _prepare(x, weight, bias, topk_idx, topk_w, True, groups)
    return dispatch.call("expert_mask_and_apply", backend, x, weight, bias, topk_idx, topk_w, **_groups_kw(groups))


# --------------------------------------------------------------------------- strategies
# Each impl takes the op's arguments (x, weight, bias, idx, coef) after validation and the
# autocast cast, and groups=None (read only by "grouped"); see switch_dit.ops.dispatch.


def _reference_checked(x, weight, bias, idx, coef, add_one=False):
    _checks.check_expert_index_values(idx, weight.shape[0])
    return mixed_linear_reference(x, weight, bias, idx, coef, add_one=add_one)


def _reference_mask_and_apply(x, weight, bias, idx, coef, groups=None):
    m = _reference_checked(x, weight, bias, idx, coef, add_one=True)
    return m, x * m


def _fused_unavailable(x, *_, **__):
    return dispatch.kernels_unavailable("routed_linear", _FUSED_DTYPES, x)


dispatch.register("mixed_linear", "reference", lambda x, w, b, i, c, groups=None: _reference_checked(x, w, b, i, c))
dispatch.register(
    "expert_mask", "reference", lambda x, w, b, i, c, groups=None: _reference_checked(x, w, b, i, c, add_one=True)
)
dispatch.register("expert_mask_and_apply", "reference", _reference_mask_and_apply)
dispatch.register(
    "mixed_linear",
    "fused",
    lambda x, w, b, i, c, groups=None: _mixed_linear_op(x, w, b, i, c, False),
    supports=_fused_unavailable,
)
dispatch.register(
    "expert_mask",
    "fused",
    lambda x, w, b, i, c, groups=None: _mixed_linear_op(x, w, b, i, c, True),
    supports=_fused_unavailable,
)
dispatch.register(
    "expert_mask_and_apply",
    "fused",
    lambda x, w, b, i, c, groups=None: _expert_mask_apply_op(x, w, b, i, c),
    supports=_fused_unavailable,
)
dispatch.kernels("routed_linear")  # imported now, not while torch.compile traces a first call
