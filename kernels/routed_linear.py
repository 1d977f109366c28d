"""Routed (per-sample mixed) linear: Triton kernels and their launchers.

For x (B, L, D_in), expert weights W (M, D_in, D_out), biases b (M, D_out), per-sample
expert indices idx (B, k) and coefficients c (B, k):

    y_b = x_b @ (sum_j c_bj W_idx[b,j]) + sum_j c_bj b_idx[b,j]          (+ 1, optionally)

Identity (a) of DESIGN.md: the k weight tiles of a sample are mixed in fp32 registers
and fed to ONE tl.dot, so the tensor-core work is that of one dense linear whatever k is.

Backward, with dA = dL/dy (any strides, stride 0 included):
    dx_b  = dA_b @ W_mix,b^T                    (forward kernel, weight strides swapped)
    P_b   = x_b^T dA_b                          (one tile at a time, never stored)
    dW_e  = sum_{b,j: idx[b,j]=e} c_bj P_b      (fp32 per-chunk partial buffers)
    dc_bj = <P_b, W_idx[b,j]> + <colsum(dA_b), b_idx[b,j]>
    db_e  = sum_{b,j: idx[b,j]=e} c_bj colsum(dA_b)
Each P_b tile is computed once and scaled into its k experts' accumulators; every
reduction runs in a fixed order (no float atomics), so gradients are bitwise
reproducible run to run.

Launchers take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (CI). Under the
interpreter one fixed config is launched (autotune needs a GPU).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# SWITCH_DIT_AUTOTUNE=0: fixed configs on GPU too (same bits across processes).
AUTOTUNE = os.environ.get("SWITCH_DIT_AUTOTUNE", "1") not in ("", "0")
# Tests set this: scratch buffers that every element of must be written are NaN-filled.
POISON = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _mixed_matmul_kernel(
    a_ptr, w_ptr, bias_ptr, idx_ptr, coef_ptr, y_ptr, z_ptr, u_ptr, v_ptr,
    L, N, K_DIM,
    s_ab, s_al, s_ak,
    s_we, s_wk, s_wn,
    s_be, s_bn,
    s_ib, s_ij, s_cb, s_cj,
    s_ub, s_ul, s_un,
    s_vb, s_vl, s_vn,
    TOPK: tl.constexpr,
    HAS_BIAS: tl.constexpr, ADD_ONE: tl.constexpr, HAS_ADDEND: tl.constexpr,
    STORE_Y: tl.constexpr, STORE_Z: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[b] = a[b] @ (sum_j c_bj W[idx_bj]) (+ sum_j c_bj bias[idx_bj]) (+ 1) (+ u*v); z = y * u.

    a: (B, L, K_DIM) any strides; W viewed through (s_wk, s_wn) as (M, K_DIM, N), so
    swapping the two strides gives the transposed product of the backward.
    y, z: contiguous (B, L, N). Grid (cdiv(L, BLOCK_L), cdiv(N, BLOCK_N), B).
    """
    pid_l = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # 64-bit: b * L * N can pass 2^31

    offs_l = (pid_l * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_l = offs_l < L
    mask_n = offs_n < N

    a_rows = a_ptr + b * s_ab + offs_l[:, None] * s_al
    idx_row = idx_ptr + b * s_ib
    coef_row = coef_ptr + b * s_cb

    acc = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K_DIM
        a = tl.load(a_rows + kk[None, :] * s_ak, mask=mask_l[:, None] & mask_k[None, :], other=0.0)
        w_offs = kk[:, None] * s_wk + offs_n[None, :] * s_wn
        w_mask = mask_k[:, None] & mask_n[None, :]
        # Mix the sample's k expert tiles in fp32, round once to the MMA dtype.
        w_mix = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(TOPK):
            e = tl.load(idx_row + j * s_ij).to(tl.int64)
            c = tl.load(coef_row + j * s_cj).to(tl.float32)
            w_j = tl.load(w_ptr + e * s_we + w_offs, mask=w_mask, other=0.0)
            w_mix += c * w_j.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, w_mix.to(a.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w_mix.to(a.dtype), acc)

    if HAS_BIAS:
        b_mix = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in tl.static_range(TOPK):
            e = tl.load(idx_row + j * s_ij).to(tl.int64)
            c = tl.load(coef_row + j * s_cj).to(tl.float32)
            b_j = tl.load(bias_ptr + e * s_be + offs_n * s_bn, mask=mask_n, other=0.0)
            b_mix += c * b_j.to(tl.float32)
        acc += b_mix[None, :]
    if ADD_ONE:
        acc += 1.0

    mask = mask_l[:, None] & mask_n[None, :]
    if HAS_ADDEND or STORE_Z:
        u = tl.load(u_ptr + b * s_ub + offs_l[:, None] * s_ul + offs_n[None, :] * s_un, mask=mask, other=0.0)
        u = u.to(tl.float32)
    if HAS_ADDEND:
        v = tl.load(v_ptr + b * s_vb + offs_l[:, None] * s_vl + offs_n[None, :] * s_vn, mask=mask, other=0.0)
        acc += u * v.to(tl.float32)
    out_offs = b * L * N + offs_l[:, None] * N + offs_n[None, :]
    if STORE_Y:
        tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_Z:
        tl.store(z_ptr + out_offs, (acc * u).to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixed_wgrad_kernel(
    x_ptr, g_ptr, w_ptr, idx_ptr, coef_ptr, dw_ptr, dgp_ptr, cs_ptr,
    B, L, DI, DO, NUM_E, CHUNK,
    s_xb, s_xl, s_xi,
    s_gb, s_gl, s_go,
    s_we, s_wi, s_wo,
    s_ib, s_ij, s_cb, s_cj,
    TOPK: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DG: tl.constexpr, NEED_CS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Weight, gate and bias-gradient partials from P_b = x_b^T g_b, one (DI, DO) tile per program.

    Grid (cdiv(DI, BLOCK_I) * cdiv(DO, BLOCK_O), n_chunks); program (t, s) walks the samples
    [s*CHUNK, (s+1)*CHUNK) in order and, for each, computes its P_b tile once, then
      dw[s, e] += c_bj * P_b tile   for each slot j, e = idx[b, j]
                 (fp32, contiguous (n_chunks, NUM_E, DI, DO); the program owns its tile of
                 every expert of its chunk, so no atomics and a fixed summation order)
      dgp[b, j, t] = <P_b tile, W_e tile>      (fp32, contiguous (B, TOPK, n_tiles))
      cs[b, :] = sum_l g_b[l, :]               (fp32 (B, DO); programs of the first DI tile)
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    n_tiles_o = tl.cdiv(DO, BLOCK_O)
    n_tiles = tl.cdiv(DI, BLOCK_I) * n_tiles_o
    pid_i = pid_t // n_tiles_o
    pid_o = pid_t % n_tiles_o

    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_l = tl.arange(0, BLOCK_L)
    mask_i = offs_i < DI
    mask_o = offs_o < DO
    tile_mask = mask_i[:, None] & mask_o[None, :]
    tile_offs = offs_i[:, None] * DO + offs_o[None, :]
    w_offs = offs_i[:, None] * s_wi + offs_o[None, :] * s_wo
    expert_size = DI * DO
    dw_chunk = dw_ptr + pid_s * NUM_E * expert_size

    if NEED_DW:
        # Zero this program's tile of every expert (an expert may get no sample). The
        # read-modify-writes below use the same pointer expression, hence the same
        # thread owns the same elements: program order is all the ordering needed.
        zero = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
        for e0 in range(0, NUM_E):
            tl.store(dw_chunk + e0 * expert_size + tile_offs, zero, mask=tile_mask)

    b0 = pid_s * CHUNK
    n_b = tl.minimum(B - tl.program_id(1) * CHUNK, CHUNK)  # int32 loop bound
    for bi in range(0, n_b):
        b = b0 + bi
        x_b = x_ptr + b * s_xb
        g_b = g_ptr + b * s_gb
        p = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
        cs = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            ll = (l0 + offs_l).to(tl.int64)
            mask_l = ll < L
            # x_b^T tile (BLOCK_I, BLOCK_L), loaded transposed straight from x.
            xt = tl.load(x_b + offs_i[:, None] * s_xi + ll[None, :] * s_xl,
                         mask=mask_i[:, None] & mask_l[None, :], other=0.0)
            g = tl.load(g_b + ll[:, None] * s_gl + offs_o[None, :] * s_go,
                        mask=mask_l[:, None] & mask_o[None, :], other=0.0)
            if IEEE:
                p = tl.dot(xt, g, p, input_precision="ieee")
            else:
                p = tl.dot(xt, g, p)
            if NEED_CS:
                if pid_i == 0:
                    cs += tl.sum(g.to(tl.float32), axis=0)
        if NEED_CS:
            if pid_i == 0:
                tl.store(cs_ptr + b * DO + offs_o, cs, mask=mask_o)
        for j in tl.static_range(TOPK):
            e = tl.load(idx_ptr + b * s_ib + j * s_ij).to(tl.int64)
            if NEED_DW:
                c = tl.load(coef_ptr + b * s_cb + j * s_cj).to(tl.float32)
                acc_ptrs = dw_chunk + e * expert_size + tile_offs
                cur = tl.load(acc_ptrs, mask=tile_mask, other=0.0)
                tl.store(acc_ptrs, cur + c * p, mask=tile_mask)
            if NEED_DG:
                w = tl.load(w_ptr + e * s_we + w_offs, mask=tile_mask, other=0.0)
                part = tl.sum(tl.sum(p * w.to(tl.float32), axis=1), axis=0)
                tl.store(dgp_ptr + (b * TOPK + j) * n_tiles + pid_t, part)


# --------------------------------------------------------------------------- configs

# Under the interpreter: one fixed config (big tiles = few programs = fast on CPU; the
# tests pass smaller ones through `config=` to cross tile edges).
_INTERP_FWD = dict(BLOCK_L=32, BLOCK_N=32, BLOCK_K=32)
_INTERP_WGRAD = dict(BLOCK_I=32, BLOCK_O=32, BLOCK_L=32)


def _fwd_configs(fp32: bool):
    bk = 32 if fp32 else 64
    shapes = [(128, 128, bk, 8, 3), (128, 64, bk, 4, 4), (64, 128, bk, 4, 4),
              (64, 64, bk, 4, 4), (128, 128, 32, 8, 4), (128, 256, 32, 8, 3)]
    return [triton.Config(dict(BLOCK_L=bl, BLOCK_N=bn, BLOCK_K=k), num_warps=w, num_stages=s)
            for bl, bn, k, w, s in shapes]


def _fwd_default(fp32: bool):
    return dict(BLOCK_L=128, BLOCK_N=128, BLOCK_K=32 if fp32 else 64, num_warps=8, num_stages=3)


# The wgrad tile (BLOCK_I, BLOCK_O) fixes the chunk count and so the size of the partial
# buffer: it is chosen by the launcher, only the depth of the L loop is tuned.
def _wgrad_tile(di: int, do: int):
    return 64 if di * do <= 512 * 512 else 128


def _wgrad_configs(fp32: bool):
    ls = (16, 32) if fp32 else (32, 64)
    return [triton.Config(dict(BLOCK_L=bl), num_warps=w, num_stages=s)
            for bl in ls for w in (4, 8) for s in (2, 3)]


def _wgrad_default(fp32: bool):
    return dict(BLOCK_L=32 if fp32 else 64, num_warps=8, num_stages=3)


_TUNED: dict = {}


def _tuned(name: str, fp32: bool):
    """Autotuned wrapper of a kernel, built on first use on a GPU (never under the interpreter)."""
    key = (name, fp32)
    if key not in _TUNED:
        if name == "fwd":
            _TUNED[key] = triton.autotune(_fwd_configs(fp32), key=["L", "N", "K_DIM", "TOPK"])(_mixed_matmul_kernel)
        else:
            _TUNED[key] = triton.autotune(_wgrad_configs(fp32), key=["L", "DI", "DO", "TOPK", "BLOCK_I"])(
                _mixed_wgrad_kernel)
    return _TUNED[key]


def _ieee(dtype: torch.dtype, device: torch.device) -> int:
    """fp32 products in true fp32 unless PyTorch itself allows TF32 (DESIGN.md §3)."""
    if dtype != torch.float32:
        return 0
    if device.type == "cuda":
        return 0 if torch.backends.cuda.matmul.allow_tf32 else 1
    return 1


_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("routed_linear kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors "
                           f"(got a tensor on {t.device})")


# --------------------------------------------------------------------------- launchers


def mixed_matmul(a, weight, bias, idx, coef, *, transpose_weight=False, add_one=False,
                 addend=None, mul=None, store_y=True, out=None, out_z=None, config=None):
    """Launch the mixing GEMM; returns (y, z) (either None when not stored).

    a (B, L, K) fp16/bf16/fp32, any strides; weight (M, K, N), or (M, N, K) with
    transpose_weight=True (the dx product); bias (M, N) or None; idx (B, k) int;
    coef (B, k) float. y = a @ W_mix (+ b_mix) (+ 1) (+ u * v for addend=(u, v)),
    z = y * mul; y, z contiguous (B, L, N) in a's dtype. out / out_z: preallocated
    outputs (tests poison them).
    """
    _check_device(a)
    B, L, K = a.shape
    N = weight.shape[1] if transpose_weight else weight.shape[2]
    topk = idx.shape[1]
    s_we, s_w1, s_w2 = weight.stride()
    s_wk, s_wn = (s_w2, s_w1) if transpose_weight else (s_w1, s_w2)
    y = z = None
    if store_y:
        y = out if out is not None else torch.empty((B, L, N), device=a.device, dtype=a.dtype)
    if mul is not None:
        z = out_z if out_z is not None else torch.empty((B, L, N), device=a.device, dtype=a.dtype)
    if B == 0 or L == 0 or N == 0:
        return y, z
    u, v = addend if addend is not None else (mul, None)
    dummy = y if y is not None else z
    u_t = u if u is not None else dummy
    v_t = v if v is not None else dummy
    b_t = bias if bias is not None else dummy
    args = (a, weight, b_t, idx, coef, y if y is not None else dummy, z if z is not None else dummy, u_t, v_t,
            L, N, K, *a.stride(), s_we, s_wk, s_wn,
            *(bias.stride() if bias is not None else (0, 0)),
            *idx.stride(), *coef.stride(), *u_t.stride(), *v_t.stride())
    flags = dict(TOPK=topk, HAS_BIAS=int(bias is not None), ADD_ONE=int(add_one), HAS_ADDEND=int(addend is not None),
                 STORE_Y=int(store_y), STORE_Z=int(mul is not None), IEEE=_ieee(a.dtype, a.device))
    fp32 = a.dtype == torch.float32
    if config is not None or INTERPRET or not AUTOTUNE:
        cfg = dict(config or (_INTERP_FWD if INTERPRET else _fwd_default(fp32)))
        grid = (triton.cdiv(L, cfg["BLOCK_L"]), triton.cdiv(N, cfg["BLOCK_N"]), B)
        _mixed_matmul_kernel[grid](*args, **flags, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(L, meta["BLOCK_L"]), triton.cdiv(N, meta["BLOCK_N"]), B)
        _tuned("fwd", fp32)[grid](*args, **flags)
    return y, z


def mixed_wgrad(x, grad, weight, idx, coef, *, need_dw=True, need_dg=True, need_cs=True, chunks=None, config=None):
    """Partials of the weight, gate and bias gradients; returns (dw_part, dg_part, colsum).

    x (B, L, DI), grad (B, L, DO), same dtype, any strides; weight (M, DI, DO).
    dw_part (S, M, DI, DO) fp32 (sum over dim 0 in order gives dW), dg_part (B, k, T) fp32
    (sum over dim 2 gives <P_b, W_e>), colsum (B, DO) fp32; None where not asked for.
    chunks: number S of sample chunks (default: enough programs for one wave).
    """
    _check_device(x)
    B, L, DI = x.shape
    M, _, DO = weight.shape
    topk = idx.shape[1]
    fp32 = x.dtype == torch.float32
    if config is not None:
        cfg = dict(config)
    elif INTERPRET:
        cfg = dict(_INTERP_WGRAD)
    else:
        t = _wgrad_tile(DI, DO)
        cfg = dict(BLOCK_I=t, BLOCK_O=t, **({} if AUTOTUNE else _wgrad_default(fp32)))
    n_tiles = triton.cdiv(DI, cfg["BLOCK_I"]) * triton.cdiv(DO, cfg["BLOCK_O"])
    if chunks is None:
        # One wave of programs, but the partial buffer stays small (it is written and
        # summed once more): at most 32 MiB beyond the first chunk.
        chunks = max(1, math.ceil(_num_sms(x.device) / max(n_tiles, 1)))
        chunks = min(chunks, max(1, (32 << 20) // max(1, 4 * M * DI * DO)))
    chunks = max(1, min(int(chunks), max(B, 1)))
    per_chunk = triton.cdiv(max(B, 1), chunks)
    chunks = triton.cdiv(max(B, 1), per_chunk)  # no empty chunk

    f32 = dict(device=x.device, dtype=torch.float32)
    dw = torch.empty((chunks, M, DI, DO), **f32) if need_dw else None
    dgp = torch.empty((B, topk, n_tiles), **f32) if need_dg else None
    cs = torch.empty((B, DO), **f32) if need_cs else None
    if POISON:
        for t_ in (dw, dgp, cs):
            if t_ is not None:
                t_.fill_(float("nan"))
    if B == 0 or n_tiles == 0:  # nothing to launch; dW of no sample is zero
        return (dw.zero_() if dw is not None else None), dgp, cs
    scratch = next(t_ for t_ in (dw, dgp, cs, x) if t_ is not None)
    args = (x, grad, weight, idx, coef, dw if need_dw else scratch, dgp if need_dg else scratch,
            cs if need_cs else scratch, B, L, DI, DO, M, per_chunk,
            *x.stride(), *grad.stride(), *weight.stride(), *idx.stride(), *coef.stride())
    flags = dict(TOPK=topk, NEED_DW=int(need_dw), NEED_DG=int(need_dg), NEED_CS=int(need_cs),
                 IEEE=_ieee(x.dtype, x.device))
    grid = (n_tiles, chunks)
    if config is not None or INTERPRET or not AUTOTUNE:
        if "BLOCK_L" not in cfg:
            cfg.update(_wgrad_default(fp32))
        _mixed_wgrad_kernel[grid](*args, **flags, **cfg)
    else:
        # Tuning reruns the kernel: harmless, it zeroes its own partial tiles first.
        _tuned("wgrad", fp32)[grid](*args, **flags, **cfg)
    return dw, dgp, cs


def mixed_linear_forward(x, weight, bias, idx, coef, *, add_one=False, apply=False, out=None, out_r=None,
                         config=None):
    """y = x_b @ W_mix + b_mix (+ 1): (B, L, D_out) in x's dtype; with apply=True returns (y, x * y)."""
    y, r = mixed_matmul(x, weight, bias, idx, coef, add_one=add_one, mul=x if apply else None,
                        out=out, out_z=out_r, config=config)
    return (y, r) if apply else y


def mixed_linear_backward(grad_y, grad_r, x, m, weight, bias, idx, coef, *, need_dx=True, need_dw=True,
                          need_db=True, need_dc=True, chunks=None, config_dx=None, config_wgrad=None):
    """Gradients of y = mixed_linear(x) (+1), and of r = x * y when grad_r is given.

    grad_y (B, L, D_out) or None, grad_r (B, L, D) or None (then m = y is needed), any
    strides. Returns (dx, dW, db, dc) in the dtypes of x, weight, bias, coef; None for
    each one not asked for (db also when bias is None).
    """
    B, L, DI = x.shape
    M, _, DO = weight.shape
    if grad_y is None and grad_r is None:
        grad_y = x.new_zeros(()).expand(B, L, DO)
    # The gradient reaching y: dA = dy + dr * x (r = x * y).
    if grad_r is None:
        dA = grad_y
    elif grad_y is None:
        dA = grad_r * x
    else:
        dA = torch.addcmul(grad_y, grad_r, x)
    if dA.dtype != x.dtype:
        dA = dA.to(x.dtype)

    dx = dw = db = dc = None
    if need_dx:
        dx, _ = mixed_matmul(dA, weight, None, idx, coef, transpose_weight=True,
                             addend=(grad_r, m) if grad_r is not None else None, config=config_dx)
    need_db = need_db and bias is not None
    need_cs = need_db or (need_dc and bias is not None)
    cs = None
    if need_dw or need_dc:
        dw_part, dgp, cs = mixed_wgrad(x, dA, weight, idx, coef, need_dw=need_dw, need_dg=need_dc,
                                       need_cs=need_cs, chunks=chunks, config=config_wgrad)
        if need_dw:
            dw = (dw_part[0] if dw_part.shape[0] == 1 else dw_part.sum(0)).to(weight.dtype)
        if need_dc:
            dc = dgp.sum(-1)
    elif need_cs:
        cs = dA.sum(1, dtype=torch.float32)
    if need_dc:
        if bias is not None:
            dc = dc + (cs[:, None, :] * bias.float()[idx]).sum(-1)
        dc = dc.to(coef.dtype)
    if need_db:
        # Dense (B, M) coefficients by a one-hot sum (no scatter atomics), then a fixed-order sum.
        onehot = idx[:, :, None] == torch.arange(M, device=idx.device)
        cdense = (coef.float()[:, :, None] * onehot).sum(1)
        db = (cdense[:, :, None] * cs[:, None, :]).sum(0).to(bias.dtype)
    return dx, dw, db, dc
