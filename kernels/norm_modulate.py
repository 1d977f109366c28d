"""Fused block kernels: mask + LayerNorm + adaLN modulate, gated residuals.

(Over 600 lines: three forward and three backward kernels that share one row layout and one
launch configuration; they read best side by side.)

Shapes: row tensors x, z, r0, attn_out, y are (B, L, D); m is (B, L, D) or
(B, 1, D) or None; shift / scale / gate are (B, D). Any strides are accepted
(chunked adaLN outputs, expanded stride-0 gradients); every output is a new
contiguous tensor. LayerNorm has no affine; mean / rstd are kept per row in the
compute dtype (float32, or float64 for float64 inputs).

Layout of every launch: grid (B, C) with C = cdiv(L, ROWS); program (b, c) walks
rows pos = c*ROWS .. c*ROWS + ROWS - 1 of sample b, one whole row of D (padded to
BLOCK_D, masked) at a time. Per-sample gradients (dshift, dscale, dgate and dm of
a (B, 1, D) mask) are summed over the program's rows in registers and written to a
(B, C, D) partial buffer in the compute dtype; the launcher sums it over C with
torch (fixed order, so gradients are bitwise reproducible; no float atomics).

Launchers are pure functions of tensors; autograd and torch.library wiring live in
``switch_dit.ops.norm_modulate``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from switch_dit.kernels import INTERPRET, sm_count

__all__ = [
    "mask_ln_modulate_fwd",
    "mask_ln_modulate_bwd",
    "residual_ln_modulate_fwd",
    "residual_ln_modulate_bwd",
    "gated_residual_fwd",
    "gated_residual_bwd",
    "MAX_D",
    "INTERPRET",
]

# One program holds a whole row in registers; past this the row no longer fits.
MAX_D = 16384


# ----------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------


@triton.jit
def _mask_ln_mod_fwd_kernel(
    X,
    M,
    SHIFT,
    SCALE,
    R0,
    H,
    MEAN,
    RSTD,
    L,
    D,
    sxb,
    sxl,
    sxd,
    smb,
    sml,
    smd,
    sshb,
    sshd,
    sscb,
    sscd,
    eps,
    HAS_M: tl.constexpr,
    WRITE_R0: tl.constexpr,
    CDT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    shift = tl.load(SHIFT + b * sshb + cols64 * sshd, mask=cmask, other=0.0).to(CDT)
    scale1 = tl.load(SCALE + b * sscb + cols64 * sscd, mask=cmask, other=0.0).to(CDT) + 1.0
    for i in range(ROWS):
        pos = (c * ROWS + i).to(tl.int64)
        live = pos < L
        rmask = cmask & live
        r = tl.load(X + b * sxb + pos * sxl + cols64 * sxd, mask=rmask, other=0.0).to(CDT)
        if HAS_M:
            r = r * tl.load(M + b * smb + pos * sml + cols64 * smd, mask=rmask, other=0.0).to(CDT)
        mean = tl.sum(r, axis=0) / D
        diff = tl.where(cmask, r - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / D + eps)
        h = diff * rstd * scale1 + shift
        row = b * L + pos
        tl.store(H + row * D + cols64, h.to(H.dtype.element_ty), mask=rmask)
        if WRITE_R0:
            tl.store(R0 + row * D + cols64, r.to(R0.dtype.element_ty), mask=rmask)
        tl.store(MEAN + row, mean, mask=live)
        tl.store(RSTD + row, rstd, mask=live)


@triton.jit
def _mask_ln_mod_bwd_kernel(
    X,
    M,
    SCALE,
    MEAN,
    RSTD,
    DH,
    DR0,
    DX,
    DM,
    PSHIFT,
    PSCALE,
    PM,
    L,
    D,
    C,
    sxb,
    sxl,
    sxd,
    smb,
    sml,
    smd,
    sscb,
    sscd,
    sdhb,
    sdhl,
    sdhd,
    sdrb,
    sdrl,
    sdrd,
    HAS_M: tl.constexpr,
    HAS_DR0: tl.constexpr,
    DM_MODE: tl.constexpr,
    CDT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # DM_MODE: 0 no dm, 1 dm per element (m is (B, L, D)), 2 dm summed over L (m is (B, 1, D))
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    scale1 = tl.load(SCALE + b * sscb + cols64 * sscd, mask=cmask, other=0.0).to(CDT) + 1.0
    acc_shift = tl.zeros([BLOCK_D], dtype=CDT)
    acc_scale = tl.zeros([BLOCK_D], dtype=CDT)
    acc_m = tl.zeros([BLOCK_D], dtype=CDT)
    for i in range(ROWS):
        pos = (c * ROWS + i).to(tl.int64)
        live = pos < L
        rmask = cmask & live
        row = b * L + pos
        x = tl.load(X + b * sxb + pos * sxl + cols64 * sxd, mask=rmask, other=0.0).to(CDT)
        if HAS_M:
            m = tl.load(M + b * smb + pos * sml + cols64 * smd, mask=rmask, other=0.0).to(CDT)
            r = x * m
        else:
            r = x
        mean = tl.load(MEAN + row, mask=live, other=0.0).to(CDT)
        rstd = tl.load(RSTD + row, mask=live, other=0.0).to(CDT)
        n = tl.where(rmask, (r - mean) * rstd, 0.0)
        dh = tl.load(DH + b * sdhb + pos * sdhl + cols64 * sdhd, mask=rmask, other=0.0).to(CDT)
        acc_shift += dh
        acc_scale += dh * n
        dn = dh * scale1
        # d LN: rstd * (dn - mean(dn) - n * mean(dn * n)), row means over the D live columns
        c1 = tl.sum(dn * n, axis=0) / D
        c2 = tl.sum(dn, axis=0) / D
        dr = tl.where(rmask, (dn - c2 - n * c1) * rstd, 0.0)
        if HAS_DR0:
            dr += tl.load(DR0 + b * sdrb + pos * sdrl + cols64 * sdrd, mask=rmask, other=0.0).to(CDT)
        if HAS_M:
            tl.store(DX + row * D + cols64, (dr * m).to(DX.dtype.element_ty), mask=rmask)
            if DM_MODE == 1:
                tl.store(DM + row * D + cols64, (dr * x).to(DM.dtype.element_ty), mask=rmask)
            if DM_MODE == 2:
                acc_m += dr * x
        else:
            tl.store(DX + row * D + cols64, dr.to(DX.dtype.element_ty), mask=rmask)
    part = (b * C + c) * D + cols64
    tl.store(PSHIFT + part, acc_shift, mask=cmask)
    tl.store(PSCALE + part, acc_scale, mask=cmask)
    if DM_MODE == 2:
        tl.store(PM + part, acc_m, mask=cmask)


@triton.jit
def _res_ln_mod_fwd_kernel(
    Z,
    R0,
    A,
    GATE,
    SHIFT,
    SCALE,
    ZR,
    H,
    MEAN,
    RSTD,
    L,
    D,
    szb,
    szl,
    szd,
    srb,
    srl,
    srd,
    sab,
    sal,
    sad,
    sgb,
    sgd,
    sshb,
    sshd,
    sscb,
    sscd,
    eps,
    CDT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    gate = tl.load(GATE + b * sgb + cols64 * sgd, mask=cmask, other=0.0).to(CDT)
    shift = tl.load(SHIFT + b * sshb + cols64 * sshd, mask=cmask, other=0.0).to(CDT)
    scale1 = tl.load(SCALE + b * sscb + cols64 * sscd, mask=cmask, other=0.0).to(CDT) + 1.0
    for i in range(ROWS):
        pos = (c * ROWS + i).to(tl.int64)
        live = pos < L
        rmask = cmask & live
        row = b * L + pos
        a = gate * tl.load(A + b * sab + pos * sal + cols64 * sad, mask=rmask, other=0.0).to(CDT)
        z = tl.load(Z + b * szb + pos * szl + cols64 * szd, mask=rmask, other=0.0).to(CDT)
        u = tl.load(R0 + b * srb + pos * srl + cols64 * srd, mask=rmask, other=0.0).to(CDT) + a
        tl.store(ZR + row * D + cols64, (z + a).to(ZR.dtype.element_ty), mask=rmask)
        mean = tl.sum(u, axis=0) / D
        diff = tl.where(cmask, u - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / D + eps)
        h = diff * rstd * scale1 + shift
        tl.store(H + row * D + cols64, h.to(H.dtype.element_ty), mask=rmask)
        tl.store(MEAN + row, mean, mask=live)
        tl.store(RSTD + row, rstd, mask=live)


@triton.jit
def _res_ln_mod_bwd_kernel(
    R0,
    A,
    GATE,
    SCALE,
    MEAN,
    RSTD,
    DZR,
    DH,
    DR0,
    DA,
    PGATE,
    PSHIFT,
    PSCALE,
    L,
    D,
    C,
    srb,
    srl,
    srd,
    sab,
    sal,
    sad,
    sgb,
    sgd,
    sscb,
    sscd,
    sdzb,
    sdzl,
    sdzd,
    sdhb,
    sdhl,
    sdhd,
    HAS_DZR: tl.constexpr,
    CDT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    gate = tl.load(GATE + b * sgb + cols64 * sgd, mask=cmask, other=0.0).to(CDT)
    scale1 = tl.load(SCALE + b * sscb + cols64 * sscd, mask=cmask, other=0.0).to(CDT) + 1.0
    acc_gate = tl.zeros([BLOCK_D], dtype=CDT)
    acc_shift = tl.zeros([BLOCK_D], dtype=CDT)
    acc_scale = tl.zeros([BLOCK_D], dtype=CDT)
    for i in range(ROWS):
        pos = (c * ROWS + i).to(tl.int64)
        live = pos < L
        rmask = cmask & live
        row = b * L + pos
        attn = tl.load(A + b * sab + pos * sal + cols64 * sad, mask=rmask, other=0.0).to(CDT)
        u = tl.load(R0 + b * srb + pos * srl + cols64 * srd, mask=rmask, other=0.0).to(CDT) + gate * attn
        mean = tl.load(MEAN + row, mask=live, other=0.0).to(CDT)
        rstd = tl.load(RSTD + row, mask=live, other=0.0).to(CDT)
        n = tl.where(rmask, (u - mean) * rstd, 0.0)
        dh = tl.load(DH + b * sdhb + pos * sdhl + cols64 * sdhd, mask=rmask, other=0.0).to(CDT)
        acc_shift += dh
        acc_scale += dh * n
        dn = dh * scale1
        c1 = tl.sum(dn * n, axis=0) / D
        c2 = tl.sum(dn, axis=0) / D
        du = tl.where(rmask, (dn - c2 - n * c1) * rstd, 0.0)
        tl.store(DR0 + row * D + cols64, du.to(DR0.dtype.element_ty), mask=rmask)
        # a = gate * attn feeds both zr = z + a and u = r0 + a
        da = du
        if HAS_DZR:
            da += tl.load(DZR + b * sdzb + pos * sdzl + cols64 * sdzd, mask=rmask, other=0.0).to(CDT)
        tl.store(DA + row * D + cols64, (gate * da).to(DA.dtype.element_ty), mask=rmask)
        acc_gate += da * attn
    part = (b * C + c) * D + cols64
    tl.store(PGATE + part, acc_gate, mask=cmask)
    tl.store(PSHIFT + part, acc_shift, mask=cmask)
    tl.store(PSCALE + part, acc_scale, mask=cmask)


@triton.jit
def _gated_res_fwd_kernel(
    Z,
    Y,
    GATE,
    OUT,
    L,
    D,
    szb,
    szl,
    szd,
    syb,
    syl,
    syd,
    sgb,
    sgd,
    CDT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    gate = tl.load(GATE + b * sgb + cols64 * sgd, mask=cmask, other=0.0).to(CDT)
    for i in range(ROWS):
        pos = (c * ROWS + i).to(tl.int64)
        rmask = cmask & (pos < L)
        z = tl.load(Z + b * szb + pos * szl + cols64 * szd, mask=rmask, other=0.0).to(CDT)
        y = tl.load(Y + b * syb + pos * syl + cols64 * syd, mask=rmask, other=0.0).to(CDT)
        tl.store(OUT + (b * L + pos) * D + cols64, (z + gate * y).to(OUT.dtype.element_ty), mask=rmask)


@triton.jit
def _gated_res_bwd_kernel(
    Y,
    GATE,
    DOUT,
    DY,
    PGATE,
    L,
    D,
    C,
    syb,
    syl,
    syd,
    sgb,
    sgd,
    sob,
    sol,
    sod,
    CDT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    gate = tl.load(GATE + b * sgb + cols64 * sgd, mask=cmask, other=0.0).to(CDT)
    acc_gate = tl.zeros([BLOCK_D], dtype=CDT)
    for i in range(ROWS):
        pos = (c * ROWS + i).to(tl.int64)
        rmask = cmask & (pos < L)
        do = tl.load(DOUT + b * sob + pos * sol + cols64 * sod, mask=rmask, other=0.0).to(CDT)
        y = tl.load(Y + b * syb + pos * syl + cols64 * syd, mask=rmask, other=0.0).to(CDT)
        tl.store(DY + (b * L + pos) * D + cols64, (gate * do).to(DY.dtype.element_ty), mask=rmask)
        acc_gate += do * y
    tl.store(PGATE + (b * C + c) * D + cols64, acc_gate, mask=cmask)


# ----------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (exact gradchecks), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def _config(x: torch.Tensor, B: int, L: int, D: int, backward: bool = False) -> tuple[int, int, int, int]:
    """-> (BLOCK_D, ROWS, C, num_warps). Fixed heuristics, no autotuning: the kernels
    are memory-bound and the interpreter cannot autotune."""
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 to run them on the CPU"
        )
    if D > MAX_D:
        raise ValueError(f"hidden size D={D} exceeds the single-row kernels' limit {MAX_D}")
    block_d = triton.next_power_of_2(max(D, 1))
    num_warps = min(max(block_d // 256, 1), 8)
    if x.device.type == "cuda":
        rows = rows_per_program(B, L, sm_count(x.device), backward)
    else:
        rows = min(4, triton.next_power_of_2(max(L, 1)))  # interpreter: small, L = 7, 33 span chunks
    return block_d, rows, triton.cdiv(L, rows), num_warps


def rows_per_program(B: int, L: int, sms: int, backward: bool = False) -> int:
    """ROWS of a GPU launch (a power of two, at most L's).

    Forward: about 8 programs per SM keep enough loads in flight for these memory-bound
    kernels. Backward: every program also writes a fp32 partial row per per-sample gradient
    (dshift, dscale, ...), C = L / ROWS of them per sample, read back by the sum; about 2
    programs per SM (up to 64 rows each) keep C small: XL (B = 32, L = 256, 132 SMs) gets
    16 rows, 16 partial rows per sample, where 4 rows gave 64 (9.4 MB each in fp32).
    """
    per_sm, cap = (2, 64) if backward else (8, 16)
    rows = max(1, (B * L) // (per_sm * sms))
    rows = min(1 << (rows.bit_length() - 1), cap)
    return min(rows, triton.next_power_of_2(max(L, 1)))


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else tuple(t.stride())


def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher hands to a kernel comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _row_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _new(x.shape, dtype, x.device)


# ----------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------


def mask_ln_modulate_fwd(x, m, shift, scale, eps: float, write_r0: bool):
    """x (B, L, D), m (B, L, D) | (B, 1, D) | None, shift/scale (B, D)
    -> r0 (B, L, D) = x*m (None unless write_r0 and m given), h = modulate(LN(x*m), shift, scale),
       mean, rstd (B, L) in the compute dtype."""
    B, L, D = x.shape
    cdt = _compute_dtype(x, m, shift, scale)
    h_dtype = torch.result_type(x, m) if m is not None else x.dtype
    r0_dtype = h_dtype
    h_dtype = torch.promote_types(torch.promote_types(h_dtype, shift.dtype), scale.dtype)
    h = _row_like(x, h_dtype)
    write = bool(write_r0 and m is not None)
    r0 = _row_like(x, r0_dtype) if write else None
    mean = _new((B, L), cdt, x.device)
    rstd = _new((B, L), cdt, x.device)
    if B * L * D == 0:
        return r0, h, mean.zero_(), rstd.zero_()
    block_d, rows, C, nw = _config(x, B, L, D)
    me = m.expand(B, L, D) if m is not None else None
    _mask_ln_mod_fwd_kernel[(B, C)](
        x,
        me if me is not None else x,
        shift,
        scale,
        r0 if write else h,
        h,
        mean,
        rstd,
        L,
        D,
        *x.stride(),
        *_strides3(me),
        *shift.stride(),
        *scale.stride(),
        float(eps),
        HAS_M=int(m is not None),
        WRITE_R0=int(write),
        CDT=_TL[cdt],
        ROWS=rows,
        BLOCK_D=block_d,
        num_warps=nw,
    )
    return r0, h, mean, rstd


def mask_ln_modulate_bwd(x, m, scale, mean, rstd, dh, dr0, need_dm: bool, shift_dtype: torch.dtype):
    """Gradients of mask_ln_modulate: dh (B, L, D), dr0 (B, L, D) or None
    -> dx (B, L, D), dm (shape of m, or None unless need_dm), dshift, dscale (B, D)."""
    B, L, D = x.shape
    cdt = mean.dtype
    dx = _row_like(x, x.dtype)
    has_m = m is not None
    dm_mode = 0 if not (has_m and need_dm) else (2 if m.shape[1] == 1 and L != 1 else 1)
    if B * L * D == 0:
        z = torch.zeros((B, D), dtype=cdt, device=x.device)
        dm = torch.zeros(m.shape, dtype=m.dtype, device=x.device) if dm_mode else None
        return dx, dm, z.to(shift_dtype), z.to(scale.dtype)
    block_d, rows, C, nw = _config(x, B, L, D, backward=True)
    me = m.expand(B, L, D) if has_m else None
    dm_full = _row_like(x, m.dtype) if dm_mode == 1 else None
    pshift = _new((B, C, D), cdt, x.device)
    pscale = _new((B, C, D), cdt, x.device)
    pm = _new((B, C, D), cdt, x.device) if dm_mode == 2 else pshift
    _mask_ln_mod_bwd_kernel[(B, C)](
        x,
        me if has_m else x,
        scale,
        mean,
        rstd,
        dh,
        dr0 if dr0 is not None else dh,
        dx,
        dm_full if dm_full is not None else dx,
        pshift,
        pscale,
        pm,
        L,
        D,
        C,
        *x.stride(),
        *_strides3(me),
        *scale.stride(),
        *dh.stride(),
        *_strides3(dr0),
        HAS_M=int(has_m),
        HAS_DR0=int(dr0 is not None),
        DM_MODE=dm_mode,
        CDT=_TL[cdt],
        ROWS=rows,
        BLOCK_D=block_d,
        num_warps=nw,
    )
    if dm_mode == 1:
        dm = dm_full.view(m.shape)  # (B, L, D), or (B, 1, D) when L == 1
    elif dm_mode == 2:
        dm = pm.sum(1, keepdim=True).to(m.dtype)
    else:
        dm = None
    return dx, dm, pshift.sum(1).to(shift_dtype), pscale.sum(1).to(scale.dtype)


def residual_ln_modulate_fwd(z, r0, attn_out, gate, shift, scale, eps: float):
    """z, r0, attn_out (B, L, D), gate/shift/scale (B, D)
    -> zr = z + gate*attn_out, h = modulate(LN(r0 + gate*attn_out), shift, scale), mean, rstd (B, L)."""
    B, L, D = z.shape
    cdt = _compute_dtype(z, r0, attn_out, gate, shift, scale)
    a_dtype = torch.promote_types(gate.dtype, attn_out.dtype)
    zr = _row_like(z, torch.promote_types(z.dtype, a_dtype))
    h_dtype = torch.promote_types(torch.promote_types(r0.dtype, a_dtype), torch.promote_types(shift.dtype, scale.dtype))
    h = _row_like(z, h_dtype)
    mean = _new((B, L), cdt, z.device)
    rstd = _new((B, L), cdt, z.device)
    if B * L * D == 0:
        return zr, h, mean.zero_(), rstd.zero_()
    block_d, rows, C, nw = _config(z, B, L, D)
    _res_ln_mod_fwd_kernel[(B, C)](
        z,
        r0,
        attn_out,
        gate,
        shift,
        scale,
        zr,
        h,
        mean,
        rstd,
        L,
        D,
        *z.stride(),
        *r0.stride(),
        *attn_out.stride(),
        *gate.stride(),
        *shift.stride(),
        *scale.stride(),
        float(eps),
        CDT=_TL[cdt],
        ROWS=rows,
        BLOCK_D=block_d,
        num_warps=nw,
    )
    return zr, h, mean, rstd


def residual_ln_modulate_bwd(r0, attn_out, gate, scale, mean, rstd, dzr, dh, shift_dtype: torch.dtype):
    """Gradients of residual_ln_modulate (dz is dzr itself, not computed here):
    dzr (B, L, D) or None, dh (B, L, D) -> dr0, dattn (B, L, D), dgate, dshift, dscale (B, D)."""
    B, L, D = r0.shape
    cdt = mean.dtype
    dr0 = _row_like(r0, r0.dtype)
    da = _row_like(r0, attn_out.dtype)
    if B * L * D == 0:
        zd = torch.zeros((B, D), dtype=cdt, device=r0.device)
        return dr0, da, zd.to(gate.dtype), zd.to(shift_dtype), zd.to(scale.dtype)
    block_d, rows, C, nw = _config(r0, B, L, D, backward=True)
    pg, ps, pc = (_new((B, C, D), cdt, r0.device) for _ in range(3))
    _res_ln_mod_bwd_kernel[(B, C)](
        r0,
        attn_out,
        gate,
        scale,
        mean,
        rstd,
        dzr if dzr is not None else dh,
        dh,
        dr0,
        da,
        pg,
        ps,
        pc,
        L,
        D,
        C,
        *r0.stride(),
        *attn_out.stride(),
        *gate.stride(),
        *scale.stride(),
        *_strides3(dzr),
        *dh.stride(),
        HAS_DZR=int(dzr is not None),
        CDT=_TL[cdt],
        ROWS=rows,
        BLOCK_D=block_d,
        num_warps=nw,
    )
    return dr0, da, pg.sum(1).to(gate.dtype), ps.sum(1).to(shift_dtype), pc.sum(1).to(scale.dtype)


def gated_residual_fwd(z, y, gate):
    """z, y (B, L, D), gate (B, D) -> z + gate[:, None] * y (B, L, D)."""
    B, L, D = z.shape
    out = _row_like(z, torch.promote_types(z.dtype, torch.promote_types(gate.dtype, y.dtype)))
    if B * L * D == 0:
        return out
    block_d, rows, C, nw = _config(z, B, L, D)
    _gated_res_fwd_kernel[(B, C)](
        z,
        y,
        gate,
        out,
        L,
        D,
        *z.stride(),
        *y.stride(),
        *gate.stride(),
        CDT=_TL[_compute_dtype(z, y, gate)],
        ROWS=rows,
        BLOCK_D=block_d,
        num_warps=nw,
    )
    return out


def gated_residual_bwd(y, gate, dout):
    """Gradients of gated_residual (dz is dout itself): dout (B, L, D) -> dy (B, L, D), dgate (B, D)."""
    B, L, D = y.shape
    cdt = _compute_dtype(y, gate, dout)
    dy = _row_like(y, y.dtype)
    if B * L * D == 0:
        return dy, torch.zeros((B, D), dtype=gate.dtype, device=y.device)
    block_d, rows, C, nw = _config(y, B, L, D, backward=True)
    pg = _new((B, C, D), cdt, y.device)
    _gated_res_bwd_kernel[(B, C)](
        y,
        gate,
        dout,
        dy,
        pg,
        L,
        D,
        C,
        *y.stride(),
        *gate.stride(),
        *dout.stride(),
        CDT=_TL[cdt],
        ROWS=rows,
        BLOCK_D=block_d,
        num_warps=nw,
    )
    return dy, pg.sum(1).to(gate.dtype)
