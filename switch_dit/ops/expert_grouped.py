"""The "grouped" strategy of the routed linear: samples grouped by expert, grouped GEMMs (docs/design.md §2, §3).

A Switch-DiT sample sends all its L tokens to the same k experts, so the B*k (sample, slot) pairs
sorted by expert give every expert one contiguous block of rows, and three grouped GEMMs do the
whole op with k dense linears' worth of FLOPs each, every reduction over whole groups:

    order, offsets    pairs p = b*k + j sorted by expert (stable), offsets (M+1,) per expert
                      (the same order/offsets as switch_dit.routing.RoutingPlan for one block)
    X_s (P*L, D_in)   x of each sorted pair;   Y_s = grouped_mm(X_s, W, offsets * L)
    y_b = sum_j coef[b, j] Y_s[pair (b, j)] + sum_j coef[b, j] bias[idx[b, j]]     (+ 1 for the mask)

Backward from dA (B, L, D_out), dA_s its rows per sorted pair:

    G_s = grouped_mm(dA_s, W^T, offsets * L)       (P*L, D_in): dA_b W_e^T for every pair
    dx_b = sum_j coef[b, j] G[pair (b, j)]
    dcoef[b, j] = <x_b, G[pair (b, j)]> + <colsum(dA_b), bias[idx[b, j]]>
    dW = grouped_mm(X_s^T, coef_s * dA_s, offsets * L)   (M, D_in, D_out): reduction over each
                                                         expert's count * L rows
    db = C^T colsum(dA)                                  (C: dense (B, M) coefficients)

``torch._grouped_mm`` does the grouped GEMMs where it is both available and sync-free: CPU tensors
(float32, bfloat16), and CUDA bfloat16 on sm90/sm100 (its CUTLASS kernel reads the offsets on the
device). Elsewhere ATen's own fallback copies the offsets to the host (a sync per call), so this
module uses its own documented fallback instead: one batched GEMM per *pair* against the gathered
expert weights (B*k weight copies, the reference path's cost) and a one-hot GEMM that sums the
per-pair weight gradients per expert in a fixed order. The fallback also covers float64 (gradcheck),
float16 and row sizes that are not a multiple of 16 bytes (grouped GEMM's alignment). The fallback
is correct everywhere and fast nowhere: ``auto`` only picks ``grouped`` where it measured it fastest.
No host sync in either path.

The grouping (order, position, offsets) is the routing plan's (``switch_dit.routing.plan``, the
C++/CUDA extension's counting sort, one launch for all N blocks): a Switch-DiT model on a fast
path computes the plan once per forward and hands each block's ``ExpertGroups`` to its routed
linear (``groups=``), forward and backward. Called without it (the op used on its own, or
expert indices that repeat within a sample, which no plan describes), this module groups by
itself with an argsort + scatter on the device (``expert_groups``), the same order.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from switch_dit.ops.mixed_bmm import dense_coefficients
from switch_dit.routing import ExpertGroups

__all__ = ["expert_groups", "native_grouped_mm", "forward", "backward"]


def expert_groups(idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, k) expert indices -> (order (P,), position (P,), offsets (M + 1,)), all int64, no sync.

    order: pair ids p = b*k + j sorted by expert, stably; position: its inverse; offsets: exclusive
    prefix sum of the pairs per expert (an expert's pairs are order[offsets[e]:offsets[e + 1]])."""
    flat = idx.reshape(-1).long()
    P = flat.numel()
    order = torch.argsort(flat, stable=True)
    rank = torch.arange(P, device=idx.device)
    position = torch.empty_like(order).scatter_(0, order, rank)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=idx.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return order, position, offsets


def native_grouped_mm(dtype: torch.dtype, device: torch.device, d_in: int, d_out: int) -> tuple[bool, str]:
    """Whether torch._grouped_mm runs these GEMMs without a host sync, and if not, why."""
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    size = torch.empty((), dtype=dtype).element_size()
    if (d_in * size) % 16 or (d_out * size) % 16:
        return False, (
            f"grouped GEMM needs rows of a multiple of 16 bytes, got D_in = {d_in}, D_out = {d_out} in {dtype}"
        )
    if device.type == "cpu":
        if dtype not in (torch.float32, torch.bfloat16):
            return False, f"torch._grouped_mm on CPU takes float32 or bfloat16, got {dtype}"
        return True, "torch._grouped_mm (CPU)"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return False, (
                f"torch._grouped_mm is sync-free on CUDA only in bfloat16 (ATen's fallback "
                f"copies the offsets to the host), got {dtype}"
            )
        major = torch.cuda.get_device_capability(device)[0]
        if major not in (9, 10):
            return False, f"torch._grouped_mm's grouped kernel needs sm90 or sm100, this device is sm{major}x"
        return True, "torch._grouped_mm (CUTLASS)"
    return False, f"no grouped GEMM for device {device.type!r}"


def _aligned(weight: Tensor) -> Tensor:
    """The experts as grouped GEMM reads them: row-major, at a 16-byte aligned address (TMA)."""
    weight = weight.contiguous()
    return weight.clone() if weight.data_ptr() % 16 else weight


def _mm(a: Tensor, w: Tensor, experts: Tensor, row_offsets: Tensor, native: bool) -> Tensor:
    """Rows of each group times its expert's matrix: a (P, L, K), w (M, K, N) -> (P, L, N)."""
    P, L, K = a.shape
    if native:
        return torch._grouped_mm(a.reshape(P * L, K), w, offs=row_offsets).view(P, L, w.shape[2])
    return torch.bmm(a, w.index_select(0, experts))  # fallback: one GEMM per pair, gathered weights


def _wgrad(a: Tensor, g: Tensor, experts: Tensor, row_offsets: Tensor, num_experts: int, native: bool) -> Tensor:
    """sum over each expert's rows of a^T g: a (P, L, K), g (P, L, N) -> (M, K, N)."""
    P, L, K = a.shape
    N = g.shape[2]
    if native:
        dw = torch._grouped_mm(a.reshape(P * L, K).t(), g.reshape(P * L, N), offs=row_offsets)
        # An expert without rows is a GEMM with an empty reduction: make its zero explicit rather
        # than trust every grouped kernel to write one (a where, not a multiply: NaN-proof).
        starts = torch.cat([row_offsets.new_zeros(1), row_offsets[:-1]])
        return torch.where((row_offsets > starts)[:, None, None], dw, 0)
    per_pair = torch.bmm(a.transpose(1, 2), g).reshape(P, K * N)
    one_hot = (experts[None, :] == torch.arange(num_experts, device=a.device)[:, None]).to(a.dtype)
    return torch.mm(one_hot, per_pair).view(num_experts, K, N)  # a fixed-order sum, no atomics


class _Groups:
    """The grouping of one call, in the form the GEMMs want it."""

    def __init__(self, idx: Tensor, num_experts: int, seq_len: int, native: bool, given: Optional[ExpertGroups] = None):
        self.k = idx.shape[1]
        # The routing plan's grouping where the caller has it, else our own (the same order).
        self.order, self.position, offsets = given if given is not None else expert_groups(idx, num_experts)
        self.samples = self.order // self.k  # sample of each sorted pair
        self.experts = idx.reshape(-1).long().index_select(0, self.order)  # expert of each sorted pair
        # End row of every group (grouped GEMM's offs): int32, on the device.
        self.rows = (offsets[1:] * seq_len).to(torch.int32) if native else None

    def gather(self, t: Tensor) -> Tensor:
        """(B, L, N) -> (P, L, N): the rows of every sorted pair."""
        return t.index_select(0, self.samples)

    def combine(self, pairs: Tensor, coef: Tensor) -> Tensor:
        """(P, L, N) per sorted pair -> (B, L, N) = sum_j coef[b, j] pairs[(b, j)]."""
        P, L, N = pairs.shape
        B = P // self.k
        per_sample = pairs.index_select(0, self.position).view(B, self.k, L * N)
        return torch.bmm(coef.to(pairs.dtype).view(B, 1, self.k), per_sample).view(B, L, N)


def forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    idx: Tensor,
    coef: Tensor,
    add_one: bool = False,
    groups: Optional[ExpertGroups] = None,
) -> Tensor:
    """y (B, L, D_out) in x's dtype; arguments as ``switch_dit.ops.mixed_linear`` (validated, cast),
    ``groups`` the grouping of idx when the caller has it (the routing plan's), else None."""
    B, L, D = x.shape
    M, _, Do = weight.shape
    native = native_grouped_mm(x.dtype, x.device, D, Do)[0]
    weight = _aligned(weight) if native else weight
    groups = _Groups(idx, M, L, native, groups)
    y = groups.combine(_mm(groups.gather(x), weight, groups.experts, groups.rows, native), coef)
    if bias is not None:  # y is ours (inside the op): add in place, one pass
        b = torch.mm(dense_coefficients(idx, coef, M, x.dtype), bias)
        y.add_((b + 1 if add_one else b).unsqueeze(1))
    elif add_one:
        y.add_(1)
    return y


def backward(
    dA: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    idx: Tensor,
    coef: Tensor,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    need_dc: bool,
    groups: Optional[ExpertGroups] = None,
):
    """Gradients (dx, dW, db, dcoef) from dA = dL/dy (B, L, D_out); None where not needed.

    dx in x's dtype, dW and db in weight's, dcoef in coef's; dA may have any strides; ``groups``
    as in ``forward``."""
    B, L, D = x.shape
    M, _, Do = weight.shape
    k = idx.shape[1]
    dA = dA.to(x.dtype)
    native = native_grouped_mm(x.dtype, x.device, D, Do)[0]
    weight = _aligned(weight) if native else weight
    groups = _Groups(idx, M, L, native, groups)
    dA_s = groups.gather(dA)  # (P, L, D_out)
    dx = dw = db = dc = None
    if need_dx or need_dc:
        g = _mm(dA_s, weight.transpose(1, 2), groups.experts, groups.rows, native)  # (P, L, D_in)
        if need_dx:
            dx = groups.combine(g, coef)
        if need_dc:
            per_sample = g.index_select(0, groups.position).view(B, k, L * D)
            dc = torch.bmm(per_sample, x.reshape(B, L * D, 1)).view(B, k)  # <x_b, G_(b, j)>
    colsum = dA.sum(1) if (need_db or (need_dc and bias is not None)) else None  # (B, D_out)
    if need_dc:
        if bias is not None:
            dc = dc + torch.bmm(bias.index_select(0, idx.reshape(-1).long()).view(B, k, Do), colsum.unsqueeze(2)).view(
                B, k
            )
        dc = dc.to(coef.dtype)
    if need_dw:
        coef_s = coef.reshape(-1).index_select(0, groups.order).to(x.dtype)  # coefficient of each sorted pair
        dw = _wgrad(groups.gather(x), dA_s * coef_s[:, None, None], groups.experts, groups.rows, M, native)
        dw = dw.to(weight.dtype)
    if need_db and bias is not None:
        db = torch.mm(dense_coefficients(idx, coef, M, x.dtype).t(), colsum).to(bias.dtype)
    return dx, dw, db, dc
