"""The "bmm" strategy of the routed linear: mixed weights per sample, then cuBLAS (docs/design.md §2, §3).

Identity (a) of the design, written as plain cuBLAS calls:

    C (B, M)       dense coefficients, C[b, e] = sum_j coef[b, j] [idx[b, j] = e] (duplicates add)
    W_b (D_in, D_out) = sum_e C[b, e] W_e           one (B, M) x (M, D_in * D_out) GEMM
    y_b = x_b @ W_b + sum_e C[b, e] b_e             one baddbmm (+ 1 for the expert mask)

Backward from dA = dL/dy (B, L, D_out):

    dx_b = dA_b @ W_b^T                             one bmm against the (recomputed) mixed weights
    db   = C^T colsum(dA)                           colsum over the L tokens of each sample
    dC[b, e] = <P_b, W_e> + <colsum(dA_b), b_e>     P_b = x_b^T dA_b, dcoef[b, j] = dC[b, idx[b, j]]
    dW_e = sum_b C[b, e] P_b                        when P is formed for dcoef anyway (1 GEMM-equivalent)
    dW   = (X (x) C)^T dA                           otherwise: ONE row-scaled GEMM over all B*L rows,
                                                    X_s[row, e, :] = C[b(row), e] x_row, reduction B*L

dcoef needs P_b, a (D_in, D_out) matrix per sample: any other route costs k dense linears instead of
one. P is formed in chunks of samples so that at most ``P_BUDGET`` elements exist at once. The
weight gradient then comes from the same P (an (M, B) x (B, D_in * D_out) GEMM), which is cheaper
than the M-wide row-scaled GEMM; with coef frozen (no dcoef) the row-scaled GEMM runs instead, its
reduction over all B*L rows at cuBLAS speed.

Everything here is pure PyTorch on tensors: it runs on CPU and CUDA alike, in every floating dtype
(float64 included), with no host sync. The autograd wiring is in ``switch_dit.ops.composed_linear``.
Why it exists next to the Triton kernels: fp32 without TF32 (the Triton "ieee" configs spill) and
any shape where cuBLAS's long, well-pipelined loops beat the fused kernel (docs/design.md §3).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["dense_coefficients", "mixed_weights", "forward", "backward", "P_BUDGET"]

# Most elements of P = x^T dA (per-sample (D_in, D_out) products) held at once: 2^26, i.e. 128 MB
# in bf16. XL/2 at B = 32 (32 x 1152 x 1152 = 42.5 M) fits in one chunk.
P_BUDGET = 1 << 26
# Most elements of the row-scaled operand X_s (B*L, M, D_in) built for the one-GEMM weight
# gradient; above it, one GEMM per expert (M launches, the same FLOPs).
ROW_SCALED_BUDGET = 1 << 27


def dense_coefficients(idx: Tensor, coef: Tensor, num_experts: int, dtype: torch.dtype) -> Tensor:
    """(B, k) indices and coefficients -> C (B, M) in ``dtype``; duplicate indices add up.

    The coefficients are rounded to ``dtype`` before they are summed, as the reference path does.
    A one-hot sum, not scatter_add_: no float atomics, so the result is the same run to run."""
    one_hot = idx.long().unsqueeze(-1) == torch.arange(num_experts, device=idx.device)  # (B, k, M)
    return (one_hot.to(dtype) * coef.to(dtype).unsqueeze(-1)).sum(1)


def mixed_weights(c: Tensor, weight: Tensor) -> Tensor:
    """C (B, M), weight (M, D_in, D_out) -> the per-sample mixed weights (B, D_in, D_out)."""
    M, D, Do = weight.shape
    return torch.mm(c, weight.reshape(M, D * Do)).view(c.shape[0], D, Do)


def _mixed_bias(c: Tensor, bias: Optional[Tensor], d_out: int, add_one: bool) -> Optional[Tensor]:
    """(B, D_out) = C @ bias (+ 1), or None when there is nothing to add."""
    if bias is None:
        return torch.ones(c.shape[0], d_out, dtype=c.dtype, device=c.device) if add_one else None
    b = torch.mm(c, bias)
    return b + 1 if add_one else b


def forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], idx: Tensor, coef: Tensor, add_one: bool = False
) -> Tensor:
    """y (B, L, D_out) in x's dtype; arguments as ``switch_dit.ops.mixed_linear`` (validated, cast)."""
    B, L, _ = x.shape
    M, _, Do = weight.shape
    c = dense_coefficients(idx, coef, M, x.dtype)
    w = mixed_weights(c, weight)
    b = _mixed_bias(c, bias, Do, add_one)
    if b is None:
        return torch.bmm(x, w)
    return torch.baddbmm(b.unsqueeze(1).expand(B, L, Do), x, w)


def _p_chunks(x: Tensor, dA: Tensor):
    """Yield (start, P) with P = x_b^T dA_b (n, D_in, D_out) for consecutive chunks of samples."""
    B, _, D = x.shape
    Do = dA.shape[2]
    step = max(1, min(B, P_BUDGET // max(1, D * Do)))
    for s in range(0, B, step):
        yield s, torch.bmm(x[s : s + step].transpose(1, 2), dA[s : s + step])


def _row_scaled_wgrad(x: Tensor, dA: Tensor, c: Tensor) -> Tensor:
    """dW_e = sum_b C[b, e] x_b^T dA_b as GEMMs whose reduction runs over all B*L rows."""
    B, L, D = x.shape
    M, Do = c.shape[1], dA.shape[2]
    x2, g2 = x.reshape(B * L, D), dA.reshape(B * L, Do)
    if B * L * M * D <= ROW_SCALED_BUDGET:
        xs = (x.unsqueeze(2) * c[:, None, :, None]).reshape(B * L, M * D)  # row-scaled copies of x
        return torch.mm(xs.t(), g2).view(M, D, Do)
    rows = c.repeat_interleave(L, dim=0)  # (B*L, M)
    return torch.stack([torch.mm((x2 * rows[:, e : e + 1]).t(), g2) for e in range(M)])


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
):
    """Gradients (dx, dW, db, dcoef) from dA = dL/dy (B, L, D_out); None where not needed.

    dx in x's dtype, dW and db in weight's, dcoef in coef's. dA may have any strides (the
    gradient of ``.sum()`` is an expanded, stride-0 tensor): every op below accepts strides."""
    B, L, D = x.shape
    M, _, Do = weight.shape
    dA = dA.to(x.dtype)
    c = dense_coefficients(idx, coef, M, x.dtype)
    dx = dw = db = dc = None
    if need_dx:
        dx = torch.bmm(dA, mixed_weights(c, weight).transpose(1, 2))
    colsum = dA.sum(1) if (need_db or (need_dc and bias is not None)) else None  # (B, D_out)
    if need_db and bias is not None:
        db = torch.mm(c.t(), colsum).to(bias.dtype)
    if need_dc:
        w2 = weight.reshape(M, D * Do)
        dC, acc = [], None
        for s, p in _p_chunks(x, dA):
            p2 = p.reshape(p.shape[0], D * Do)
            dC.append(torch.mm(p2, w2.t()))
            if need_dw:  # the weight gradient from the same P: (M, n) x (n, D_in*D_out)
                part = torch.mm(c[s : s + p.shape[0]].t(), p2)
                part = part.to(torch.promote_types(part.dtype, torch.float32))  # chunks add in >= fp32
                acc = part if acc is None else acc + part
        dC = torch.cat(dC)
        if bias is not None:
            dC = dC + torch.mm(colsum, bias.t())
        dc = dC.gather(1, idx.long()).to(coef.dtype)
        if need_dw:
            dw = acc.view(M, D, Do).to(weight.dtype)
    elif need_dw:
        dw = _row_scaled_wgrad(x, dA, c).to(weight.dtype)
    return dx, dw, db, dc
