"""Fused block ops: mask + LayerNorm + adaLN modulate, gated residuals (docs/design.md §2.2).

Public ops (x, z, r0, attn_out, y: (B, L, D); m: (B, L, D), (B, 1, D) or None;
shift, scale, gate: (B, D); LayerNorm without affine, eps 1e-6 by default;
modulate(h, shift, scale) = h * (1 + scale[:, None]) + shift[:, None]):

  mask_ln_modulate(x, m, shift, scale)              -> h = modulate(LN(x * m)), or (r0 = x * m, h)
  residual_ln_modulate(z, r0, attn_out, gate, shift, scale)
                                                    -> (zr = z + gate * attn_out,
                                                        h = modulate(LN(r0 + gate * attn_out)))
  gated_residual(z, y, gate)                        -> z + gate * y

Together they compute a masked DiT block without ever forming (1 - m) * z:
``fused_block`` is that composition, ``reference_block`` the block as the paper writes it.

Strategies (``backend=``; switch_dit.ops.dispatch, ``strategies("mask_ln_modulate")``):
"reference" is the plain PyTorch twin (autograd does the gradients); "fused" (alias
"triton") runs the Triton kernels of ``switch_dit.kernels.norm_modulate`` inside one
torch.library custom op per direction, saving only the inputs and the per-row mean / rstd;
"emulated" is the same custom ops with every kernel replaced by its PyTorch formula
(float64-exact on any device: it checks the hand-written backward, and is never chosen by
"auto"); None / "auto" chooses (docs/design.md §3).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from switch_dit.ops import dispatch

__all__ = [
    "mask_ln_modulate",
    "residual_ln_modulate",
    "gated_residual",
    "mask_ln_modulate_reference",
    "residual_ln_modulate_reference",
    "gated_residual_reference",
    "fused_block",
    "reference_block",
]

_EPS = 1e-6


# ----------------------------------------------------------------------------------
# Reference twins: the plainest PyTorch, the ground truth of the tests
# ----------------------------------------------------------------------------------


def _modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _ln(x: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def mask_ln_modulate_reference(x, m, shift, scale, eps: float = _EPS) -> tuple[Tensor, Tensor]:
    """-> (r0 = x * m (x itself when m is None), h = modulate(LN(r0), shift, scale)), both (B, L, D)."""
    r0 = x if m is None else x * m
    return r0, _modulate(_ln(r0, eps), shift, scale)


def residual_ln_modulate_reference(z, r0, attn_out, gate, shift, scale, eps: float = _EPS) -> tuple[Tensor, Tensor]:
    """-> (zr = z + gate * attn_out, h = modulate(LN(r0 + gate * attn_out), shift, scale))."""
    a = gate.unsqueeze(1) * attn_out
    return z + a, _modulate(_ln(r0 + a, eps), shift, scale)


def gated_residual_reference(z, y, gate) -> Tensor:
    """-> z + gate[:, None] * y (B, L, D)."""
    return z + gate.unsqueeze(1) * y


# ----------------------------------------------------------------------------------
# PyTorch formulas of the kernels ("emulated"): same inputs, outputs, saved state
# ----------------------------------------------------------------------------------


def _compute_dtype(*ts: Optional[Tensor]) -> torch.dtype:
    """The kernels' accumulation dtype: float64 if any input is float64 (exact gradchecks), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _stats(r: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    mean = r.mean(-1)
    rstd = torch.rsqrt((r - mean.unsqueeze(-1)).square().mean(-1) + eps)
    return mean, rstd


def _ln_grad(dn: Tensor, n: Tensor, rstd: Tensor) -> Tensor:
    """Gradient through n = (u - mean(u)) * rstd(u), per row."""
    return (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True)) * rstd.unsqueeze(-1)


def _emulated_mask_ln_modulate_fwd(x, m, shift, scale, eps, write_r0):
    compute = _compute_dtype(x, m, shift, scale)
    r = x.to(compute) if m is None else x.to(compute) * m.to(compute)
    mean, rstd = _stats(r, eps)
    n = (r - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    h = n * (1 + scale.to(compute).unsqueeze(1)) + shift.to(compute).unsqueeze(1)
    r0_dtype, h_dtype = _mask_ln_modulate_dtypes(x, m, shift, scale)
    r0 = r.to(r0_dtype) if (write_r0 and m is not None) else None
    return r0, h.to(h_dtype), mean, rstd


def _emulated_mask_ln_modulate_bwd(x, m, scale, mean, rstd, dh, dr0, need_dm, shift_dtype):
    compute = mean.dtype
    r = x.to(compute) if m is None else x.to(compute) * m.to(compute)
    n = (r - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dh = dh.to(compute)
    dshift, dscale = dh.sum(1), (dh * n).sum(1)
    dr = _ln_grad(dh * (1 + scale.to(compute).unsqueeze(1)), n, rstd)
    if dr0 is not None:
        dr = dr + dr0.to(compute)
    dx = dr if m is None else dr * m.to(compute)
    dm = None
    if m is not None and need_dm:
        dm = (dr * x.to(compute)).sum_to_size(m.shape).to(m.dtype)
    return dx.to(x.dtype), dm, dshift.to(shift_dtype), dscale.to(scale.dtype)


def _emulated_residual_ln_modulate_fwd(z, r0, attn_out, gate, shift, scale, eps):
    compute = _compute_dtype(z, r0, attn_out, gate, shift, scale)
    a = gate.to(compute).unsqueeze(1) * attn_out.to(compute)
    u = r0.to(compute) + a
    mean, rstd = _stats(u, eps)
    n = (u - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    h = n * (1 + scale.to(compute).unsqueeze(1)) + shift.to(compute).unsqueeze(1)
    zr_dtype, h_dtype = _residual_ln_modulate_dtypes(z, r0, attn_out, gate, shift, scale)
    return (z.to(compute) + a).to(zr_dtype), h.to(h_dtype), mean, rstd


def _emulated_residual_ln_modulate_bwd(r0, attn_out, gate, scale, mean, rstd, dzr, dh, shift_dtype):
    compute = mean.dtype
    g, attn = gate.to(compute).unsqueeze(1), attn_out.to(compute)
    n = (r0.to(compute) + g * attn - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dh = dh.to(compute)
    du = _ln_grad(dh * (1 + scale.to(compute).unsqueeze(1)), n, rstd)
    da = du if dzr is None else du + dzr.to(compute)
    return (
        du.to(r0.dtype),
        (g * da).to(attn_out.dtype),
        (da * attn).sum(1).to(gate.dtype),
        dh.sum(1).to(shift_dtype),
        (dh * n).sum(1).to(scale.dtype),
    )


def _emulated_gated_residual_fwd(z, y, gate):
    compute = _compute_dtype(z, y, gate)
    return (z.to(compute) + gate.to(compute).unsqueeze(1) * y.to(compute)).to(_gated_residual_dtype(z, y, gate))


def _emulated_gated_residual_bwd(y, gate, dout):
    compute = _compute_dtype(y, gate, dout)
    do = dout.to(compute)
    return (gate.to(compute).unsqueeze(1) * do).to(y.dtype), (do * y.to(compute)).sum(1).to(gate.dtype)


# Output dtypes follow PyTorch's promotion of the reference expressions.
def _mask_ln_modulate_dtypes(x, m, shift, scale):
    r0 = x.dtype if m is None else torch.promote_types(x.dtype, m.dtype)
    return r0, torch.promote_types(r0, torch.promote_types(shift.dtype, scale.dtype))


def _residual_ln_modulate_dtypes(z, r0, attn_out, gate, shift, scale):
    a = torch.promote_types(gate.dtype, attn_out.dtype)
    h = torch.promote_types(torch.promote_types(r0.dtype, a), torch.promote_types(shift.dtype, scale.dtype))
    return torch.promote_types(z.dtype, a), h


def _gated_residual_dtype(z, y, gate):
    return torch.promote_types(z.dtype, torch.promote_types(gate.dtype, y.dtype))


class _Emulated:
    """The kernels' functions as PyTorch formulas: the "emulated" strategy runs the custom ops and
    their hand-written backward with these in place of the Triton launches."""

    mask_ln_modulate_fwd = staticmethod(_emulated_mask_ln_modulate_fwd)
    mask_ln_modulate_bwd = staticmethod(_emulated_mask_ln_modulate_bwd)
    residual_ln_modulate_fwd = staticmethod(_emulated_residual_ln_modulate_fwd)
    residual_ln_modulate_bwd = staticmethod(_emulated_residual_ln_modulate_bwd)
    gated_residual_fwd = staticmethod(_emulated_gated_residual_fwd)
    gated_residual_bwd = staticmethod(_emulated_gated_residual_bwd)


def _functions(strategy: str):
    """The kernel functions a custom op runs: Triton's for "fused", their formulas for "emulated"."""
    if strategy == "fused":
        return dispatch.kernels("norm_modulate")
    if strategy == "emulated":
        return _Emulated
    raise ValueError(f"the norm custom ops run strategy 'fused' or 'emulated', got {strategy!r}")


# ----------------------------------------------------------------------------------
# Custom ops: one boundary per direction of each fused op
# ----------------------------------------------------------------------------------


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    # Stands in for an output that was not asked for (custom ops have no Optional outputs).
    return torch.empty((0,), dtype=dtype, device=like.device)


@torch.library.custom_op("switch_dit::mask_ln_modulate", mutates_args=())
def _mask_ln_modulate_op(
    x: Tensor, m: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float, write_r0: bool, strategy: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with dispatch.on_device(x):
        r0, h, mean, rstd = _functions(strategy).mask_ln_modulate_fwd(x, m, shift, scale, eps, write_r0)
    return (r0 if r0 is not None else _empty(x, h.dtype)), h, mean, rstd


@_mask_ln_modulate_op.register_fake
def _(x, m, shift, scale, eps, write_r0, strategy):
    B, L, D = x.shape
    r0_dtype, h_dtype = _mask_ln_modulate_dtypes(x, m, shift, scale)
    c = _compute_dtype(x, m, shift, scale)
    r0 = x.new_empty((B, L, D), dtype=r0_dtype) if (write_r0 and m is not None) else _empty(x, h_dtype)
    return r0, x.new_empty((B, L, D), dtype=h_dtype), x.new_empty((B, L), dtype=c), x.new_empty((B, L), dtype=c)


@torch.library.custom_op("switch_dit::mask_ln_modulate_backward", mutates_args=())
def _mask_ln_modulate_backward_op(
    x: Tensor,
    m: Optional[Tensor],
    scale: Tensor,
    mean: Tensor,
    rstd: Tensor,
    dh: Tensor,
    dr0: Optional[Tensor],
    need_dm: bool,
    shift_dtype: torch.dtype,
    strategy: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with dispatch.on_device(x):
        dx, dm, dshift, dscale = _functions(strategy).mask_ln_modulate_bwd(
            x, m, scale, mean, rstd, dh, dr0, need_dm, shift_dtype
        )
    return dx, (dm if dm is not None else _empty(x, x.dtype)), dshift, dscale


@_mask_ln_modulate_backward_op.register_fake
def _(x, m, scale, mean, rstd, dh, dr0, need_dm, shift_dtype, strategy):
    B, L, D = x.shape
    dm = m.new_empty(m.shape) if (m is not None and need_dm) else _empty(x, x.dtype)
    return x.new_empty(x.shape), dm, x.new_empty((B, D), dtype=shift_dtype), scale.new_empty((B, D))


def _mask_ln_modulate_setup(ctx, inputs, output):
    x, m, shift, scale, eps, write_r0, strategy = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(x, m, scale, mean, rstd)
    ctx.write_r0 = write_r0 and m is not None
    ctx.strategy = strategy
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _mask_ln_modulate_backward(ctx, dr0, dh, _dmean, _drstd):
    x, m, scale, mean, rstd = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    dr0 = dr0 if ctx.write_r0 else None
    need_dm = m is not None and ctx.needs_input_grad[1]
    dx, dm, dshift, dscale = _mask_ln_modulate_backward_op(
        x, m, scale, mean, rstd, dh, dr0, need_dm, ctx.shift_dtype, ctx.strategy
    )
    return dx, (dm if need_dm else None), dshift, dscale, None, None, None


_mask_ln_modulate_op.register_autograd(_mask_ln_modulate_backward, setup_context=_mask_ln_modulate_setup)


@torch.library.custom_op("switch_dit::residual_ln_modulate", mutates_args=())
def _residual_ln_modulate_op(
    z: Tensor, r0: Tensor, attn_out: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float, strategy: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with dispatch.on_device(z):
        return tuple(_functions(strategy).residual_ln_modulate_fwd(z, r0, attn_out, gate, shift, scale, eps))


@_residual_ln_modulate_op.register_fake
def _(z, r0, attn_out, gate, shift, scale, eps, strategy):
    B, L, D = z.shape
    zr_dtype, h_dtype = _residual_ln_modulate_dtypes(z, r0, attn_out, gate, shift, scale)
    c = _compute_dtype(z, r0, attn_out, gate, shift, scale)
    return (
        z.new_empty((B, L, D), dtype=zr_dtype),
        z.new_empty((B, L, D), dtype=h_dtype),
        z.new_empty((B, L), dtype=c),
        z.new_empty((B, L), dtype=c),
    )


@torch.library.custom_op("switch_dit::residual_ln_modulate_backward", mutates_args=())
def _residual_ln_modulate_backward_op(
    r0: Tensor,
    attn_out: Tensor,
    gate: Tensor,
    scale: Tensor,
    mean: Tensor,
    rstd: Tensor,
    dzr: Optional[Tensor],
    dh: Tensor,
    shift_dtype: torch.dtype,
    strategy: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with dispatch.on_device(r0):
        return tuple(
            _functions(strategy).residual_ln_modulate_bwd(r0, attn_out, gate, scale, mean, rstd, dzr, dh, shift_dtype)
        )


@_residual_ln_modulate_backward_op.register_fake
def _(r0, attn_out, gate, scale, mean, rstd, dzr, dh, shift_dtype, strategy):
    B, L, D = r0.shape
    return (
        r0.new_empty(r0.shape),
        attn_out.new_empty(attn_out.shape),
        gate.new_empty((B, D)),
        r0.new_empty((B, D), dtype=shift_dtype),
        scale.new_empty((B, D)),
    )


def _residual_ln_modulate_setup(ctx, inputs, output):
    z, r0, attn_out, gate, shift, scale, eps, strategy = inputs
    _, _, mean, rstd = output
    # z is not needed: dz is the incoming gradient of zr itself.
    ctx.save_for_backward(r0, attn_out, gate, scale, mean, rstd)
    ctx.strategy = strategy
    ctx.shift_dtype = shift.dtype
    ctx.z_dtype = z.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _residual_ln_modulate_backward(ctx, dzr, dh, _dmean, _drstd):
    r0, attn_out, gate, scale, mean, rstd = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros(r0.shape, dtype=r0.dtype, device=r0.device)
    dr0, dattn, dgate, dshift, dscale = _residual_ln_modulate_backward_op(
        r0, attn_out, gate, scale, mean, rstd, dzr, dh, ctx.shift_dtype, ctx.strategy
    )
    dz = None
    if ctx.needs_input_grad[0]:
        dz = torch.zeros(r0.shape, dtype=ctx.z_dtype, device=r0.device) if dzr is None else dzr.to(ctx.z_dtype)
    return dz, dr0, dattn, dgate, dshift, dscale, None, None


_residual_ln_modulate_op.register_autograd(_residual_ln_modulate_backward, setup_context=_residual_ln_modulate_setup)


@torch.library.custom_op("switch_dit::gated_residual", mutates_args=())
def _gated_residual_op(z: Tensor, y: Tensor, gate: Tensor, strategy: str) -> Tensor:
    with dispatch.on_device(z):
        return _functions(strategy).gated_residual_fwd(z, y, gate)


@_gated_residual_op.register_fake
def _(z, y, gate, strategy):
    return z.new_empty(z.shape, dtype=_gated_residual_dtype(z, y, gate))


@torch.library.custom_op("switch_dit::gated_residual_backward", mutates_args=())
def _gated_residual_backward_op(y: Tensor, gate: Tensor, dout: Tensor, strategy: str) -> tuple[Tensor, Tensor]:
    with dispatch.on_device(y):
        return tuple(_functions(strategy).gated_residual_bwd(y, gate, dout))


@_gated_residual_backward_op.register_fake
def _(y, gate, dout, strategy):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _gated_residual_setup(ctx, inputs, output):
    z, y, gate, strategy = inputs
    ctx.save_for_backward(y, gate)
    ctx.strategy = strategy
    ctx.z_dtype = z.dtype


def _gated_residual_backward(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = _gated_residual_backward_op(y, gate, dout, ctx.strategy)
    dz = dout.to(ctx.z_dtype) if ctx.needs_input_grad[0] else None
    return dz, dy, dgate, None


_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


# ----------------------------------------------------------------------------------
# Validation and backend choice
# ----------------------------------------------------------------------------------


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_rows(x_name: str, x: Tensor, others: Sequence[tuple[str, Tensor]]) -> None:
    """x (B, L, D) and every other row tensor of the same shape and device."""
    _check_tensor(x_name, x, 3)
    for name, t in others:
        _check_tensor(name, t, 3)
        if t.shape != x.shape:
            raise ValueError(f"{name} must have the shape of {x_name} {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")


def _check_vecs(x_name: str, x: Tensor, vecs: Sequence[tuple[str, Tensor]]) -> None:
    B, _, D = x.shape
    for name, t in vecs:
        _check_tensor(name, t, 2)
        if tuple(t.shape) != (B, D):
            raise ValueError(f"{name} must have shape (B, D) = ({B}, {D}), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")


def _check_eps(eps) -> float:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return float(eps)


# ----------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------


def mask_ln_modulate(
    x: Tensor,
    m: Optional[Tensor],
    shift: Tensor,
    scale: Tensor,
    *,
    eps: float = _EPS,
    return_r0: bool = False,
    backend: Optional[str] = None,
):
    """h = modulate(LN(x * m), shift, scale); with return_r0, (r0 = x * m, h).

    x (B, L, D); m (B, L, D), (B, 1, D) (a per-sample mask, e.g. DTR's) or None (dense
    DiT, r0 is x itself); shift, scale (B, D). Floating dtypes, mixed allowed (outputs
    follow PyTorch promotion); any strides. Gradients reach x, m, shift, scale and, with
    return_r0, the gradient of r0 is added to the one flowing back through LN.
    """
    _check_rows("x", x, [])
    if m is not None:
        _check_tensor("m", m, 3)
        B, L, D = x.shape
        if tuple(m.shape) not in ((B, L, D), (B, 1, D)):
            raise ValueError(
                f"m must have shape (B, L, D) = {(B, L, D)} or (B, 1, D) = {(B, 1, D)}, got {tuple(m.shape)}"
            )
        if m.device != x.device:
            raise ValueError(f"m is on {m.device} but x is on {x.device}")
    _check_vecs("x", x, [("shift", shift), ("scale", scale)])
    eps = _check_eps(eps)
    return dispatch.call("mask_ln_modulate", backend, x, m, shift, scale, eps=eps, return_r0=bool(return_r0))


def residual_ln_modulate(
    z: Tensor,
    r0: Tensor,
    attn_out: Tensor,
    gate: Tensor,
    shift: Tensor,
    scale: Tensor,
    *,
    eps: float = _EPS,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """(zr = z + gate * attn_out, h = modulate(LN(r0 + gate * attn_out), shift, scale)) in one pass.

    z, r0, attn_out (B, L, D): the block input, the masked branch input (r0 = z * m; z
    itself for a dense block) and the raw attention output; gate, shift, scale (B, D)
    (gate_msa, shift_mlp, scale_mlp). Gradients reach all six tensors.
    """
    _check_rows("z", z, [("r0", r0), ("attn_out", attn_out)])
    _check_vecs("z", z, [("gate", gate), ("shift", shift), ("scale", scale)])
    eps = _check_eps(eps)
    return dispatch.call("residual_ln_modulate", backend, z, r0, attn_out, gate, shift, scale, eps=eps)


def gated_residual(z: Tensor, y: Tensor, gate: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """z + gate[:, None] * y: z, y (B, L, D), gate (B, D) -> (B, L, D). Gradients reach all three."""
    _check_rows("z", z, [("y", y)])
    _check_vecs("z", z, [("gate", gate)])
    return dispatch.call("gated_residual", backend, z, y, gate)


# ----------------------------------------------------------------------------------
# Strategies: each impl has its op's signature without backend (switch_dit.ops.dispatch)
# ----------------------------------------------------------------------------------


def _reference_mask_ln_modulate(x, m, shift, scale, eps=_EPS, return_r0=False):
    r0, h = mask_ln_modulate_reference(x, m, shift, scale, eps)
    return (r0, h) if return_r0 else h


def _reference_residual_ln_modulate(z, r0, attn_out, gate, shift, scale, eps=_EPS):
    return residual_ln_modulate_reference(z, r0, attn_out, gate, shift, scale, eps)


def _custom_op_strategy(strategy: str):
    """The three ops through their custom ops and hand-written backward, kernels by ``strategy``."""

    def mask_ln_modulate_impl(x, m, shift, scale, eps=_EPS, return_r0=False):
        r0, h, _, _ = _mask_ln_modulate_op(x, m, shift, scale, eps, return_r0, strategy)
        return ((x if m is None else r0), h) if return_r0 else h

    def residual_ln_modulate_impl(z, r0, attn_out, gate, shift, scale, eps=_EPS):
        zr, h, _, _ = _residual_ln_modulate_op(z, r0, attn_out, gate, shift, scale, eps, strategy)
        return zr, h

    def gated_residual_impl(z, y, gate):
        return _gated_residual_op(z, y, gate, strategy)

    return {
        "mask_ln_modulate": mask_ln_modulate_impl,
        "residual_ln_modulate": residual_ln_modulate_impl,
        "gated_residual": gated_residual_impl,
    }


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused_unavailable(x, *args, **kw):
    reason = dispatch.kernels_unavailable("norm_modulate", _FUSED_DTYPES, x)
    if reason is None and x.shape[-1] > dispatch.kernels("norm_modulate").MAX_D:
        reason = f"holds a whole row of D in one program: D = {x.shape[-1]} exceeds its limit"
    return reason


for _op, _reference in (
    ("mask_ln_modulate", _reference_mask_ln_modulate),
    ("residual_ln_modulate", _reference_residual_ln_modulate),
    ("gated_residual", gated_residual_reference),
):
    dispatch.register(_op, "reference", _reference)
    dispatch.register(_op, "fused", _custom_op_strategy("fused")[_op], supports=_fused_unavailable)
    # A test tool (checks the hand-written backward in float64, on any device), never faster than reference.
    dispatch.register(_op, "emulated", _custom_op_strategy("emulated")[_op], tunable=False)
dispatch.kernels("norm_modulate")  # imported now, not while torch.compile traces a first call


# ----------------------------------------------------------------------------------
# The block identity
# ----------------------------------------------------------------------------------

Branch = Callable[[Tensor], Tensor]


def reference_block(
    z: Tensor, m: Optional[Tensor], ada: Sequence[Tensor], attn: Branch, mlp: Branch, eps: float = _EPS
) -> Tensor:
    """The masked adaLN-Zero block as written (docs/design.md §1): z (B, L, D), m as in
    mask_ln_modulate, ada = (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) (B, D) each."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada
    r = z if m is None else z * m
    r = r + gate_msa.unsqueeze(1) * attn(_modulate(_ln(r, eps), shift_msa, scale_msa))
    r = r + gate_mlp.unsqueeze(1) * mlp(_modulate(_ln(r, eps), shift_mlp, scale_mlp))
    return r if m is None else r + (1 - m) * z


def fused_block(
    z: Tensor,
    m: Optional[Tensor],
    ada: Sequence[Tensor],
    attn: Branch,
    mlp: Branch,
    eps: float = _EPS,
    backend: Optional[str] = None,
) -> Tensor:
    """The same block through the fused ops, by identity (b): out = z + a + f, where
    a = gate_msa * attn(h1) and f = gate_mlp * mlp(h2) and the mask only shapes h1, h2."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada
    r0, h1 = mask_ln_modulate(z, m, shift_msa, scale_msa, eps=eps, return_r0=True, backend=backend)
    zr, h2 = residual_ln_modulate(z, r0, attn(h1), gate_msa, shift_mlp, scale_mlp, eps=eps, backend=backend)
    return gated_residual(zr, mlp(h2), gate_mlp, backend=backend)
