"""The routed linear as compositions of cuBLAS calls: strategies "bmm" and "grouped" (docs/design.md §3).

    composed_mixed_linear(x, W, b, idx, coef, strategy=..., add_one=False)   -> y (or m with add_one)
    composed_expert_mask_and_apply(x, W, b, idx, coef, strategy=...)         -> (m, r0 = x * m)

Same semantics, shapes and dtypes as ``switch_dit.ops.mixed_linear`` / ``expert_mask`` /
``expert_mask_and_apply``; the math of each strategy is in its own module:
``switch_dit.ops.mixed_bmm`` (mixed weights per sample, then bmm; the weight gradient as row-scaled
GEMMs) and ``switch_dit.ops.expert_grouped`` (samples grouped by expert, grouped GEMMs).

Each is one ``torch.library`` custom op forward and one backward, with fake kernels, so that
``torch.compile(fullgraph=True)`` and CUDA graphs see one op per call. Both bodies run with
autocast off on tensors already cast (as ``torch.amp.custom_fwd(cast_inputs=...)`` +
``custom_bwd`` would): under autocast x, weight and bias take the autocast dtype like F.linear,
coef keeps its own, and the backward sees exactly the dtypes of the forward. Gradients come back
in each input's dtype.

Default for fp32 without TF32 (``torch.backends.cuda.matmul.allow_tf32 = False``, PyTorch's
default for fp32): "bmm", in the shipped table ``switch_dit.ops.strategy_table`` that decides
where "auto" may not time. The fp32 "ieee" path is where the Triton kernels were weakest (the
expert reading found every forward/dx config spilling registers; the kernels now have non-spilling
fp32 configs, still unmeasured), while cuBLAS's SGEMM is the best-tuned fp32 GEMM there is;
"bmm" does one dense linear's FLOPs forward and two backward. "grouped" has no sync-free grouped
GEMM on CUDA in fp32 and runs its per-pair fallback there (see expert_grouped), so it is never the
fp32 default. Where "auto" may time, the measurement decides.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from switch_dit import _checks
from switch_dit.ops import dispatch, expert_grouped, mixed_bmm
from switch_dit.routing import ExpertGroups

__all__ = ["COMPOSED_STRATEGIES", "composed_mixed_linear", "composed_expert_mask_and_apply"]

_IMPLS = {"bmm": mixed_bmm, "grouped": expert_grouped}
COMPOSED_STRATEGIES = tuple(_IMPLS)


def _impl(strategy: str):
    try:
        return _IMPLS[strategy]
    except KeyError:
        raise ValueError(f"strategy must be one of {COMPOSED_STRATEGIES}, got {strategy!r}") from None


def _given(order: Optional[Tensor], position: Optional[Tensor], offsets: Optional[Tensor]) -> dict:
    # The routing plan's grouping, for the strategy that groups ("grouped"); {} when not given.
    return {} if order is None else {"groups": ExpertGroups(order, position, offsets)}


def _none(x: Tensor) -> Tensor:
    # Custom ops return tensors only: a fresh empty tensor stands for "not computed".
    return x.new_empty((0,))


@torch.library.custom_op("switch_dit::composed_mixed_linear", mutates_args=())
def _forward_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    idx: Tensor,
    coef: Tensor,
    add_one: bool,
    apply: bool,
    strategy: str,
    order: Optional[Tensor] = None,
    position: Optional[Tensor] = None,
    offsets: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    _checks.check_expert_index_values(idx, weight.shape[0])
    with dispatch.no_autocast(x.device.type):
        y = _impl(strategy).forward(x, weight, bias, idx, coef, add_one, **_given(order, position, offsets))
        return y, (x * y if apply else _none(x))


@_forward_op.register_fake
def _(x, weight, bias, idx, coef, add_one, apply, strategy, order=None, position=None, offsets=None):
    shape = (x.shape[0], x.shape[1], weight.shape[2])
    return x.new_empty(shape), (x.new_empty(shape) if apply else _none(x))


@torch.library.custom_op("switch_dit::composed_mixed_linear_backward", mutates_args=())
def _backward_op(
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
    strategy: str,
    order: Optional[Tensor] = None,
    position: Optional[Tensor] = None,
    offsets: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with dispatch.no_autocast(x.device.type):
        # r0 = x * m: its gradient reaches m as grad_r * x and x as grad_r * m.
        dA = grad_y.to(x.dtype) if grad_y is not None else None
        if grad_r is not None:
            dA = grad_r * x if dA is None else dA + grad_r * x
        if dA is None:
            dA = x.new_zeros(x.shape[0], x.shape[1], weight.shape[2])
        dx, dw, db, dc = _impl(strategy).backward(
            dA,
            x,
            weight,
            bias,
            idx,
            coef,
            need_dx,
            need_dw,
            need_db and bias is not None,
            need_dc,
            **_given(order, position, offsets),
        )
        if need_dx and grad_r is not None:
            dx = dx + (grad_r * m).to(x.dtype)
    return tuple(t if t is not None else _none(x) for t in (dx, dw, db, dc))


@_backward_op.register_fake
def _(
    grad_y,
    grad_r,
    x,
    m,
    weight,
    bias,
    idx,
    coef,
    need_dx,
    need_dw,
    need_db,
    need_dc,
    strategy,
    order=None,
    position=None,
    offsets=None,
):
    return (
        x.new_empty(x.shape) if need_dx else _none(x),
        weight.new_empty(weight.shape) if need_dw else _none(x),
        bias.new_empty(bias.shape) if need_db and bias is not None else _none(x),
        coef.new_empty(coef.shape) if need_dc else _none(x),
    )


def _setup(ctx, inputs, output):
    x, weight, bias, idx, coef, _, apply, strategy, order, position, offsets = inputs
    ctx.returns_r0, ctx.strategy = apply, strategy
    ctx.save_for_backward(x, weight, bias, idx, coef, output[0] if apply else None, order, position, offsets)


def _backward(ctx, grad_y, grad_r):
    x, weight, bias, idx, coef, m, order, position, offsets = ctx.saved_tensors
    nx, nw, nb, _, nc = ctx.needs_input_grad[:5]
    nb = nb and bias is not None
    grad_r = grad_r if ctx.returns_r0 else None
    dx, dw, db, dc = _backward_op(
        grad_y, grad_r, x, m, weight, bias, idx, coef, nx, nw, nb, nc, ctx.strategy, order, position, offsets
    )
    grads = (dx if nx else None, dw if nw else None, db if nb else None, None, dc if nc else None)
    return grads + (None,) * 6  # add_one, apply, strategy, order, position, offsets


_forward_op.register_autograd(_backward, setup_context=_setup)


def _plan_args(strategy: str, groups: Optional[ExpertGroups]) -> tuple:
    # Only "grouped" reads a grouping; the other strategies never see it.
    return tuple(groups) if strategy == "grouped" and groups is not None else (None, None, None)


def composed_mixed_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    idx: Tensor,
    coef: Tensor,
    *,
    strategy: str = "bmm",
    add_one: bool = False,
    groups: Optional[ExpertGroups] = None,
) -> Tensor:
    """y_b = x_b @ (sum_j coef_bj weight[idx_bj]) + sum_j coef_bj bias[idx_bj] (+ 1 with add_one).

    x (B, L, D_in), weight (M, D_in, D_out), bias (M, D_out) or None, idx (B, k), coef (B, k)
    -> (B, L, D_out) in x's dtype; differentiable in x, weight, bias and coef. Arguments are
    expected valid (``switch_dit.ops.mixed_linear`` checks them, then calls this for
    ``backend="bmm"`` / ``"grouped"``); only the strategy name and index values are checked here.
    ``groups``: idx grouped by expert (the routing plan's, checked by the caller), read by "grouped".
    """
    _impl(strategy)
    x, weight, bias = dispatch.autocast_inputs(x, weight, bias)  # coef keeps its dtype
    return _forward_op(x, weight, bias, idx, coef, bool(add_one), False, strategy, *_plan_args(strategy, groups))[0]


def composed_expert_mask_and_apply(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    idx: Tensor,
    coef: Tensor,
    *,
    strategy: str = "bmm",
    groups: Optional[ExpertGroups] = None,
) -> tuple[Tensor, Tensor]:
    """(m = 1 + mixed_linear(x, ...), r0 = x * m), both (B, L, D); arguments as composed_mixed_linear."""
    _impl(strategy)
    x, weight, bias = dispatch.autocast_inputs(x, weight, bias)  # coef keeps its dtype
    m, r0 = _forward_op(x, weight, bias, idx, coef, True, True, strategy, *_plan_args(strategy, groups))
    return m, r0


# --------------------------------------------------------------------------- registration
# backend="bmm" / "grouped" of the three routed-linear ops (switch_dit.ops.dispatch). They run on
# any device and floating dtype, so they support every call the ops accept.


def _register(strategy: str) -> None:
    def linear(x, weight, bias, idx, coef, groups=None):
        return composed_mixed_linear(x, weight, bias, idx, coef, strategy=strategy, groups=groups)

    def mask(x, weight, bias, idx, coef, groups=None):
        return composed_mixed_linear(x, weight, bias, idx, coef, strategy=strategy, add_one=True, groups=groups)

    def mask_and_apply(x, weight, bias, idx, coef, groups=None):
        return composed_expert_mask_and_apply(x, weight, bias, idx, coef, strategy=strategy, groups=groups)

    dispatch.register("mixed_linear", strategy, linear)
    dispatch.register("expert_mask", strategy, mask)
    dispatch.register("expert_mask_and_apply", strategy, mask_and_apply)


for _strategy in COMPOSED_STRATEGIES:
    _register(_strategy)
