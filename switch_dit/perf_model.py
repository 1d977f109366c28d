"""Analytic performance model: FLOPs, bytes, waves and expected time of each op's strategies.

GPU time is rare (docs/design.md §6), so every strategy of every fused op gets a
prediction from first principles that the benchmarks print beside each measured row, and
that chooses the shipped defaults until a GPU has measured them (docs/design.md §3, §5).

The model. A strategy is a list of kernels (:class:`Step`). For one step:

    compute  = mma_flops / mma_rate / fill + vector_flops / vector_rate
    memory   = bytes / bandwidth
    time     = max(compute * quantisation, memory) + LAUNCH_S

- ``mma_rate``: the dense tensor-core peak for the dtype (bf16/fp16; TF32 is half of it;
  fp32 with TF32 off runs on the fp32 FMA units, the ``vector_rate``).
- ``vector_rate``: fp32 FMA peak; the k-way weight mixing, scaled accumulations and
  elementwise work. It is *added* to the MMA time: the current Triton kernels wait for each
  MMA before mixing the next tile, so the two do not overlap.
- ``fill`` = steps / (steps + stages - 1): a software pipeline of ``stages`` loads that
  drains after every uninterrupted reduction of ``steps`` tiles loses stages - 1 steps of
  latency each time (a per-sample reduction of L = 256 rows is 4 steps of 64: fill 0.67
  with 3 stages; the weight-gradient kernel runs one loop over all its samples' rows).
- ``quantisation`` = waves * slots / programs >= 1, slots = SMs x programs per SM: the last
  wave of a grid that does not divide the device runs partly empty. Applied to compute
  only: a memory-bound kernel keeps the memory system busy with fewer programs.
- ``bytes``: the fewest bytes each kernel must move through device memory (every input read
  once, every output written once, intermediates that a strategy materialises counted both
  ways). Re-reads that L2 serves are not counted.
- ``LAUNCH_S``: the gap between back-to-back kernels on one stream. Host overhead (eager
  dispatch) is not modelled: on a busy GPU the host runs ahead.

Limits: peaks are datasheet numbers (no kernel reaches them: compare strategies by their
ratio to the model, and pass measured peaks for absolute work); tile-shape efficiency,
L2 hit rates, shared-memory bank conflicts and occupancy beyond "programs per SM" are not
modelled. The model ranks strategies by the work they must do; it cannot see a bad kernel,
which is what the static check (``switch_dit.kernels.static_check``) and the GPU are for.

Entry point: ``estimate(op, strategy, shape, dtype, device, mode="fwd+bwd")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# The gap between two kernels on one stream (s), see the module docstring.
LAUNCH_S = 2e-6


@dataclass(frozen=True)
class Device:
    """Peak rates of a device: dense bf16/fp16 tensor-core FLOP/s, fp32 FMA FLOP/s, HBM bytes/s."""

    name: str
    sms: int
    mma_flops: float  # dense bf16/fp16 tensor-core FLOP/s (TF32 is half of it)
    fp32_flops: float  # non-tensor-core fp32 FLOP/s (FMA = 2 FLOPs)
    bandwidth: float  # device-memory bytes/s
    source: str = "datasheet"

    def rate(self, dtype: torch.dtype, tf32: bool) -> float:
        """The matrix-product rate for operands of ``dtype``."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.mma_flops
        if dtype == torch.float32:
            return self.mma_flops / 2 if tf32 else self.fp32_flops
        return self.fp32_flops / 2  # float64 and anything else: no tensor cores (a lower bound)


# Datasheet peaks (dense, no sparsity). Matched in order against the lower-cased device
# name, specific names first ("NVIDIA H100 80GB HBM3" is the SXM part).
DEVICES: dict[str, Device] = {
    "h200": Device("H200", 132, 989e12, 67e12, 4.8e12),
    "h100 nvl": Device("H100 NVL", 132, 835e12, 60e12, 3.9e12),
    "h100 pcie": Device("H100 PCIe", 114, 756e12, 51e12, 2.0e12),
    "h100": Device("H100 SXM", 132, 989e12, 67e12, 3.35e12),
    "a100": Device("A100", 108, 312e12, 19.5e12, 2.0e12),
}


def device_peaks(device) -> Device:
    """The :class:`Device` of a name ("h100", "NVIDIA H200"), a CUDA device or a Device.

    An unknown GPU raises: its peaks must be measured and passed in as a ``Device``.
    """
    if isinstance(device, Device):
        return device
    if isinstance(device, (torch.device, int)) or (isinstance(device, str) and device.startswith("cuda")):
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"device: the model covers CUDA GPUs, got {dev}; pass a perf_model.Device for others")
        name = torch.cuda.get_device_name(dev)
    elif isinstance(device, str):
        name = device
    else:
        raise ValueError(f"device: expected a name, a torch.device or a perf_model.Device, got {type(device).__name__}")
    low = name.lower()
    for key, dev in DEVICES.items():
        if key in low or key.replace(" ", "-") in low:
            return dev
    raise ValueError(
        f"device: no datasheet peaks for {name!r} (known: {', '.join(d.name for d in DEVICES.values())}); "
        "measure them and pass perf_model.Device(name, sms, mma_flops, fp32_flops, bandwidth)"
    )


@dataclass(frozen=True)
class Step:
    """One kernel of a strategy."""

    name: str
    mma_flops: float = 0.0  # matrix-product FLOPs (tensor cores where the dtype has them)
    vector_flops: float = 0.0  # fp32 FMA-unit FLOPs
    bytes: float = 0.0  # fewest device-memory bytes
    programs: int = 0  # grid size (0: enough to fill the device, no quantisation)
    per_sm: int = 1  # programs resident per SM
    steps: int = 0  # reduction tiles per uninterrupted pipelined loop (0: no pipeline loss)
    stages: int = 3


@dataclass(frozen=True)
class Estimate:
    flops: float
    bytes: float
    waves: int  # waves of the step with the most programs
    time_s: float
    bound: str  # "compute", "memory" or "launch" (the term that dominates the total)
    note: str
    steps: tuple = field(default=(), repr=False)


def _run(steps: list[Step], dev: Device, rate: float, note: str) -> Estimate:
    total = comp_t = mem_t = launch_t = 0.0
    waves = 0
    for s in steps:
        fill = s.steps / (s.steps + s.stages - 1) if s.steps else 1.0
        compute = s.mma_flops / rate / fill + s.vector_flops / dev.fp32_flops
        memory = s.bytes / dev.bandwidth
        quant, w = 1.0, 0
        if s.programs:
            slots = dev.sms * s.per_sm
            w = math.ceil(s.programs / slots)
            quant = w * slots / s.programs
            waves = max(waves, w)
        compute *= quant
        total += max(compute, memory) + LAUNCH_S
        comp_t += compute if compute >= memory else 0.0
        mem_t += memory if memory > compute else 0.0
        launch_t += LAUNCH_S
    bound = max((comp_t, "compute"), (mem_t, "memory"), (launch_t, "launch"))[1]
    return Estimate(
        flops=sum(s.mma_flops + s.vector_flops for s in steps),
        bytes=sum(s.bytes for s in steps),
        waves=waves,
        time_s=total,
        bound=bound,
        note=note,
        steps=tuple(steps),
    )


# --------------------------------------------------------------------------- routed linear

# Tiles assumed for the cuBLAS GEMMs (a typical Hopper/Ampere bf16 choice) and their stages.
_CUBLAS_TILE, _CUBLAS_BK, _CUBLAS_STAGES = (128, 128), 64, 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _gemm(
    name: str, rows: int, n: int, red: int, elem: int, *, batch: int = 1, a_bytes=None, b_bytes=None, c_bytes=None
) -> Step:
    """A cuBLAS (batched) GEMM: batch x (rows x red) @ (red x n); default bytes: each operand once."""
    a = batch * rows * red * elem if a_bytes is None else a_bytes
    b = batch * red * n * elem if b_bytes is None else b_bytes
    c = batch * rows * n * elem if c_bytes is None else c_bytes
    tm, tn = _CUBLAS_TILE
    return Step(
        name,
        mma_flops=2.0 * batch * rows * n * red,
        bytes=float(a + b + c),
        programs=batch * _cdiv(rows, tm) * _cdiv(n, tn),
        steps=_cdiv(red, _CUBLAS_BK),
        stages=_CUBLAS_STAGES,
    )


def _ew(name: str, flops: float, nbytes: float) -> Step:
    return Step(name, vector_flops=float(flops), bytes=float(nbytes))


def _fused_tiles(dtype: torch.dtype, tf32: bool, M: int):
    """Block shapes of the Triton kernels' default configs (imported so the model follows the kernels)."""
    from switch_dit.kernels import routed_linear as K

    prec = K._wgrad_prec(dtype, 0 if (dtype != torch.float32 or tf32) else 1)
    fwd = K._fwd_default(prec)
    bi, bo, n_acc = K._wgrad_plan(M, prec)
    wg = dict(K._wgrad_default(prec), BLOCK_I=bi, BLOCK_O=bo, N_ACC=n_acc, prec=prec)
    return fwd, wg, K


def _routed_linear_steps(strategy: str, mode: str, sh: dict, dtype, tf32: bool, dev: Device) -> list[Step]:
    B, L, M, k = sh["B"], sh["L"], sh["M"], sh["k"]
    Di = sh.get("D_in", sh.get("D"))
    Do = sh.get("D_out", sh.get("D"))
    T = B * L
    e = torch.tensor([], dtype=dtype).element_size()
    x_b, y_b, w_b = T * Di * e, T * Do * e, M * Di * Do * e  # activations in, out; all expert weights
    fwd = mode in ("fwd", "fwd+bwd")
    bwd = mode in ("bwd", "fwd+bwd")
    out: list[Step] = []
    if strategy == "dense":  # the floor: one plain D_in x D_out linear on the same tokens
        if fwd:
            out.append(_gemm("linear", T, Do, Di, e))
        if bwd:
            out += [_gemm("dx", T, Di, Do, e), _gemm("dW", Di, Do, T, e)]
    elif strategy == "shared":  # one timestep for the batch: mix the k experts once, one dense GEMM
        mix = _ew("mix W once", 2.0 * k * Di * Do, (k + 1) * Di * Do * e)
        if fwd:
            out += [mix, _gemm("linear", T, Do, Di, e)]
        if bwd:
            out += [
                mix,
                _gemm("dx", T, Di, Do, e),
                _gemm("P = X^T dA", Di, Do, T, e),
                _ew("dW_j = c_j P, dc_j = <P, W_j>", 4.0 * k * Di * Do, (2 * k + 1) * Di * Do * e),
            ]
    elif strategy == "fused":
        cfg, wg, K = _fused_tiles(dtype, tf32, M)
        bl, bn, bk, stages = cfg["BLOCK_L"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"]

        def mix_gemm(name, n, red, a_bytes, c_bytes):
            # Each program mixes k weight tiles of its N range over the whole reduction: the
            # mix is redone for every L tile of a sample.
            return Step(
                name,
                mma_flops=2.0 * T * n * red,
                vector_flops=2.0 * k * red * n * B * _cdiv(L, bl),
                bytes=float(a_bytes + w_b + c_bytes),
                programs=B * _cdiv(L, bl) * _cdiv(n, bn),
                steps=_cdiv(red, bk),
                stages=stages,
            )

        if fwd:
            out.append(mix_gemm("mixed_matmul", Do, Di, x_b, y_b))
        if bwd:
            out.append(mix_gemm("mixed_matmul dx", Di, Do, y_b, x_b))
            bi, bo, n_acc = wg["BLOCK_I"], wg["BLOCK_O"], wg["N_ACC"]
            n_tiles = _cdiv(Di, bi) * _cdiv(Do, bo)
            part = 4.0 * M * Di * Do
            chunks = K._wgrad_chunks(
                B, L, n_tiles, bi * bo, part, 0.0 if n_acc else 8.0 * k * bi * bo, wg["prec"], dev.sms
            )
            per = _cdiv(B, chunks)
            rmw = 0.0 if n_acc else 8.0 * B * k * Di * Do  # the fallback's fp32 read-modify-writes
            out.append(
                Step(
                    "mixed_wgrad",
                    mma_flops=2.0 * T * Di * Do,
                    # dW: coef * P into every register accumulator; dg: <P, W_e> per slot
                    vector_flops=2.0 * B * (n_acc or k) * Di * Do + 2.0 * B * k * Di * Do,
                    bytes=x_b + y_b + w_b + part * chunks + rmw,
                    programs=n_tiles * chunks,
                    # one pipelined loop over the chunk's (sample, L tile) steps; the
                    # read-modify-write fallback drains it at every sample
                    steps=_cdiv(L, wg["BLOCK_L"]) * (per if n_acc else 1),
                    stages=wg["num_stages"],
                )
            )
            if chunks > 1:
                out.append(_ew("sum chunks", part / 4 * chunks, part * chunks + part / 4 * e))
            out.append(_ew("dg, db", 2.0 * B * k * Do, 4.0 * B * k * _cdiv(Di, bi) * _cdiv(Do, bo)))
    elif strategy == "bmm":  # mixed weights materialised per sample, then torch.bmm
        wmix = B * Di * Do * e

        def mix(name):
            return _ew(name, 2.0 * k * B * Di * Do, w_b + wmix)

        if fwd:
            out += [mix("mix W"), _gemm("bmm", L, Do, Di, e, batch=B)]
        if bwd:
            out += [
                mix("mix W (recomputed)"),
                _gemm("bmm dx", L, Di, Do, e, batch=B),
                _gemm("bmm P = x^T dA", Di, Do, L, e, batch=B),
                _ew("dW = sum_b c_be P_b", 2.0 * B * M * Di * Do, wmix + M * Di * Do * e),
                _ew("dg = <P_b, W_e>", 2.0 * B * k * Di * Do, wmix + w_b),
            ]
    elif strategy == "grouped":  # rows grouped by expert (routing plan order), one GEMM per expert
        rows = k * T  # every token once per slot

        def grouped(name, n, red, extra):
            return _gemm(name, rows, n, red, e, b_bytes=w_b, c_bytes=rows * n * e + extra)

        if fwd:
            out += [
                _ew("gather x", 0, 2 * k * x_b),
                grouped("grouped mm", Do, Di, 0),
                _ew("scale + combine", 2.0 * rows * Do, k * T * Do * e + y_b),
            ]
        if bwd:
            out += [
                _ew("scale dA by c", float(rows * Do), y_b + k * y_b),
                grouped("grouped dx", Di, Do, 0),
                _ew("combine dx", float(rows * Di), k * x_b + x_b),
                _gemm("grouped dW = X^T (c dA)", Di, Do, rows, e, a_bytes=k * x_b, b_bytes=k * y_b, c_bytes=w_b),
                _ew("dg = rowsum(Y_e * dA)", 2.0 * rows * Do, 2 * k * y_b),
            ]
    elif strategy == "reference":  # eager: one gathered bmm per slot, autograd backward
        gathered = B * Di * Do * e
        for j in range(k):
            if fwd:
                out += [
                    _ew(f"gather W[idx[:, {j}]]", 0, 2 * gathered),
                    _gemm(f"bmm slot {j}", L, Do, Di, e, batch=B, b_bytes=gathered),
                    _ew(f"bias, scale, sum slot {j}", 3.0 * T * Do, 6 * y_b),
                ]
            if bwd:
                out += [
                    _ew(f"grad scale slot {j}", 2.0 * T * Do, 4 * y_b),
                    _gemm(f"bmm dx slot {j}", L, Di, Do, e, batch=B, b_bytes=gathered),
                    _gemm(f"bmm dW slot {j}", Di, Do, L, e, batch=B, c_bytes=gathered),
                    _ew(f"index_add dW slot {j}", float(B * Di * Do), gathered + 2 * w_b),
                ]
    else:
        valid = ", ".join(STRATEGIES["mixed_linear"])
        raise ValueError(f"strategy: unknown for mixed_linear: {strategy!r} (valid: {valid})")
    return out


# --------------------------------------------------------------------------- norm / residual ops

# (activation tensors read, written) of the forward and the backward, fused: the minimum.
_NORM_IO = {
    "mask_ln_modulate": ((2, 2), (4, 2)),  # x, m -> r0, h;  dh, dr0, x, m -> dx, dm
    "residual_ln_modulate": ((3, 2), (4, 3)),  # z, r0, a -> zr, h;  dzr, dh, r0, a -> dz, dr0, da
    "gated_residual": ((2, 1), (2, 2)),  # z, y -> out;  dout, y -> dz, dy
}
# Per-sample (B, D) vectors reduced over L in the backward (dshift, dscale, dgate, ...).
_NORM_PARTIALS = {"mask_ln_modulate": 2, "residual_ln_modulate": 3, "gated_residual": 1}
# Eager kernels (each reading and writing whole activations) of the reference twin's forward.
_NORM_EAGER_FWD = {
    "mask_ln_modulate": [(2, 1), (1, 1), (1, 1), (1, 1)],  # x*m, LN, *(1+scale), +shift
    "residual_ln_modulate": [(1, 1), (2, 1), (2, 1), (1, 1), (1, 1), (1, 1)],
    "gated_residual": [(1, 1), (2, 1)],
}


def _norm_steps(op: str, strategy: str, mode: str, sh: dict, dtype, dev: Device) -> list[Step]:
    B, L, D = sh["B"], sh["L"], sh["D"]
    e = torch.tensor([], dtype=dtype).element_size()
    act = B * L * D * e
    fwd = mode in ("fwd", "fwd+bwd")
    bwd = mode in ("bwd", "fwd+bwd")
    (fr, fw), (br, bw) = _NORM_IO[op]
    flops_row = 10.0 * D  # a LayerNorm + modulate per element: a handful of FLOPs
    out: list[Step] = []
    if strategy in ("fused", "compiled"):
        if strategy == "fused":
            from switch_dit.kernels import norm_modulate as N

            rows_f, rows = N.rows_per_program(B, L, dev.sms), N.rows_per_program(B, L, dev.sms, backward=True)
        else:
            rows_f = rows = max(1, L // 8)  # Inductor's split reduction: a few partial rows per sample
        chunks = _cdiv(L, rows)
        part = 4.0 * B * D * _NORM_PARTIALS[op] * chunks  # fp32 partial rows, written then summed
        if fwd:
            out.append(
                Step(f"{op} fwd", vector_flops=flops_row * B * L, bytes=(fr + fw) * act, programs=B * _cdiv(L, rows_f))
            )
        if bwd:
            out += [
                Step(
                    f"{op} bwd", vector_flops=2 * flops_row * B * L, bytes=(br + bw) * act + part, programs=B * chunks
                ),
                _ew("sum partials", part / 4, part),
            ]
    elif strategy == "reference":
        eager = _NORM_EAGER_FWD[op]
        if fwd:
            out += [_ew(f"eager {i}", B * L * D, (r + w) * act) for i, (r, w) in enumerate(eager)]
        if bwd:  # autograd: about two kernels per forward one, each a read-read-write
            out += [_ew(f"eager bwd {i}", 2 * B * L * D, 3 * act) for i in range(2 * len(eager))]
    else:
        raise ValueError(f"strategy: unknown for {op}: {strategy!r} (valid: {', '.join(STRATEGIES[op])})")
    return out


# --------------------------------------------------------------------------- expert MLPs (DiffMoE)


def _expert_mlp_steps(strategy: str, mode: str, sh: dict, dtype) -> list[Step]:
    """E experts (D -> H -> D) over the (E, C) token slots of a pool of S tokens; ``rows``: the
    valid (expert, token) pairs (E * C in training; fewer at evaluation). Backward: the dx and
    dW GEMMs of both layers (twice the forward FLOPs) and the same activations again."""
    S, D, H, E, C = sh["S"], sh["D"], sh["H"], sh["E"], sh["C"]
    R = sh.get("rows", E * C)
    e = torch.tensor([], dtype=dtype).element_size()
    w_b = 2 * E * D * H * e
    fwd = mode in ("fwd", "fwd+bwd")
    bwd = mode in ("bwd", "fwd+bwd")
    # "bmm" computes every slot; "grouped" and the reference only the valid pairs
    rows = E * C if strategy == "bmm" else R

    def mlp(name, factor):
        return [
            _gemm(f"{name} fc1", rows, H * factor, D, e, b_bytes=w_b / 2 * factor),
            _ew(f"{name} gelu", 8.0 * rows * H, 2 * rows * H * e),
            _gemm(f"{name} fc2", rows, D * factor, H, e, b_bytes=w_b / 2 * factor),
        ]

    out: list[Step] = []
    if strategy == "fused":
        return _fused_expert_mlp_steps(mode, S, D, H, E, C, R, e)
    if strategy not in ("dense", "bmm", "grouped", "reference"):
        valid = ", ".join(STRATEGIES["expert_mlp"])
        raise ValueError(f"strategy: unknown for expert_mlp: {strategy!r} (valid: {valid})")
    gather = [] if strategy == "dense" else [_ew("gather rows", 0, 2 * rows * D * e)]
    # combine: each token sums its E candidate rows (zero where not chosen), in expert order
    combine = [] if strategy == "dense" else [_ew("scale + combine", 2.0 * E * S * D, (E * S + S) * D * e)]
    per_expert = E if strategy == "reference" else 1  # the reference launches per expert
    if fwd:
        out += gather + mlp("fwd", 1) + combine
    if bwd:  # dx and dW of both layers: twice the GEMM work; the gathers and combine again
        # bmm and grouped sum the gathered rows' gradients per token by the combine (_GatherRows:
        # deterministic, no atomics), the reference by index_add, a scatter as cheap as the gather
        out += combine + mlp("bwd", 2) + (combine if strategy in ("bmm", "grouped") else gather)
    if per_expert > 1:
        out += [_ew("per-expert launches", 0, 0)] * (len(out) * (per_expert - 1))
    return out


def _fused_expert_mlp_steps(mode: str, S: int, D: int, H: int, E: int, C: int, R: int, e: int) -> list[Step]:
    """The Triton kernels of ``switch_dit.kernels.expert_mlp`` as the training path runs them
    (``switch_dit.ops.expert_mlp._fused_op`` and ``_fused_backward_op``): the grouped steps without their gather
    passes, bias and GELU in fc1's epilogue (which also keeps the pre-activation for the
    backward); fc2 keeps z unscaled for the gate-score gradient, and one elementwise pass scales
    it. Backward: one gather of dy, the da GEMM with the score and GELU' in its epilogue, two
    per-expert weight-gradient reductions (float32 accumulators stored in the weights' dtype),
    one gather of x, the dx GEMM, the combine and the gate-score row dots. The custom backward
    takes dy per token: no backward of the combine."""
    from switch_dit.kernels import expert_mlp as K  # the GPU tiles, so the model follows the kernels

    bm, bn, bk = (K.GPU_BLOCKS[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    # the tile schedule: each expert's rows in blocks of BLOCK_M (every expert's last one partial)
    tiles = min(E * _cdiv(C, bm), _cdiv(R, bm) + E)
    w_b = E * D * H * e  # one layer's weights
    rows_d, rows_h = R * D * e, R * H * e  # packed rows of width D, of width H

    def gemm(name, n, red, a_bytes, c_bytes, vector=0.0):
        return Step(
            name,
            mma_flops=2.0 * R * n * red,
            vector_flops=float(vector),
            bytes=float(a_bytes + w_b + c_bytes),
            programs=tiles * _cdiv(n, bn),
            steps=_cdiv(red, bk),
        )

    def wgrad(name, n, k, a_bytes):
        # one program per (expert, BLOCK_N x BLOCK_K tile of dW) walks the expert's rows in one loop
        return Step(
            name,
            mma_flops=2.0 * R * n * k,
            vector_flops=2.0 * R * n,  # the bias gradient's row sums
            bytes=float(a_bytes + E * (n * k + n) * e),
            programs=E * _cdiv(n, bn) * _cdiv(k, bk),
            steps=_cdiv(_cdiv(R, E), bm),
        )

    combine = _ew("combine", float(E * S * D), (E * S + S) * D * e)
    out: list[Step] = []
    if mode in ("fwd", "fwd+bwd"):
        out += [
            gemm("fc1 + gelu (gather in the loads)", H, D, rows_d, 2 * rows_h, vector=8.0 * R * H),
            gemm("fc2 (z kept)", D, H, rows_h, rows_d),
            _ew("o = score * z", float(R * D), 2 * rows_d),
            combine,
        ]
    if mode in ("bwd", "fwd+bwd"):
        out += [
            _ew("gather dy", 0, 2 * rows_d),
            gemm("da = score dy w2 gelu'(a)", H, D, rows_d + rows_h, rows_h, vector=10.0 * R * H),
            wgrad("dw2, db2", D, H, rows_d + rows_h),
            _ew("gather x", 0, 2 * rows_d),
            wgrad("dw1, db1", H, D, rows_h + rows_d),
            gemm("dx rows = da w1", D, H, rows_h, rows_d),
            combine,
            _ew("dgating = <dy, z> per row", 2.0 * R * D, 2 * rows_d),
        ]
    return out


STRATEGIES = {
    "mixed_linear": ("fused", "bmm", "grouped", "reference", "shared", "dense"),
    "expert_mlp": ("fused", "bmm", "grouped", "reference", "dense"),
    "mask_ln_modulate": ("fused", "compiled", "reference"),
    "residual_ln_modulate": ("fused", "compiled", "reference"),
    "gated_residual": ("fused", "compiled", "reference"),
}
_REQUIRED = {
    "mixed_linear": ("B", "L", "M", "k"),
    "mask_ln_modulate": ("B", "L", "D"),
    "residual_ln_modulate": ("B", "L", "D"),
    "gated_residual": ("B", "L", "D"),
    "expert_mlp": ("S", "D", "H", "E", "C"),
}


def estimate(
    op: str,
    strategy: str,
    shape: dict,
    dtype=torch.bfloat16,
    device="h100",
    *,
    mode: str = "fwd+bwd",
    tf32: bool = False,
) -> Estimate:
    """Expected work and time of one op's strategy.

    op: one of ``STRATEGIES`` ("expert_mask" is an alias of "mixed_linear"); strategy: one of
    ``STRATEGIES[op]`` ("dense" is the floor: one plain D_in x D_out linear on the same tokens;
    "shared": one timestep for the whole batch, the k experts mixed once, then one dense GEMM).
    shape: B, L, D (or D_in and D_out), and M, k for the routed linear; S (pool tokens), D, H,
    E, C (slots per expert) and optionally rows (valid pairs, default E * C) for the expert
    MLPs ("dense": the valid rows through their experts, nothing gathered). dtype: the
    activations' dtype; fp32 products use TF32 only with ``tf32=True`` (PyTorch's default is
    off). device: a name, a CUDA device or a :class:`Device` with measured peaks.
    mode: "fwd", "bwd" or "fwd+bwd".
    """
    if op == "expert_mask":
        op = "mixed_linear"
    if op not in STRATEGIES:
        raise ValueError(f"op: unknown {op!r} (valid: {', '.join(STRATEGIES)})")
    if mode not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"mode: expected 'fwd', 'bwd' or 'fwd+bwd', got {mode!r}")
    missing = [key for key in _REQUIRED[op] if key not in shape]
    if op == "mixed_linear" and "D" not in shape and not ("D_in" in shape and "D_out" in shape):
        missing.append("D (or D_in and D_out)")
    if missing:
        raise ValueError(f"shape: {op} needs {', '.join(missing)}; got {sorted(shape)}")
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        dtype = names.get(dtype) or getattr(torch, dtype)
    dev = device_peaks(device)
    if op == "mixed_linear":
        steps = _routed_linear_steps(strategy, mode, shape, dtype, tf32, dev)
    elif op == "expert_mlp":
        steps = _expert_mlp_steps(strategy, mode, shape, dtype)
    else:
        steps = _norm_steps(op, strategy, mode, shape, dtype, dev)
    rate = dev.rate(dtype, tf32)
    note = f"{dev.name} {dev.source}: {rate / 1e12:.0f} TFLOP/s, {dev.bandwidth / 1e12:.2f} TB/s; {len(steps)} kernels"
    return _run(steps, dev, rate, note)


# --------------------------------------------------------------------------- predictions table

XL_SHAPES = {
    "mixed_linear": dict(B=32, L=256, D=1152, M=3, k=2),
    "mask_ln_modulate": dict(B=32, L=256, D=1152),
    "residual_ln_modulate": dict(B=32, L=256, D=1152),
    "gated_residual": dict(B=32, L=256, D=1152),
    "expert_mlp": dict(S=32 * 256, D=1152, H=4608, E=16, C=32 * 256 // 16),
}


def predictions(devices=("a100", "h100", "h200"), dtype=torch.bfloat16, mode: str = "fwd+bwd") -> str:
    """A text table of every op's strategies at XL (bf16 fwd+bwd by default), in microseconds,
    with each strategy's time over the op's best: the model's predictions, not measurements."""
    lines = [
        f"analytic model, {mode}, {str(dtype).replace('torch.', '')}, XL shapes; us (x best of the op)",
        "op                    strategy   " + "".join(f"{DEVICES[d].name:>22}" for d in devices),
    ]
    for op, shape in XL_SHAPES.items():
        times = {s: [estimate(op, s, shape, dtype, d, mode=mode).time_s * 1e6 for d in devices] for s in STRATEGIES[op]}
        best = [min(t[i] for t in times.values()) for i in range(len(devices))]
        for s, ts in times.items():
            cells = "".join(f"{t:>14.1f} ({t / b:4.2f}x)" for t, b in zip(ts, best))
            lines.append(f"{op:<22}{s:<11}{cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(predictions())
