"""Fused block ops: mask + LayerNorm + adaLN modulate, gated residuals (DESIGN.md §2 (b)).

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

Backends: "reference" is the plain PyTorch twin (autograd does the gradients);
"triton" runs the Triton kernels of ``switch_dit.kernels.norm_modulate`` inside one
torch.library custom op per direction, saving only the inputs and the per-row
mean / rstd; "torch" is the same custom ops with every kernel replaced by its PyTorch
formula (CPU-friendly, float64-exact, used to gradcheck the hand-written backward);
None / "auto" picks "triton" for CUDA tensors when Triton is importable, else "reference".
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton is optional: without it only "reference" and "torch" run.
    from switch_dit.kernels import norm_modulate as _K
except Exception:  # pragma: no cover - depends on the install
    _K = None

__all__ = [
    "mask_ln_modulate",
    "residual_ln_modulate",
    "gated_residual",
    "mask_ln_modulate_reference",
    "residual_ln_modulate_reference",
    "gated_residual_reference",
    "fused_block",
    "reference_block",
    "NORM_MODULATE_BACKENDS",
]

NORM_MODULATE_BACKENDS = ("auto", "reference", "torch", "triton")
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
# PyTorch formulas of the kernels ("torch" impl): same inputs, outputs, saved state
# ----------------------------------------------------------------------------------


def _cdt(*ts: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _stats(r: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    mean = r.mean(-1)
    rstd = torch.rsqrt((r - mean.unsqueeze(-1)).square().mean(-1) + eps)
    return mean, rstd


def _ln_grad(dn: Tensor, n: Tensor, rstd: Tensor) -> Tensor:
    """Gradient through n = (u - mean(u)) * rstd(u), per row."""
    return (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True)) * rstd.unsqueeze(-1)


def _mln_fwd_torch(x, m, shift, scale, eps, write_r0):
    c = _cdt(x, m, shift, scale)
    r = x.to(c) if m is None else x.to(c) * m.to(c)
    mean, rstd = _stats(r, eps)
    h = (r - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * (1 + scale.to(c).unsqueeze(1)) + shift.to(c).unsqueeze(1)
    r0_dtype, h_dtype = _mln_dtypes(x, m, shift, scale)
    r0 = r.to(r0_dtype) if (write_r0 and m is not None) else None
    return r0, h.to(h_dtype), mean, rstd


def _mln_bwd_torch(x, m, scale, mean, rstd, dh, dr0, need_dm, shift_dtype):
    c = mean.dtype
    r = x.to(c) if m is None else x.to(c) * m.to(c)
    n = (r - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dh = dh.to(c)
    dshift, dscale = dh.sum(1), (dh * n).sum(1)
    dr = _ln_grad(dh * (1 + scale.to(c).unsqueeze(1)), n, rstd)
    if dr0 is not None:
        dr = dr + dr0.to(c)
    dx = dr if m is None else dr * m.to(c)
    dm = None
    if m is not None and need_dm:
        dm = (dr * x.to(c)).sum_to_size(m.shape).to(m.dtype)
    return dx.to(x.dtype), dm, dshift.to(shift_dtype), dscale.to(scale.dtype)


def _rlm_fwd_torch(z, r0, attn_out, gate, shift, scale, eps):
    c = _cdt(z, r0, attn_out, gate, shift, scale)
    a = gate.to(c).unsqueeze(1) * attn_out.to(c)
    u = r0.to(c) + a
    mean, rstd = _stats(u, eps)
    h = (u - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * (1 + scale.to(c).unsqueeze(1)) + shift.to(c).unsqueeze(1)
    zr_dtype, h_dtype = _rlm_dtypes(z, r0, attn_out, gate, shift, scale)
    return (z.to(c) + a).to(zr_dtype), h.to(h_dtype), mean, rstd


def _rlm_bwd_torch(r0, attn_out, gate, scale, mean, rstd, dzr, dh, shift_dtype):
    c = mean.dtype
    g, attn = gate.to(c).unsqueeze(1), attn_out.to(c)
    n = (r0.to(c) + g * attn - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dh = dh.to(c)
    du = _ln_grad(dh * (1 + scale.to(c).unsqueeze(1)), n, rstd)
    da = du if dzr is None else du + dzr.to(c)
    return (
        du.to(r0.dtype), (g * da).to(attn_out.dtype), (da * attn).sum(1).to(gate.dtype),
        dh.sum(1).to(shift_dtype), (dh * n).sum(1).to(scale.dtype),
    )


def _gr_fwd_torch(z, y, gate):
    c = _cdt(z, y, gate)
    return (z.to(c) + gate.to(c).unsqueeze(1) * y.to(c)).to(_gr_dtype(z, y, gate))


def _gr_bwd_torch(y, gate, dout):
    c = _cdt(y, gate, dout)
    do = dout.to(c)
    return (gate.to(c).unsqueeze(1) * do).to(y.dtype), (do * y.to(c)).sum(1).to(gate.dtype)


# Output dtypes follow PyTorch's promotion of the reference expressions.
def _mln_dtypes(x, m, shift, scale):
    r0 = x.dtype if m is None else torch.promote_types(x.dtype, m.dtype)
    return r0, torch.promote_types(r0, torch.promote_types(shift.dtype, scale.dtype))


def _rlm_dtypes(z, r0, attn_out, gate, shift, scale):
    a = torch.promote_types(gate.dtype, attn_out.dtype)
    h = torch.promote_types(torch.promote_types(r0.dtype, a), torch.promote_types(shift.dtype, scale.dtype))
    return torch.promote_types(z.dtype, a), h


def _gr_dtype(z, y, gate):
    return torch.promote_types(z.dtype, torch.promote_types(gate.dtype, y.dtype))


def _on_its_device(launch):
    """Triton launches on the current CUDA device: make it that of the first tensor."""

    @functools.wraps(launch)
    def run(first: Tensor, *args, **kwargs):
        with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
            return launch(first, *args, **kwargs)

    return run


@functools.lru_cache(maxsize=None)
def _impl(name: str):
    if name == "triton":
        if _K is None:
            raise RuntimeError("backend 'triton' needs Triton, which could not be imported")
        return {key: _on_its_device(fn) for key, fn in (
            ("mln_fwd", _K.mask_ln_modulate_fwd), ("mln_bwd", _K.mask_ln_modulate_bwd),
            ("rlm_fwd", _K.residual_ln_modulate_fwd), ("rlm_bwd", _K.residual_ln_modulate_bwd),
            ("gr_fwd", _K.gated_residual_fwd), ("gr_bwd", _K.gated_residual_bwd),
        )}
    return {
        "mln_fwd": _mln_fwd_torch, "mln_bwd": _mln_bwd_torch,
        "rlm_fwd": _rlm_fwd_torch, "rlm_bwd": _rlm_bwd_torch,
        "gr_fwd": _gr_fwd_torch, "gr_bwd": _gr_bwd_torch,
    }


# ----------------------------------------------------------------------------------
# Custom ops: one boundary per direction of each fused op
# ----------------------------------------------------------------------------------


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    # Stands in for an output that was not asked for (custom ops have no Optional outputs).
    return torch.empty((0,), dtype=dtype, device=like.device)


@torch.library.custom_op("switch_dit::mask_ln_modulate", mutates_args=())
def _mln_op(
    x: Tensor, m: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float, write_r0: bool, impl: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r0, h, mean, rstd = _impl(impl)["mln_fwd"](x, m, shift, scale, eps, write_r0)
    return (r0 if r0 is not None else _empty(x, h.dtype)), h, mean, rstd


@_mln_op.register_fake
def _(x, m, shift, scale, eps, write_r0, impl):
    B, L, D = x.shape
    r0_dtype, h_dtype = _mln_dtypes(x, m, shift, scale)
    c = _cdt(x, m, shift, scale)
    r0 = x.new_empty((B, L, D), dtype=r0_dtype) if (write_r0 and m is not None) else _empty(x, h_dtype)
    return r0, x.new_empty((B, L, D), dtype=h_dtype), x.new_empty((B, L), dtype=c), x.new_empty((B, L), dtype=c)


@torch.library.custom_op("switch_dit::mask_ln_modulate_backward", mutates_args=())
def _mln_bwd_op(
    x: Tensor, m: Optional[Tensor], scale: Tensor, mean: Tensor, rstd: Tensor, dh: Tensor,
    dr0: Optional[Tensor], need_dm: bool, shift_dtype: torch.dtype, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dm, dshift, dscale = _impl(impl)["mln_bwd"](x, m, scale, mean, rstd, dh, dr0, need_dm, shift_dtype)
    return dx, (dm if dm is not None else _empty(x, x.dtype)), dshift, dscale


@_mln_bwd_op.register_fake
def _(x, m, scale, mean, rstd, dh, dr0, need_dm, shift_dtype, impl):
    B, L, D = x.shape
    dm = m.new_empty(m.shape) if (m is not None and need_dm) else _empty(x, x.dtype)
    return x.new_empty(x.shape), dm, x.new_empty((B, D), dtype=shift_dtype), scale.new_empty((B, D))


def _mln_setup(ctx, inputs, output):
    x, m, shift, scale, eps, write_r0, impl = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(x, m, scale, mean, rstd)
    ctx.write_r0 = write_r0 and m is not None
    ctx.impl = impl
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _mln_backward(ctx, dr0, dh, _dmean, _drstd):
    x, m, scale, mean, rstd = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    dr0 = dr0 if ctx.write_r0 else None
    need_dm = m is not None and ctx.needs_input_grad[1]
    dx, dm, dshift, dscale = _mln_bwd_op(x, m, scale, mean, rstd, dh, dr0, need_dm, ctx.shift_dtype, ctx.impl)
    return dx, (dm if need_dm else None), dshift, dscale, None, None, None


_mln_op.register_autograd(_mln_backward, setup_context=_mln_setup)


@torch.library.custom_op("switch_dit::residual_ln_modulate", mutates_args=())
def _rlm_op(
    z: Tensor, r0: Tensor, attn_out: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float, impl: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_impl(impl)["rlm_fwd"](z, r0, attn_out, gate, shift, scale, eps))


@_rlm_op.register_fake
def _(z, r0, attn_out, gate, shift, scale, eps, impl):
    B, L, D = z.shape
    zr_dtype, h_dtype = _rlm_dtypes(z, r0, attn_out, gate, shift, scale)
    c = _cdt(z, r0, attn_out, gate, shift, scale)
    return (
        z.new_empty((B, L, D), dtype=zr_dtype), z.new_empty((B, L, D), dtype=h_dtype),
        z.new_empty((B, L), dtype=c), z.new_empty((B, L), dtype=c),
    )


@torch.library.custom_op("switch_dit::residual_ln_modulate_backward", mutates_args=())
def _rlm_bwd_op(
    r0: Tensor, attn_out: Tensor, gate: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
    dzr: Optional[Tensor], dh: Tensor, shift_dtype: torch.dtype, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_impl(impl)["rlm_bwd"](r0, attn_out, gate, scale, mean, rstd, dzr, dh, shift_dtype))


@_rlm_bwd_op.register_fake
def _(r0, attn_out, gate, scale, mean, rstd, dzr, dh, shift_dtype, impl):
    B, L, D = r0.shape
    return (
        r0.new_empty(r0.shape), attn_out.new_empty(attn_out.shape), gate.new_empty((B, D)),
        r0.new_empty((B, D), dtype=shift_dtype), scale.new_empty((B, D)),
    )


def _rlm_setup(ctx, inputs, output):
    z, r0, attn_out, gate, shift, scale, eps, impl = inputs
    _, _, mean, rstd = output
    # z is not needed: dz is the incoming gradient of zr itself.
    ctx.save_for_backward(r0, attn_out, gate, scale, mean, rstd)
    ctx.impl = impl
    ctx.shift_dtype = shift.dtype
    ctx.z_dtype = z.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _rlm_backward(ctx, dzr, dh, _dmean, _drstd):
    r0, attn_out, gate, scale, mean, rstd = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros(r0.shape, dtype=r0.dtype, device=r0.device)
    dr0, dattn, dgate, dshift, dscale = _rlm_bwd_op(
        r0, attn_out, gate, scale, mean, rstd, dzr, dh, ctx.shift_dtype, ctx.impl
    )
    dz = None
    if ctx.needs_input_grad[0]:
        dz = torch.zeros(r0.shape, dtype=ctx.z_dtype, device=r0.device) if dzr is None else dzr.to(ctx.z_dtype)
    return dz, dr0, dattn, dgate, dshift, dscale, None, None


_rlm_op.register_autograd(_rlm_backward, setup_context=_rlm_setup)


@torch.library.custom_op("switch_dit::gated_residual", mutates_args=())
def _gr_op(z: Tensor, y: Tensor, gate: Tensor, impl: str) -> Tensor:
    return _impl(impl)["gr_fwd"](z, y, gate)


@_gr_op.register_fake
def _(z, y, gate, impl):
    return z.new_empty(z.shape, dtype=_gr_dtype(z, y, gate))


@torch.library.custom_op("switch_dit::gated_residual_backward", mutates_args=())
def _gr_bwd_op(y: Tensor, gate: Tensor, dout: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    return tuple(_impl(impl)["gr_bwd"](y, gate, dout))


@_gr_bwd_op.register_fake
def _(y, gate, dout, impl):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _gr_setup(ctx, inputs, output):
    z, y, gate, impl = inputs
    ctx.save_for_backward(y, gate)
    ctx.impl = impl
    ctx.z_dtype = z.dtype


def _gr_backward(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = _gr_bwd_op(y, gate, dout, ctx.impl)
    dz = dout.to(ctx.z_dtype) if ctx.needs_input_grad[0] else None
    return dz, dy, dgate, None


_gr_op.register_autograd(_gr_backward, setup_context=_gr_setup)


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


def _resolve(backend: Optional[str], x: Tensor) -> str:
    b = "auto" if backend is None else backend
    if b not in NORM_MODULATE_BACKENDS:
        raise ValueError(f"backend must be one of {NORM_MODULATE_BACKENDS} or None, got {backend!r}")
    if b == "auto":
        fits = _K is not None and x.shape[-1] <= _K.MAX_D
        return "triton" if (x.is_cuda and fits) else "reference"
    if b == "triton" and _K is None:
        raise RuntimeError("backend='triton' needs Triton, which could not be imported")
    if x.numel() == 0:
        # Nothing to compute; custom ops also may not return several empty tensors
        # (they share the null storage and read as aliases).
        return "reference"
    return b


# ----------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------


def mask_ln_modulate(
    x: Tensor, m: Optional[Tensor], shift: Tensor, scale: Tensor, *,
    eps: float = _EPS, return_r0: bool = False, backend: Optional[str] = None,
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
    impl = _resolve(backend, x)
    if impl == "reference":
        r0, h = mask_ln_modulate_reference(x, m, shift, scale, eps)
    else:
        r0, h, _, _ = _mln_op(x, m, shift, scale, eps, bool(return_r0), impl)
        if m is None:
            r0 = x
    return (r0, h) if return_r0 else h


def residual_ln_modulate(
    z: Tensor, r0: Tensor, attn_out: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, *,
    eps: float = _EPS, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """(zr = z + gate * attn_out, h = modulate(LN(r0 + gate * attn_out), shift, scale)) in one pass.

    z, r0, attn_out (B, L, D): the block input, the masked branch input (r0 = z * m; z
    itself for a dense block) and the raw attention output; gate, shift, scale (B, D)
    (gate_msa, shift_mlp, scale_mlp). Gradients reach all six tensors.
    """
    _check_rows("z", z, [("r0", r0), ("attn_out", attn_out)])
    _check_vecs("z", z, [("gate", gate), ("shift", shift), ("scale", scale)])
    eps = _check_eps(eps)
    impl = _resolve(backend, z)
    if impl == "reference":
        return residual_ln_modulate_reference(z, r0, attn_out, gate, shift, scale, eps)
    zr, h, _, _ = _rlm_op(z, r0, attn_out, gate, shift, scale, eps, impl)
    return zr, h


def gated_residual(z: Tensor, y: Tensor, gate: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """z + gate[:, None] * y: z, y (B, L, D), gate (B, D) -> (B, L, D). Gradients reach all three."""
    _check_rows("z", z, [("y", y)])
    _check_vecs("z", z, [("gate", gate)])
    impl = _resolve(backend, z)
    if impl == "reference":
        return gated_residual_reference(z, y, gate)
    return _gr_op(z, y, gate, impl)


# ----------------------------------------------------------------------------------
# The block identity
# ----------------------------------------------------------------------------------

Branch = Callable[[Tensor], Tensor]


def reference_block(
    z: Tensor, m: Optional[Tensor], ada: Sequence[Tensor], attn: Branch, mlp: Branch, eps: float = _EPS
) -> Tensor:
    """The masked adaLN-Zero block as written (DESIGN.md §1): z (B, L, D), m as in
    mask_ln_modulate, ada = (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) (B, D) each."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada
    r = z if m is None else z * m
    r = r + gate_msa.unsqueeze(1) * attn(_modulate(_ln(r, eps), shift_msa, scale_msa))
    r = r + gate_mlp.unsqueeze(1) * mlp(_modulate(_ln(r, eps), shift_mlp, scale_mlp))
    return r if m is None else r + (1 - m) * z


def fused_block(
    z: Tensor, m: Optional[Tensor], ada: Sequence[Tensor], attn: Branch, mlp: Branch,
    eps: float = _EPS, backend: Optional[str] = None,
) -> Tensor:
    """The same block through the fused ops, by identity (b): out = z + a + f, where
    a = gate_msa * attn(h1) and f = gate_mlp * mlp(h2) and the mask only shapes h1, h2."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada
    r0, h1 = mask_ln_modulate(z, m, shift_msa, scale_msa, eps=eps, return_r0=True, backend=backend)
    zr, h2 = residual_ln_modulate(z, r0, attn(h1), gate_msa, shift_mlp, scale_mlp, eps=eps, backend=backend)
    return gated_residual(zr, mlp(h2), gate_mlp, backend=backend)
