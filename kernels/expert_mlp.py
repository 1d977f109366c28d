"""Triton kernels of the expert MLPs over chosen tokens (DiffMoE), forward only.

Two grouped GEMMs over the packed rows of ``switch_dit.grouping.group_tokens`` (rows of one
expert contiguous, a tile schedule of (expert, first row) per block of BLOCK_M rows):

  fc1:  h[r] = gelu_tanh(x[tokens[r]] @ w1[e].T + b1[e])      gather fused into the A loads
  fc2:  o[r] = (h[r] @ w2[e].T + b2[e]) * scale[r]            the gate score in the epilogue

The grid is (max tiles, column blocks), fixed by (E, C) on the host; a tile row of -1 (past the
experts' real tiles) exits at once, so the launch needs no count from the device and is
CUDA-graph capturable. Rows past offsets[E] are never written. The scatter back to tokens is
a deterministic gather-and-sum in ``switch_dit.ops.expert_mlp`` (no atomics).

Launchers take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (CI, float32/float16).
One fixed configuration: this is the evaluation path's first kernel, not yet autotuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from switch_dit.kernels import INTERPRET

__all__ = ["BLOCK_M", "fc1_gelu", "fc2_scale"]

BLOCK_M = 64 if not INTERPRET else 16  # rows per tile: group_tokens(..., block_m=BLOCK_M)
_BLOCK_N = 64 if not INTERPRET else 16
_BLOCK_K = 32 if not INTERPRET else 16


@triton.jit
def _gelu_tanh(x):
    # tanh(z) = 2 sigmoid(2z) - 1: no libdevice call, the same on triton 3.6 and 3.8.
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))


@triton.jit
def _grouped_kernel(
    a_ptr,
    rowmap_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    out_ptr,
    tiles_ptr,
    offsets_ptr,
    N,
    K,
    stride_a,
    stride_we,
    stride_wn,
    stride_be,
    stride_out,
    GATHER: tl.constexpr,
    GELU: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
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
            w_base + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += tl.dot(a, w)
    bias = tl.load(b_ptr + e.to(tl.int64) * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc += bias[None, :]
    if GELU:
        acc = _gelu_tanh(acc)
    if SCALE:
        s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * s[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_out + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _check(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("expert_mlp kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def _launch(a, rowmap, w, b, scale, out, tiles, offsets, gather, gelu):
    _check(a)
    n_out, k_in = w.shape[1], w.shape[2]
    grid = (tiles.shape[0], triton.cdiv(n_out, _BLOCK_N))
    _grouped_kernel[grid](
        a,
        rowmap,
        w,
        b,
        scale if scale is not None else b,
        out,
        tiles,
        offsets,
        n_out,
        k_in,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        b.stride(0),
        out.stride(0),
        GATHER=int(gather),
        GELU=int(gelu),
        SCALE=int(scale is not None),
        BLOCK_M=BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    return out


def fc1_gelu(x, tokens, w1, b1, tiles, offsets):
    """h (R, H) = gelu_tanh(x[tokens] @ w1[e].T + b1[e]) per packed row; x (S, D), tokens (R,),
    w1 (E, H, D), b1 (E, H) (contiguous rows), tiles/offsets from group_tokens(block_m=BLOCK_M)."""
    h = torch.empty(tokens.shape[0], w1.shape[1], device=x.device, dtype=x.dtype)
    return _launch(x, tokens, w1, b1, None, h, tiles, offsets, gather=True, gelu=True)


def fc2_scale(h, w2, b2, scale, tiles, offsets):
    """o (R, D) = (h @ w2[e].T + b2[e]) * scale per packed row; h (R, H), w2 (E, D, H),
    b2 (E, D), scale (R,)."""
    o = torch.empty(h.shape[0], w2.shape[1], device=h.device, dtype=h.dtype)
    return _launch(h, h, w2, b2, scale, o, tiles, offsets, gather=False, gelu=False)
