"""Routed (per-sample mixed) linear: Triton kernels and their launchers.

(Over 600 lines: the forward/dx kernel and the weight-gradient kernel share their launch
plans, configs and register budgets, which are easier to check side by side.)

For x (B, L, D_in), expert weights W (M, D_in, D_out), biases b (M, D_out), per-sample
expert indices idx (B, k) and coefficients c (B, k):

    y_b = x_b @ (sum_j c_bj W_idx[b,j]) + sum_j c_bj b_idx[b,j]          (+ 1, optionally)

Identity 2.1 of docs/design.md: the k weight tiles of a sample are mixed in fp32 registers
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

import functools
import os

import torch
import triton
import triton.language as tl

from switch_dit.kernels import INTERPRET, sm_count

# SWITCH_DIT_AUTOTUNE=0: fixed configs on GPU too (same bits across processes).
AUTOTUNE = os.environ.get("SWITCH_DIT_AUTOTUNE", "1") not in ("", "0")
# Tests set this: scratch buffers that every element of must be written are NaN-filled.
POISON = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _mixed_matmul_kernel(
    a_ptr,
    w_ptr,
    bias_ptr,
    idx_ptr,
    coef_ptr,
    y_ptr,
    z_ptr,
    u_ptr,
    v_ptr,
    L,
    N,
    K_DIM,
    s_ab,
    s_al,
    s_ak,
    s_we,
    s_wk,
    s_wn,
    s_be,
    s_bn,
    s_ib,
    s_ij,
    s_cb,
    s_cj,
    s_ub,
    s_ul,
    s_un,
    s_vb,
    s_vl,
    s_vn,
    TOPK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ADD_ONE: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    STORE_Y: tl.constexpr,
    STORE_Z: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
def _scaled_add(acc, p, ev, cv, E: tl.constexpr):
    """acc + (sum_j cv[j] [ev[j] == E]) * p: expert E's share of one sample's P tile."""
    return acc + tl.sum(tl.where(ev == E, cv, 0.0), axis=0) * p


@triton.jit
def _store_tile(dw_chunk, expert_size, tile_offs, acc, mask, E: tl.constexpr, N_ACC: tl.constexpr):
    """Expert E's tile of the chunk's partial (skipped at compile time for E >= N_ACC)."""
    if E < N_ACC:
        tl.store(dw_chunk + E * expert_size + tile_offs, acc, mask=mask)


@triton.jit
def _load_expert(w_ptr, s_we, w_offs, mask, E: tl.constexpr, N_W: tl.constexpr):
    """Expert E's weight tile in its own dtype (a scalar 0 for E >= N_W, removed at compile time)."""
    if E < N_W:
        return tl.load(w_ptr + E * s_we + w_offs, mask=mask, other=0.0)
    else:
        return 0.0


@triton.jit
def _expert_dot(p, w, E: tl.constexpr, N_W: tl.constexpr):
    """<P tile, W_E tile> in fp32 (0 for E >= N_W). One all-axes sum: it reduces in the tl.dot
    layout, where a row-then-column sum converts the product to another layout through shared
    memory."""
    if E < N_W:
        return tl.sum(p * w.to(tl.float32))
    else:
        return 0.0


@triton.jit
def _p_step(
    p,
    x_ptr,
    g_ptr,
    b,
    li,
    offs_i,
    offs_o,
    offs_l,
    mask_i,
    mask_o,
    L,
    s_xb,
    s_xl,
    s_xi,
    s_gb,
    s_gl,
    s_go,
    IEEE: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """p + x_b^T g_b over the rows of L tile li (x_b^T loaded transposed straight from x)."""
    ll = (li * BLOCK_L + offs_l).to(tl.int64)
    mask_l = ll < L
    xt = tl.load(
        x_ptr + b * s_xb + offs_i[:, None] * s_xi + ll[None, :] * s_xl,
        mask=mask_i[:, None] & mask_l[None, :],
        other=0.0,
    )
    g = tl.load(
        g_ptr + b * s_gb + ll[:, None] * s_gl + offs_o[None, :] * s_go,
        mask=mask_l[:, None] & mask_o[None, :],
        other=0.0,
    )
    if IEEE:
        return tl.dot(xt, g, p, input_precision="ieee")
    else:
        return tl.dot(xt, g, p)


@triton.jit
def _flush_rmw(
    p,
    b,
    dw_chunk,
    expert_size,
    tile_offs,
    tile_mask,
    w_ptr,
    w_offs,
    dgp_ptr,
    n_tiles,
    pid_t,
    idx_ptr,
    coef_ptr,
    s_ib,
    s_ij,
    s_cb,
    s_cj,
    s_we,
    TOPK: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DG: tl.constexpr,
):
    """The fallback's flush of a finished P_b tile: fp32 read-modify-write of each slot's expert tile."""
    for j in tl.static_range(TOPK):
        e = tl.load(idx_ptr + b * s_ib + j * s_ij).to(tl.int64)
        if NEED_DW:
            c = tl.load(coef_ptr + b * s_cb + j * s_cj).to(tl.float32)
            acc_ptrs = dw_chunk + e * expert_size + tile_offs
            cur = tl.load(acc_ptrs, mask=tile_mask, other=0.0)
            tl.store(acc_ptrs, cur + c * p, mask=tile_mask)
            tl.debug_barrier()  # two slots of a sample may name one expert
        if NEED_DG:
            w = tl.load(w_ptr + e * s_we + w_offs, mask=tile_mask, other=0.0)
            tl.store(dgp_ptr + (b * TOPK + j) * n_tiles + pid_t, tl.sum(p * w.to(tl.float32)))


@triton.jit
def _mixed_wgrad_kernel(
    x_ptr,
    g_ptr,
    w_ptr,
    idx_ptr,
    coef_ptr,
    dw_ptr,
    dgp_ptr,
    B,
    L,
    DI,
    DO,
    NUM_E,
    CHUNK,
    s_xb,
    s_xl,
    s_xi,
    s_gb,
    s_gl,
    s_go,
    s_we,
    s_wi,
    s_wo,
    s_ib,
    s_ij,
    s_cb,
    s_cj,
    TOPK: tl.constexpr,
    K_PAD: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DG: tl.constexpr,
    IEEE: tl.constexpr,
    N_ACC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Weight and gate-gradient partials from P_b = x_b^T g_b, one (DI, DO) tile per program.

    Grid (cdiv(DI, BLOCK_I) * cdiv(DO, BLOCK_O), n_chunks); program (t, s) walks the rows of
    the samples [s*CHUNK, (s+1)*CHUNK) in ONE loop of (sample, L tile) steps, so the software
    pipeline keeps loading across sample boundaries (docs/design.md §5; a per-sample loop of
    L = 256 rows drained the pipeline every 4 steps). At the last L tile of each sample the
    finished P_b tile is flushed, then restarted from zero:
      dw[s, e] = sum over the chunk's (b, j) with idx[b, j] = e of c_bj * P_b tile
                 (fp32, contiguous (n_chunks, NUM_E, DI, DO); every expert's tile is written,
                 zero for an expert that no sample of the chunk picked; the caller sums the
                 chunks in order: no atomics, a fixed summation order)
      dgp[b, j, t] = <P_b tile, W_e tile>      (fp32, contiguous (B, TOPK, n_tiles))
    The column sums of g (for db and the bias part of dc) are one torch reduction in the
    launcher, not work of the programs of one tile row.

    N_ACC = NUM_E (1..8): register accumulation. The tiles of all experts stay in registers,
    acc_e += coef_e * P_b with coef_e = sum_j c_bj [idx_bj = e], and are stored once at the
    end of the chunk. They are N_ACC separate 2-D accumulators rather than one 3-D
    (M_PAD, BLOCK_I, BLOCK_O) tensor (the same arithmetic): each stays in the layout of the
    tl.dot result, while broadcasting P_b to 3-D makes Triton move every P_b tile through
    shared memory into a slice of a 3-D blocked layout (and back for the store), and pads M
    to a power of two (M = 3 holds 4 tiles). Unused accumulators (E >= N_ACC) are never
    updated or stored and are removed by the compiler. The program's tiles of the N_ACC
    expert weights (for dg) are loaded once, before the loop, in the weights' dtype:
    <P_b, W_e> is computed for every expert and each slot picks its expert's value.
    N_ACC = 0 (more experts than registers hold): fallback, a fp32 read-modify-write of the
    expert's tile in dw per (sample, slot): B*k*DI*DO*8 bytes of traffic, and the slot's
    weight tile loaded per sample; its barriers keep the per-sample loop over L.
    K_PAD: next power of two >= TOPK (the slots are loaded as one vector).
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
    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < TOPK
    mask_i = offs_i < DI
    mask_o = offs_o < DO
    tile_mask = mask_i[:, None] & mask_o[None, :]
    tile_offs = offs_i[:, None] * DO + offs_o[None, :]
    w_offs = offs_i[:, None] * s_wi + offs_o[None, :] * s_wo
    expert_size = DI.to(tl.int64) * DO  # M * DI * DO can pass 2^31
    dw_chunk = dw_ptr + pid_s * NUM_E * expert_size

    # Register-held expert weight tiles for dg (N_ACC * NEED_DG of them).
    w0 = _load_expert(w_ptr, s_we, w_offs, tile_mask, 0, N_ACC * NEED_DG)
    w1 = _load_expert(w_ptr, s_we, w_offs, tile_mask, 1, N_ACC * NEED_DG)
    w2 = _load_expert(w_ptr, s_we, w_offs, tile_mask, 2, N_ACC * NEED_DG)
    w3 = _load_expert(w_ptr, s_we, w_offs, tile_mask, 3, N_ACC * NEED_DG)
    w4 = _load_expert(w_ptr, s_we, w_offs, tile_mask, 4, N_ACC * NEED_DG)
    w5 = _load_expert(w_ptr, s_we, w_offs, tile_mask, 5, N_ACC * NEED_DG)
    w6 = _load_expert(w_ptr, s_we, w_offs, tile_mask, 6, N_ACC * NEED_DG)
    w7 = _load_expert(w_ptr, s_we, w_offs, tile_mask, 7, N_ACC * NEED_DG)

    acc0 = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    acc6 = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    acc7 = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    if NEED_DW:
        if N_ACC == 0:
            # Zero this program's tile of every expert (an expert may get no sample). The
            # read-modify-writes below may load and store in different layouts (the
            # store takes the tl.dot layout of p), so another thread of the program can
            # own an element's load than its store: a barrier orders each write before
            # the next read.
            zero = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
            for e0 in range(0, NUM_E):
                tl.store(dw_chunk + e0 * expert_size + tile_offs, zero, mask=tile_mask)
            tl.debug_barrier()

    b0 = pid_s * CHUNK
    n_b = tl.minimum(B - tl.program_id(1) * CHUNK, CHUNK)  # int32 loop bound
    n_l = tl.cdiv(L, BLOCK_L)
    if N_ACC == 0:
        # The fallback's barriers keep Triton from pipelining across them: a loop over L per
        # sample (pipelined within the sample), then the read-modify-write flush.
        for bi in range(0, n_b):
            b = b0 + bi
            p = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
            for li in range(0, n_l):
                p = _p_step(
                    p,
                    x_ptr,
                    g_ptr,
                    b,
                    li,
                    offs_i,
                    offs_o,
                    offs_l,
                    mask_i,
                    mask_o,
                    L,
                    s_xb,
                    s_xl,
                    s_xi,
                    s_gb,
                    s_gl,
                    s_go,
                    IEEE,
                    BLOCK_L,
                )
            _flush_rmw(
                p,
                b,
                dw_chunk,
                expert_size,
                tile_offs,
                tile_mask,
                w_ptr,
                w_offs,
                dgp_ptr,
                n_tiles,
                pid_t,
                idx_ptr,
                coef_ptr,
                s_ib,
                s_ij,
                s_cb,
                s_cj,
                s_we,
                TOPK,
                NEED_DW,
                NEED_DG,
            )
    else:
        p = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
        for step in range(0, n_b * n_l):
            bi = step // n_l
            li = step - bi * n_l
            b = b0 + bi
            p = _p_step(
                p,
                x_ptr,
                g_ptr,
                b,
                li,
                offs_i,
                offs_o,
                offs_l,
                mask_i,
                mask_o,
                L,
                s_xb,
                s_xl,
                s_xi,
                s_gb,
                s_gl,
                s_go,
                IEEE,
                BLOCK_L,
            )
            if li == n_l - 1:  # P_b is complete: flush it into the sample's experts, restart
                ev = tl.load(idx_ptr + b * s_ib + offs_k * s_ij, mask=mask_k, other=-1)
                if NEED_DW:
                    # The sample's k (expert, coefficient) pairs; padding slots match no expert.
                    cv = tl.load(coef_ptr + b * s_cb + offs_k * s_cj, mask=mask_k, other=0.0).to(tl.float32)
                    acc0 = _scaled_add(acc0, p, ev, cv, 0)
                    if N_ACC > 1:
                        acc1 = _scaled_add(acc1, p, ev, cv, 1)
                    if N_ACC > 2:
                        acc2 = _scaled_add(acc2, p, ev, cv, 2)
                    if N_ACC > 3:
                        acc3 = _scaled_add(acc3, p, ev, cv, 3)
                    if N_ACC > 4:
                        acc4 = _scaled_add(acc4, p, ev, cv, 4)
                    if N_ACC > 5:
                        acc5 = _scaled_add(acc5, p, ev, cv, 5)
                    if N_ACC > 6:
                        acc6 = _scaled_add(acc6, p, ev, cv, 6)
                    if N_ACC > 7:
                        acc7 = _scaled_add(acc7, p, ev, cv, 7)
                if NEED_DG:
                    # <P_b, W_E> for every held expert; slot j takes its expert's value.
                    d0 = _expert_dot(p, w0, 0, N_ACC)
                    d1 = _expert_dot(p, w1, 1, N_ACC)
                    d2 = _expert_dot(p, w2, 2, N_ACC)
                    d3 = _expert_dot(p, w3, 3, N_ACC)
                    d4 = _expert_dot(p, w4, 4, N_ACC)
                    d5 = _expert_dot(p, w5, 5, N_ACC)
                    d6 = _expert_dot(p, w6, 6, N_ACC)
                    d7 = _expert_dot(p, w7, 7, N_ACC)
                    part = tl.where(ev == 0, d0, 0.0)
                    part = tl.where(ev == 1, d1, part)
                    part = tl.where(ev == 2, d2, part)
                    part = tl.where(ev == 3, d3, part)
                    part = tl.where(ev == 4, d4, part)
                    part = tl.where(ev == 5, d5, part)
                    part = tl.where(ev == 6, d6, part)
                    part = tl.where(ev == 7, d7, part)
                    tl.store(dgp_ptr + (b * TOPK + offs_k) * n_tiles + pid_t, part, mask=mask_k)
                p = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)

    if NEED_DW:
        if N_ACC > 0:
            _store_tile(dw_chunk, expert_size, tile_offs, acc0, tile_mask, 0, N_ACC)
            _store_tile(dw_chunk, expert_size, tile_offs, acc1, tile_mask, 1, N_ACC)
            _store_tile(dw_chunk, expert_size, tile_offs, acc2, tile_mask, 2, N_ACC)
            _store_tile(dw_chunk, expert_size, tile_offs, acc3, tile_mask, 3, N_ACC)
            _store_tile(dw_chunk, expert_size, tile_offs, acc4, tile_mask, 4, N_ACC)
            _store_tile(dw_chunk, expert_size, tile_offs, acc5, tile_mask, 5, N_ACC)
            _store_tile(dw_chunk, expert_size, tile_offs, acc6, tile_mask, 6, N_ACC)
            _store_tile(dw_chunk, expert_size, tile_offs, acc7, tile_mask, 7, N_ACC)


# --------------------------------------------------------------------------- configs

# Under the interpreter: one fixed config (big tiles = few programs = fast on CPU; the
# tests pass smaller ones through `config=` to cross tile edges).
_INTERP_FWD = dict(BLOCK_L=32, BLOCK_N=32, BLOCK_K=32)
_INTERP_WGRAD = dict(BLOCK_I=128, BLOCK_O=128, BLOCK_L=32)


# Forward/dx configs per product precision (see _wgrad_prec): (BLOCK_L, BLOCK_N, BLOCK_K,
# warps, stages), the first the default. Checked by switch_dit.kernels.static_check for sm_90
# and sm_80 (no spills, pipelined loads; SWITCH_DIT_PTXAS_CHECK=1 for the candidates).
# 'ieee' (fp32 FMA dot: each thread holds its rows and columns of both operands over
# BLOCK_K in registers): 128x128 tiles spill 20-27 KB at any BLOCK_K >= 16, 128x64x16
# spills 96-144 bytes in the dx variant, 64x64x32 spills with 4 warps; 64x64x16 with 8 warps
# holds ~128 registers (two programs per SM).
# The bf16 128x256x32 candidate spilled and is gone; 256x64 mixes each weight tile once per
# sample and N tile at L = 256 (256x128 spills). On sm_80, tf32 64x128x32 (4 warps) and
# 128x128x32 with 4 stages spill 120 and 12 bytes, ieee 64x64x16 with 4 warps 120-144: gone.
_FWD_SHAPES = dict(
    lp=[
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 128, 32, 8, 4),
        (256, 64, 64, 8, 3),
    ],
    tf32=[(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)],
    ieee=[(64, 64, 16, 8, 2)],
)


def _fwd_configs(prec: str):
    return [
        triton.Config(dict(BLOCK_L=bl, BLOCK_N=bn, BLOCK_K=k), num_warps=w, num_stages=s)
        for bl, bn, k, w, s in _FWD_SHAPES[prec]
    ]


def _fwd_default(prec: str):
    bl, bn, bk, w, s = _FWD_SHAPES[prec][0]
    return dict(BLOCK_L=bl, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)


# Weight-gradient kernel. Experts held in registers: up to 8 (N_ACC = M); beyond that the
# read-modify-write fallback (N_ACC = 0).
#
# The tile (BLOCK_I, BLOCK_O) fixes the chunk count and the shapes of the partial buffers,
# so the launcher chooses it; autotuning only picks the L depth and the stages. Register
# budget, read by switch_dit.kernels.static_check (ptxas for sm_90 and sm_80, triton 3.8 and
# 3.6): besides the accumulators the kernel holds ~80-120 registers per thread (the P tile,
# load addresses and masks), each expert's 64x64 fp32 accumulator adds 16 at 8 warps and its
# weight tile (held for dg) 8 in bf16. Default configs (8 warps, 3 stages), none of which spills:
#   'lp' / 'tf32' (MMA): M <= 4: 64x64 (bf16, M = 3: 156-160 registers on sm_90, 165-213 on
#                        sm_80; fp32 M = 4: 211-233);
#                        M 5..8: 64x32 (M = 8 at 64x64 reaches 240-255, fp32 spills);
#                        M > 8, fallback: 64x64 (128x128 spills).
#   'ieee' (fp32 with TF32 off, FMA dot: each thread holds its rows of x^T and columns of dA
#   over the whole BLOCK_L in registers, and BLOCK_L >= 16 is required by triton 3.6's
#   tl.dot): 64x32 for M <= 4 and for the fallback (M = 4: 221-240), 32x32 for M 5..8.
# Always 8 warps: 4 warps halve the register file per thread, and even 64x64 with one expert
# spills with them (bf16 on triton 3.6: 32-52 bytes; tf32 on 3.8: 20-36). 128-wide tiles with
# M >= 3 leave no margin either (248-255 registers).
_MAX_REG_EXPERTS = 8


def _wgrad_plan(num_experts: int, prec: str = "lp"):
    """(BLOCK_I, BLOCK_O, N_ACC) of the weight-gradient kernel on a GPU."""
    n_acc = num_experts if num_experts <= _MAX_REG_EXPERTS else 0
    if prec == "ieee":
        return (32, 32, n_acc) if num_experts > 4 and n_acc else (64, 32, n_acc)
    if num_experts > 4 and n_acc:
        return 64, 32, n_acc
    return 64, 64, n_acc


def _wgrad_prec(dtype: torch.dtype, ieee: int) -> str:
    """'lp' (fp16/bf16 MMA), 'tf32' (fp32 MMA) or 'ieee' (fp32 FMA dot: operands in registers)."""
    if dtype != torch.float32:
        return "lp"
    return "ieee" if ieee else "tf32"


# L depths (first = default). 'ieee' gets .maxnreg 255: without it ptxas aims at 128
# registers (two programs per SM) for some of these kernels and spills 12-36 bytes. The MMA
# kernels keep ptxas' choice (M = 5: 128 registers, no spill, two programs per SM; 152 when
# forced to 255); a few autotuning candidates on sm_80 (M = 1) get 128 registers and 8-20
# bytes of spill that way, and the autotuner times them against the others.
_WGRAD_L = dict(lp=(64, 32), tf32=(16, 32), ieee=(16,))


def _wgrad_extra(prec: str) -> dict:
    return dict(maxnreg=255) if prec == "ieee" else {}


def _wgrad_configs(prec: str):
    # 3 stages: with 2, the single loop waits for every copy before its MMA (the static
    # check's "not pipelined"; switch_dit.kernels.static_check).
    return [triton.Config(dict(BLOCK_L=bl), num_warps=8, num_stages=3, **_wgrad_extra(prec)) for bl in _WGRAD_L[prec]]


def _wgrad_default(prec: str):
    return dict(BLOCK_L=_WGRAD_L[prec][0], num_warps=8, num_stages=3, **_wgrad_extra(prec))


# Chunk-count model (see _wgrad_chunks): achieved MMA rate per SM of this kernel and the
# device memory bandwidth. Rough H100 figures (docs/design.md §5: 790 TFLOP/s bf16 dense over
# 132 SMs = 6 TFLOP/s per SM, of which a 64x64 tile with one program per SM gets maybe 40%);
# only their ratio matters, and only where two chunk counts come out close.
_SM_RATE = dict(lp=2.5e12, tf32=1.2e12, ieee=0.25e12)  # FLOP/s per SM
_MEM_BW = 3.0e12  # bytes/s


@functools.lru_cache(maxsize=256)
def _wgrad_chunks(B, L, n_tiles, tile_elems, part_bytes, rmw_bytes, prec, sms):
    """Number of sample chunks that minimises the modelled time of the weight-gradient pass.

    Every program of the grid (n_tiles, chunks) does the same work, ceil(B / chunks) samples
    of one tile, and with 150-250 registers per thread an SM mostly runs one program at a
    time: the GEMM time is waves * per_chunk * t_sample. Each chunk beyond the first costs a
    part_bytes fp32 partial (M, DI, DO) written by the kernel and read back by the ordered
    sum, so with register accumulation few long chunks win: one chunk when the tiles alone
    fill the device (D = 1152: 324 tiles of 64x64), a few when they do not (D = 384, 36
    tiles: 3 chunks on 132 SMs). rmw_bytes: the fallback's read-modify-write traffic per
    sample and tile, served at one SM's share of the bandwidth.
    """
    t_sample = 2.0 * tile_elems * max(L, 1) / _SM_RATE[prec] + rmw_bytes * sms / _MEM_BW
    best, best_t = 1, None
    for c in range(1, min(B, 256) + 1):
        per = triton.cdiv(B, c)
        c = triton.cdiv(B, per)  # no empty chunk
        waves = triton.cdiv(n_tiles * c, sms)
        t = waves * per * t_sample + (part_bytes if c == 1 else 2 * c * part_bytes) / _MEM_BW
        if best_t is None or t < best_t * (1 - 1e-9):
            best, best_t = c, t
    return best


_TUNED: dict = {}


def _tuned(name: str, prec: str, n_acc: int = 0, bi: int = 0, bo: int = 0):
    """Autotuned wrapper of a kernel, built on first use on a GPU (never under the interpreter)."""
    key = (name, prec, n_acc, bi, bo)
    if key not in _TUNED:
        if name == "fwd":
            # The key separates the forward (s_wk = N), dx (s_wk = 1: transposed weights) and
            # the apply / residual-gradient epilogues, which share L, N, K_DIM for square D.
            key_args = ["L", "N", "K_DIM", "TOPK", "s_wk", "STORE_Z", "HAS_ADDEND"]
            _TUNED[key] = triton.autotune(_fwd_configs(prec), key=key_args)(_mixed_matmul_kernel)
        else:
            _TUNED[key] = triton.autotune(_wgrad_configs(prec), key=["L", "DI", "DO", "TOPK"])(_mixed_wgrad_kernel)
    return _TUNED[key]


def tf32_matmul_allowed() -> bool:
    """Whether PyTorch lets fp32 CUDA matmuls use TF32, by whichever API it was set.

    torch >= 2.9 raises on reading the legacy ``allow_tf32`` once the new
    ``fp32_precision`` API has been used, so the new one is read where it exists
    ("none" inherits the global setting)."""
    mm = torch.backends.cuda.matmul
    prec = getattr(mm, "fp32_precision", None)
    if prec is None:  # torch < 2.9
        return bool(mm.allow_tf32)
    if prec == "none":
        prec = getattr(torch.backends, "fp32_precision", "none")
    return prec == "tf32"


def _ieee(dtype: torch.dtype, device: torch.device) -> int:
    """fp32 products in true fp32 unless PyTorch itself allows TF32 (docs/design.md §4)."""
    if dtype != torch.float32:
        return 0
    if device.type == "cuda":
        return 0 if tf32_matmul_allowed() else 1
    return 1


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "routed_linear kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors "
            f"(got a tensor on {t.device})"
        )


# --------------------------------------------------------------------------- launchers


def mixed_matmul(
    a,
    weight,
    bias,
    idx,
    coef,
    *,
    transpose_weight=False,
    add_one=False,
    addend=None,
    mul=None,
    store_y=True,
    out=None,
    out_z=None,
    config=None,
):
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
    args = (
        a,
        weight,
        b_t,
        idx,
        coef,
        y if y is not None else dummy,
        z if z is not None else dummy,
        u_t,
        v_t,
        L,
        N,
        K,
        *a.stride(),
        s_we,
        s_wk,
        s_wn,
        *(bias.stride() if bias is not None else (0, 0)),
        *idx.stride(),
        *coef.stride(),
        *u_t.stride(),
        *v_t.stride(),
    )
    flags = dict(
        TOPK=topk,
        HAS_BIAS=int(bias is not None),
        ADD_ONE=int(add_one),
        HAS_ADDEND=int(addend is not None),
        STORE_Y=int(store_y),
        STORE_Z=int(mul is not None),
        IEEE=_ieee(a.dtype, a.device),
    )
    prec = _wgrad_prec(a.dtype, flags["IEEE"])
    if config is not None or INTERPRET or not AUTOTUNE:
        cfg = dict(config or (_INTERP_FWD if INTERPRET else _fwd_default(prec)))
        grid = (triton.cdiv(L, cfg["BLOCK_L"]), triton.cdiv(N, cfg["BLOCK_N"]), B)
        _mixed_matmul_kernel[grid](*args, **flags, **cfg)
    else:

        def grid(meta):
            return (triton.cdiv(L, meta["BLOCK_L"]), triton.cdiv(N, meta["BLOCK_N"]), B)

        _tuned("fwd", prec)[grid](*args, **flags)
    return y, z


def mixed_wgrad(x, grad, weight, idx, coef, *, need_dw=True, need_dg=True, need_cs=True, chunks=None, config=None):
    """Partials of the weight, gate and bias gradients; returns (dw_part, dg_part, colsum).

    x (B, L, DI), grad (B, L, DO), same dtype, any strides; weight (M, DI, DO).
    dw_part (S, M, DI, DO) fp32 (sum over dim 0 in order gives dW), dg_part (B, k, T) fp32
    (sum over dim 2 gives <P_b, W_e>), colsum (B, DO) fp32; None where not asked for.
    chunks: number S of sample chunks (default: _wgrad_chunks' model).
    config: BLOCK_I, BLOCK_O, BLOCK_L (+ num_warps, num_stages), and optionally N_ACC
    (M: register accumulation, needs M <= 8; 0: the read-modify-write fallback).
    """
    _check_device(x)
    B, L, DI = x.shape
    M, _, DO = weight.shape
    topk = idx.shape[1]
    ieee = _ieee(x.dtype, x.device)
    prec = _wgrad_prec(x.dtype, ieee)
    bi, bo, n_acc = _wgrad_plan(M, prec)
    if config is not None:
        cfg = dict(config)
    elif INTERPRET:
        cfg = dict(_INTERP_WGRAD)
    else:
        cfg = dict(BLOCK_I=bi, BLOCK_O=bo, **({} if AUTOTUNE else _wgrad_default(prec)))
    n_acc = int(cfg.pop("N_ACC", n_acc))
    if n_acc not in (0, M) or (n_acc and M > _MAX_REG_EXPERTS):
        raise ValueError(f"N_ACC must be 0 or M = {M} (M <= {_MAX_REG_EXPERTS}), got {n_acc}")
    if not need_dw:
        n_acc = 0  # no accumulators (and one compiled variant fewer)
    bi, bo = cfg["BLOCK_I"], cfg["BLOCK_O"]
    n_tiles = triton.cdiv(DI, bi) * triton.cdiv(DO, bo)
    if chunks is None:
        part_bytes = 4.0 * M * DI * DO if need_dw else 0.0
        rmw_bytes = 8.0 * topk * bi * bo if need_dw and n_acc == 0 else 0.0
        chunks = _wgrad_chunks(B, L, n_tiles, bi * bo, part_bytes, rmw_bytes, prec, sm_count(x.device))
    chunks = max(1, min(int(chunks), max(B, 1)))
    per_chunk = triton.cdiv(max(B, 1), chunks)
    chunks = triton.cdiv(max(B, 1), per_chunk)  # no empty chunk

    f32 = dict(device=x.device, dtype=torch.float32)
    dw = torch.empty((chunks, M, DI, DO), **f32) if need_dw else None
    dgp = torch.empty((B, topk, n_tiles), **f32) if need_dg else None
    # Column sums of the gradient (db and the bias part of dc): one torch reduction.
    cs = grad.sum(1, dtype=torch.float32) if need_cs else None
    if POISON:
        for t_ in (dw, dgp):
            if t_ is not None:
                t_.fill_(float("nan"))
    if B == 0 or L == 0 or n_tiles == 0:  # nothing to launch; P_b of no row is zero
        return tuple(t_.zero_() if t_ is not None else None for t_ in (dw, dgp)) + (cs,)
    if not (need_dw or need_dg):
        return dw, dgp, cs
    scratch = next(t_ for t_ in (dw, dgp) if t_ is not None)
    args = (
        x,
        grad,
        weight,
        idx,
        coef,
        dw if need_dw else scratch,
        dgp if need_dg else scratch,
        B,
        L,
        DI,
        DO,
        M,
        per_chunk,
        *x.stride(),
        *grad.stride(),
        *weight.stride(),
        *idx.stride(),
        *coef.stride(),
    )
    flags = dict(
        TOPK=topk,
        K_PAD=triton.next_power_of_2(topk),
        NEED_DW=int(need_dw),
        NEED_DG=int(need_dg),
        IEEE=ieee,
        N_ACC=n_acc,
    )
    grid = (n_tiles, chunks)
    if config is not None or INTERPRET or not AUTOTUNE:
        if "BLOCK_L" not in cfg:
            cfg.update(_wgrad_default(prec))
        _mixed_wgrad_kernel[grid](*args, **flags, **cfg)
    else:
        # Tuning reruns the kernel: harmless, every output element is written, not accumulated.
        _tuned("wgrad", prec, n_acc, bi, bo)[grid](*args, **flags, **cfg)
    return dw, dgp, cs


def mixed_linear_forward(x, weight, bias, idx, coef, *, add_one=False, apply=False, out=None, out_r=None, config=None):
    """y = x_b @ W_mix + b_mix (+ 1): (B, L, D_out) in x's dtype; with apply=True returns (y, x * y)."""
    y, r = mixed_matmul(
        x, weight, bias, idx, coef, add_one=add_one, mul=x if apply else None, out=out, out_z=out_r, config=config
    )
    return (y, r) if apply else y


def mixed_linear_backward(
    grad_y,
    grad_r,
    x,
    m,
    weight,
    bias,
    idx,
    coef,
    *,
    need_dx=True,
    need_dw=True,
    need_db=True,
    need_dc=True,
    chunks=None,
    config_dx=None,
    config_wgrad=None,
):
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
        dx, _ = mixed_matmul(
            dA,
            weight,
            None,
            idx,
            coef,
            transpose_weight=True,
            addend=(grad_r, m) if grad_r is not None else None,
            config=config_dx,
        )
    need_db = need_db and bias is not None
    need_cs = need_db or (need_dc and bias is not None)
    cs = None
    if need_dw or need_dc:
        dw_part, dgp, cs = mixed_wgrad(
            x,
            dA,
            weight,
            idx,
            coef,
            need_dw=need_dw,
            need_dg=need_dc,
            need_cs=need_cs,
            chunks=chunks,
            config=config_wgrad,
        )
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
