"""The "compiled" strategy of the norm/residual ops: torch.compile of their plain PyTorch twins (docs/design.md §3).

    mask_ln_modulate_compiled(x, m, shift, scale, eps=, return_r0=)   -> h, or (r0, h)
    residual_ln_modulate_compiled(z, r0, attn_out, gate, shift, scale, eps=)  -> (zr, h)
    gated_residual_compiled(z, y, gate)                                -> z + gate * y

Same semantics, shapes and dtypes as ``switch_dit.ops.mask_ln_modulate`` etc.: each is the
reference twin of ``switch_dit.ops.norm_modulate`` run through ``torch.compile`` (Inductor fuses
the elementwise work and the row reductions of forward and backward into a few kernels). It is
the bar the fused kernels must clear: ``auto`` keeps a Triton kernel only where it beats this.

Each twin is compiled lazily, on its first call, once per process (``compiled(name)`` caches the
compiled function; torch.compile's own guards then cache one graph per input signature and
recompile with dynamic shapes when a shape changes). The first call therefore takes seconds:
never make it inside CUDA-graph capture. Inside a region that torch.compile is already tracing,
the plain twin is called instead and the outer compile fuses it.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from switch_dit.ops import dispatch
from switch_dit.ops.norm_modulate import (
    gated_residual_reference,
    mask_ln_modulate_reference,
    residual_ln_modulate_reference,
)

__all__ = ["compiled", "mask_ln_modulate_compiled", "residual_ln_modulate_compiled", "gated_residual_compiled"]

_EPS = 1e-6
_TWINS: dict[str, Callable] = {
    "mask_ln_modulate": mask_ln_modulate_reference,
    "residual_ln_modulate": residual_ln_modulate_reference,
    "gated_residual": gated_residual_reference,
}
# torch.compile options of every twin (tests may swap the backend for a cheaper one).
COMPILE_OPTIONS: dict = {"fullgraph": True}


@functools.lru_cache(maxsize=None)
def compiled(name: str) -> Callable:
    """The compiled twin of op ``name`` ("mask_ln_modulate", "residual_ln_modulate", "gated_residual")."""
    if name not in _TWINS:
        raise ValueError(f"no compiled twin for op {name!r}; ops with one: {tuple(_TWINS)}")
    return torch.compile(_TWINS[name], **COMPILE_OPTIONS)


def _run(name: str, *args):
    fn = _TWINS[name] if torch.compiler.is_compiling() else compiled(name)
    return fn(*args)


def mask_ln_modulate_compiled(
    x: Tensor, m: Optional[Tensor], shift: Tensor, scale: Tensor, *, eps: float = _EPS, return_r0: bool = False
):
    """h = modulate(LN(x * m), shift, scale); with return_r0, (r0 = x * m, h). As ops.mask_ln_modulate."""
    r0, h = _run("mask_ln_modulate", x, m, shift, scale, float(eps))
    return (r0, h) if return_r0 else h


def residual_ln_modulate_compiled(
    z: Tensor, r0: Tensor, attn_out: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, *, eps: float = _EPS
) -> tuple[Tensor, Tensor]:
    """(zr = z + gate * attn_out, h = modulate(LN(r0 + gate * attn_out), shift, scale))."""
    return _run("residual_ln_modulate", z, r0, attn_out, gate, shift, scale, float(eps))


def gated_residual_compiled(z: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """z + gate[:, None] * y: z, y (B, L, D), gate (B, D) -> (B, L, D)."""
    return _run("gated_residual", z, y, gate)


# backend="compiled" of the three ops (switch_dit.ops.dispatch): any device and dtype torch.compile takes.
dispatch.register("mask_ln_modulate", "compiled", mask_ln_modulate_compiled)
dispatch.register("residual_ln_modulate", "compiled", residual_ln_modulate_compiled)
dispatch.register("gated_residual", "compiled", gated_residual_compiled)
