"""Triton kernels of the expert MLPs over chosen tokens (DiffMoE), forward and backward.

Grouped GEMMs over the packed rows of ``switch_dit.grouping.group_tokens`` (rows of one expert
contiguous, a tile schedule of (expert, first row) per block of BLOCK_M rows):

  fc1:           h[r] = gelu_tanh(x[tokens[r]] @ w1[e].T + b1[e])   gather fused into the A loads
                 (training also stores the pre-activation a[r])
  fc2:           o[r] = (h[r] @ w2[e].T + b2[e]) * scale[r]         the gate score in the epilogue
  fc2_backward:  da[r] = scale[r] (dy_packed[r] @ w2[e]) gelu'(a[r])
  fc1_backward:  dx rows[r] = da[r] @ w1[e]
  weight_grad:   dw[e] = sum over e's rows of g[r]^T a[r] (+ db[e] = sum of g[r]), the score in
                 the loads, rows packed by the caller; one program per (expert, tile of dw)
                 walks the expert's rows in a fixed order: deterministic, no atomics.

The GEMM grid is (max tiles, column blocks), fixed by (E, C) on the host; a tile row of -1 (past
the experts' real tiles) exits at once, so the launch needs no count from the device and is
CUDA-graph capturable. Rows past offsets[E] are never written. The scatter back to tokens is
a deterministic gather-and-sum in ``switch_dit.ops.expert_mlp`` (no atomics).

Launchers take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (CI, float32/float16).
One fixed configuration each: not yet autotuned, nor measured on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from switch_dit.kernels import INTERPRET
from switch_dit.kernels.routed_linear import _ieee

__all__ = [
    "BLOCK_M",
    "GPU_BLOCKS",
    "IEEE_WGRAD_ROWS",
    "fc1_gelu",
    "fc2_scale",
    "fc2_backward",
    "fc1_backward",
    "weight_grad",
]

# Tiles on a GPU (what the static check compiles) and under the interpreter (small: it is slow).
GPU_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
_BLOCKS = GPU_BLOCKS if not INTERPRET else dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
BLOCK_M = _BLOCKS["BLOCK_M"]  # rows per tile: group_tokens(..., block_m=BLOCK_M)
# Rows per step of the weight gradients' reduction in true fp32: the FMA products of 64 rows
# spill on sm_80 (static check: 7.7 KB); 16 rows use 96-127 registers and no spill.
IEEE_WGRAD_ROWS = 16
_BLOCK_N, _BLOCK_K = _BLOCKS["BLOCK_N"], _BLOCKS["BLOCK_K"]


@triton.jit
def _gelu_tanh(x):
    # tanh(z) = 2 sigmoid(2z) - 1: no libdevice call, the same on triton 3.6 and 3.8.
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))


@triton.jit
def _gelu_tanh_grad(x):
    # d/dx of _gelu_tanh: 0.5 (1 + tanh z) + 0.5 x (1 - tanh^2 z) z'(x), z' = c (1 + 3 * 0.044715 x^2).
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    th = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    dz = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dz


@triton.jit
def _grouped_kernel(
    a_ptr,
    rowmap_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    pre_ptr,
    out_ptr,
    tiles_ptr,
    offsets_ptr,
    N,
    K,
    stride_a,
    stride_we,
    stride_wn,
    stride_wk,
    stride_be,
    stride_out,
    GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    GELU: tl.constexpr,
    SCALE: tl.constexpr,
    GELU_GRAD: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[r] = epilogue(a[src(r)] @ w[e]^T (+ b[e])) for the packed rows r of one tile of expert e;
    # w[e][n, k] at w + e * stride_we + n * stride_wn + k * stride_wk (a transposed view works).
    # Epilogue, in order: store the pre-activation to pre (SAVE_PRE), gelu (GELU), times scale[r]
    # (SCALE), times gelu'(pre[r]) read back (GELU_GRAD: the backward through the activation).
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tiles_ptr + 2 * tile)
    if e < 0:
        return
    first = tl.load(tiles_ptr + 2 * tile + 1).to(tl.int64)
    end = tl.load(offsets_ptr + e + 1)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    if GATHER:  # A rows are tokens of x, picked in the prologue
        src = tl.load(rowmap_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + src[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(
            w_base + cols[None, :].to(tl.int64) * stride_wn + ks[:, None].to(tl.int64) * stride_wk,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if IEEE:  # fp32 in true fp32 unless PyTorch allows TF32, as the routed linear
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + e.to(tl.int64) * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(pre_ptr.dtype.element_ty), mask=mask)
    if GELU:
        acc = _gelu_tanh(acc)
    if SCALE:
        s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * s[:, None]
    if GELU_GRAD:
        pre = tl.load(pre_ptr + rows[:, None] * stride_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = acc * _gelu_tanh_grad(pre)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(
    g_ptr,
    scale_ptr,
    a_ptr,
    dw_ptr,
    db_ptr,
    offsets_ptr,
    N,
    K,
    stride_g,
    stride_a,
    SCALE_G: tl.constexpr,
    HAS_DB: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dw[e] (N, K) = sum over expert e's packed rows r of g_r^T a_r, db[e] (N,) = sum of g_r, with
    # g_r = g[r] (* scale[r]). One program per (expert, N block, K block) walks its expert's rows
    # offsets[e]:offsets[e+1] (bounds read on the device): a fixed-order reduction, no atomics,
    # and an expert without rows writes zeros. The rows come packed (gathered by the caller): a
    # gather inside this loop, an index load feeding the addresses, keeps Triton from
    # pipelining it (static check), while the GEMMs' gathers sit outside their K loops.
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = cols_n < N
    k_ok = cols_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = rows < end
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols_n[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if SCALE_G:
            s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            g = (g.to(tl.float32) * s[:, None]).to(g_ptr.dtype.element_ty)
        a = tl.load(a_ptr + rows[:, None] * stride_a + cols_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(tl.trans(g), a, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(g), a, acc)
        if HAS_DB:
            acc_b += tl.sum(g.to(tl.float32), axis=0)
    e64 = e.to(tl.int64)
    tl.store(
        dw_ptr + e64 * N * K + cols_n[:, None] * K + cols_k[None, :],
        acc.to(dw_ptr.dtype.element_ty),
        mask=n_ok[:, None] & k_ok[None, :],
    )
    if HAS_DB:
        if pid_k == 0:
            tl.store(db_ptr + e64 * N + cols_n, acc_b.to(db_ptr.dtype.element_ty), mask=n_ok)


def _check(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("expert_mlp kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def _launch(a, rowmap, w, b, scale, out, tiles, offsets, *, gather, gelu, pre=None, save_pre=False, gelu_grad=False):
    """The grouped GEMM over packed rows; w (E, N, K) may be a transposed view (any strides)."""
    _check(a)
    n_out, k_in = w.shape[1], w.shape[2]
    if pre is not None and pre.stride(0) != out.stride(0):
        raise ValueError("pre must have out's row stride")
    grid = (tiles.shape[0], triton.cdiv(n_out, _BLOCK_N))
    _grouped_kernel[grid](
        a,
        rowmap,
        w,
        b if b is not None else w,
        scale if scale is not None else w,
        pre if pre is not None else out,
        out,
        tiles,
        offsets,
        n_out,
        k_in,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        b.stride(0) if b is not None else 0,
        out.stride(0),
        GATHER=int(gather),
        HAS_BIAS=int(b is not None),
        SAVE_PRE=int(save_pre),
        GELU=int(gelu),
        SCALE=int(scale is not None),
        GELU_GRAD=int(gelu_grad),
        IEEE=_ieee(a.dtype, a.device),
        BLOCK_M=BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    return out


def fc1_gelu(x, tokens, w1, b1, tiles, offsets, pre=None):
    """h (R, H) = gelu_tanh(x[tokens] @ w1[e].T + b1[e]) per packed row; x (S, D), tokens (R,),
    w1 (E, H, D), b1 (E, H) (contiguous rows), tiles/offsets from group_tokens(block_m=BLOCK_M).
    pre (R, H), if given, receives the pre-activation (for the backward)."""
    h = torch.empty(tokens.shape[0], w1.shape[1], device=x.device, dtype=x.dtype)
    return _launch(
        x, tokens, w1, b1, None, h, tiles, offsets, gather=True, gelu=True, pre=pre, save_pre=pre is not None
    )


def fc2_scale(h, w2, b2, scale, tiles, offsets):
    """o (R, D) = (h @ w2[e].T + b2[e]) * scale per packed row; h (R, H), w2 (E, D, H),
    b2 (E, D), scale (R,) or None (unscaled)."""
    o = torch.empty(h.shape[0], w2.shape[1], device=h.device, dtype=h.dtype)
    return _launch(h, h, w2, b2, scale, o, tiles, offsets, gather=False, gelu=False)


def fc2_backward(dy_packed, w2, scale, pre, tiles, offsets):
    """da (R, H) = scale[r] * (dy_packed[r] @ w2[e]) * gelu'(pre[r]): the gradient at fc1's
    pre-activation; dy_packed (R, D) the output gradient of each packed row's token, w2 (E, D, H),
    pre (R, H) from fc1_gelu."""
    da = torch.empty(dy_packed.shape[0], w2.shape[2], device=dy_packed.device, dtype=dy_packed.dtype)
    w2t = w2.transpose(1, 2)  # (E, H, D) view: row n = h of w2[e]^T
    return _launch(
        dy_packed, dy_packed, w2t, None, scale, da, tiles, offsets, gather=False, gelu=False, pre=pre, gelu_grad=True
    )


def fc1_backward(da, w1, tiles, offsets):
    """dx rows (R, D) = da[r] @ w1[e] per packed row (before the sum over experts); w1 (E, H, D)."""
    dx = torch.empty(da.shape[0], w1.shape[2], device=da.device, dtype=da.dtype)
    return _launch(da, da, w1.transpose(1, 2), None, None, dx, tiles, offsets, gather=False, gelu=False)


def weight_grad(g, scale, a, offsets, with_bias=True, dtype=torch.float32):
    """(dw (E, N, K), db (E, N) or None) in ``dtype`` (the weights': accumulated in float32,
    rounded once at the store): dw[e] = sum over e's packed rows r of (g[r] * scale[r])^T a[r]
    (scale None: unscaled), db[e] the sum of the scaled g rows. g (R, N), a (R, K) packed rows
    (contiguous), offsets (E + 1,) the packing's."""
    _check(g)
    E, N, K = offsets.shape[0] - 1, g.shape[1], a.shape[1]
    dw = torch.empty(E, N, K, device=g.device, dtype=dtype)
    db = torch.empty(E, N, device=g.device, dtype=dtype) if with_bias else None
    grid = (E, triton.cdiv(N, _BLOCK_N), triton.cdiv(K, _BLOCK_K))
    ieee = _ieee(g.dtype, g.device)
    _grouped_wgrad_kernel[grid](
        g,
        scale if scale is not None else g,
        a,
        dw,
        db if db is not None else dw,
        offsets,
        N,
        K,
        g.stride(0),
        a.stride(0),
        SCALE_G=int(scale is not None),
        HAS_DB=int(with_bias),
        IEEE=ieee,
        BLOCK_R=min(BLOCK_M, IEEE_WGRAD_ROWS) if ieee else BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    return dw, db
