"""One timestep for the whole batch: mix the k experts once, then one dense GEMM (docs/design.md §2).

During sampling every sample of a batch (the CFG half included) has the same timestep, so the
gate gives one row of k experts and weights for the whole batch. Identity (a) then needs a single
mixed matrix per block:

    W = sum_j coef[j] weight[idx[j]]   (D_in, D_out): one (1, k or M) x (., D_in * D_out) GEMM
    y = x @ W + sum_j coef[j] bias[idx[j]]      one dense cuBLAS GEMM over all B*L rows

which is what a dense DiT linear costs, plus the small mix. Nothing reads a tensor's value on the
host (no sync; CUDA-graph safe). Plain PyTorch, so autograd differentiates it and it runs on any
device and dtype. The mix runs with autocast off in the parameters' own dtype (as Remix-DiT's
``mix_bases``), and the dense GEMM under the caller's autocast, like F.linear; coef is cast to the
weights' dtype before mixing, as the per-sample reference path casts it to x's.

Shapes: x (B, L, D_in) (any leading dims); weight (M, D_in, D_out) stored (in, out) as Switch-DiT's
experts; bias (M, D_out) or None; idx (k,) int; coef (k,) float. Models in the nn.Linear layout
(out, in), such as Remix-DiT's bases, use ``mix_experts`` on their own weight and call F.linear.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from switch_dit import _checks
from switch_dit.ops import dispatch

__all__ = ["mix_experts", "shared_mixed_linear", "shared_expert_mask"]


def _check(weight: Tensor, bias: Optional[Tensor], idx: Tensor, coef: Tensor) -> None:
    for name, t in (("weight", weight), ("idx", idx), ("coef", coef)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() < 2 or not weight.dtype.is_floating_point:
        raise ValueError(
            f"weight must be a floating (M, ...) tensor of M experts, got {weight.dtype} {tuple(weight.shape)}"
        )
    M = weight.shape[0]
    if bias is not None and (bias.dim() != 2 or bias.shape[0] != M):
        raise ValueError(f"bias must have shape (M={M}, D_out), got {tuple(bias.shape)}")
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"idx must be a (k,) int64/int32 tensor (one row for the whole batch), got {idx.dtype} {tuple(idx.shape)}"
        )
    if not 1 <= idx.shape[0] <= M:
        raise ValueError(f"idx has k = {idx.shape[0]} entries: need 1 <= k <= M = {M}")
    if tuple(coef.shape) != tuple(idx.shape) or not coef.dtype.is_floating_point:
        raise ValueError(
            f"coef must be a floating tensor of shape {tuple(idx.shape)} like idx, got {coef.dtype} {tuple(coef.shape)}"
        )
    for name, t in (("bias", bias), ("idx", idx), ("coef", coef)):
        if t is not None and t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
    _checks.check_expert_index_values(idx, M, "idx")


def mix_experts(weight: Tensor, bias: Optional[Tensor], idx: Tensor, coef: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """(sum_j coef[j] weight[idx[j]], sum_j coef[j] bias[idx[j]] or None), in the weights' dtype.

    weight (M, *S) in any layout, bias (M, D_out) or None, idx (k,), coef (k,); repeated indices add.
    One GEMM over the k chosen experts (k < M / 2, gathered) or over all M (dense coefficients,
    no copy of the experts), whichever reads less."""
    _check(weight, bias, idx, coef)
    M, k = weight.shape[0], idx.shape[0]
    with dispatch.no_autocast(weight.device.type):
        if 2 * k < M:
            c, w, b = coef.to(weight.dtype), weight.index_select(0, idx), None
            b = bias.index_select(0, idx) if bias is not None else None
        else:
            one_hot = idx.long().unsqueeze(-1) == torch.arange(M, device=idx.device)  # (k, M), no atomics
            c = (one_hot.to(weight.dtype) * coef.to(weight.dtype).unsqueeze(-1)).sum(0)
            w, b = weight, bias
        w_mix = (c.unsqueeze(0) @ w.flatten(1)).view(weight.shape[1:])
        b_mix = (c.unsqueeze(0) @ b.to(weight.dtype)).view(b.shape[1:]).to(bias.dtype) if b is not None else None
    return w_mix, b_mix


def shared_mixed_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], idx: Tensor, coef: Tensor, *, add_one: bool = False
) -> Tensor:
    """y = x @ (sum_j coef[j] weight[idx[j]]) + sum_j coef[j] bias[idx[j]] (+ 1): one mix, one GEMM.

    x (..., D_in), weight (M, D_in, D_out), bias (M, D_out) or None, idx (k,), coef (k,) ->
    (..., D_out), in x's dtype (the autocast dtype under autocast). Equals ``mixed_linear`` with
    every row of its (B, k) idx/coef equal to these."""
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise ValueError("x must be a floating-point tensor")
    w, b = mix_experts(weight, bias, idx, coef)  # checks weight, bias, idx, coef
    if weight.dim() != 3 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must have shape (M, D_in={x.shape[-1]}, D_out), got {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if add_one:
        b = (b + 1) if b is not None else torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
    if not torch.is_autocast_enabled(x.device.type):  # F.linear wants one dtype
        w, b = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
    return F.linear(x, w.t(), b)  # w.t() is a view: cuBLAS reads the (in, out) matrix transposed


def shared_expert_mask(x: Tensor, weight: Tensor, bias: Optional[Tensor], idx: Tensor, coef: Tensor) -> Tensor:
    """m = 1 + sum_j coef[j] (x @ weight[idx[j]] + bias[idx[j]]) for one (k,) routing of the whole batch."""
    return shared_mixed_linear(x, weight, bias, idx, coef, add_one=True)
