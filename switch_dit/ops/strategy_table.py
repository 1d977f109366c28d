"""The shipped strategy table: what ``backend="auto"`` runs on a GPU where it may not time.

Used under CUDA-graph capture and torch.compile tracing (when no measured choice is cached),
with ``SWITCH_DIT_AUTOTUNE=0`` and in deterministic mode (docs/design.md §3). Keyed by device
(a substring of ``torch.cuda.get_device_name``: A100, H100, H200; "*" for any other GPU), op and
dtype; each entry is an order of preference, and the first strategy that is registered and
supports the inputs runs ("reference" always can).

Status: **predicted, not measured.** No GPU run has timed the strategies yet. Sources: the
analytic model (``switch_dit.perf_model``, docs/design.md §5) at XL shapes (B = 32, L = 256,
D = 1152, M = 3, k = 2, forward + backward), in microseconds,

    routed linear, bf16    fused    bmm   grouped   reference
      A100                   348    505       700        1097
      H100 SXM               124    237       290         527
      H200                   124    189       261         415

and an expert reading of the compiled kernels (TTGIR and cubin reports, sm_90, XL, bf16),
which sees what the model cannot. That reading found the fused weight gradient draining its
pipeline after every sample (140-230 us alone); the kernel has since been rewritten as one
pipelined loop over the chunk's rows (kernels/routed_linear.py), which the model puts at 1.09x a
dense linear for fused fwd+bwd. But forward and dx still wait for each wgmma before mixing the
next tile (the static check's one listed exception), 50-70 us each by the reading, and the
rewrite has never been timed. So, until a GPU measures them:
  - bf16/fp16: "bmm" first (cuBLAS, whose model numbers are close to what it reaches; one dense
    linear's FLOPs forward, two backward), then "grouped" (k GEMMs each way), then "fused",
    then the reference. The model's order among the cuBLAS strategies is kept.
  - fp32 with TF32 off: tensor cores cannot give true fp32, so the fused "ieee" configs (which
    no longer spill) run FMA loops; "bmm" (cuBLAS SGEMM, the fp32 default of
    switch_dit.ops.composed_linear) first, then the reference (cuBLAS bmm too); "grouped" has no
    sync-free grouped GEMM in fp32 on CUDA and runs its per-pair fallback; "fused" last.
  - norm/residual ops: the model puts "compiled" within 1-3 % of "fused" (H100 bf16: 63.7 vs
    65.2, 75.7 vs 77.8, 46.1 vs 46.8 us), within its error. This table decides under CUDA-graph
    capture and torch.compile tracing, where a first compile of the "compiled" strategy cannot
    run, so "fused" (one pass, the fewest bytes of the kernels) leads.
The table decides only where auto may not time and has no measured choice cached: the trainer
runs one eager step before compiling (train.warm_up), whose timing the compiled step then uses.
When a GPU run measures them, replace the orders with the measured winners and set ``STATUS``
per device to "measured on <device>, <date>".
"""

from __future__ import annotations

import torch

__all__ = ["TABLE", "STATUS", "lookup"]

_ROUTED = ("mixed_linear", "expert_mask", "expert_mask_and_apply")
_NORM = ("mask_ln_modulate", "residual_ln_modulate", "gated_residual")
_HALF = (torch.float16, torch.bfloat16)

_ROUTED_HALF = ("bmm", "grouped", "fused", "reference")  # fused after the compositions: expert reading
_ROUTED_FP32 = ("bmm", "reference", "grouped", "fused")  # fused fp32 is FMA; grouped fp32 falls back per pair
_NORM_ANY = ("fused", "compiled", "reference")  # "compiled" cannot compile under capture

# device pattern -> {(op, dtype): order of preference}
TABLE: dict[str, dict[tuple[str, torch.dtype], tuple[str, ...]]] = {}
for _device in ("A100", "H100", "H200", "*"):
    _rows = {}
    for _op in _ROUTED:
        for _dtype in _HALF:
            _rows[(_op, _dtype)] = _ROUTED_HALF
        _rows[(_op, torch.float32)] = _ROUTED_FP32
    for _op in _NORM:
        for _dtype in (*_HALF, torch.float32):
            _rows[(_op, _dtype)] = _NORM_ANY
    TABLE[_device] = _rows

STATUS = {device: "predicted (perf_model and a reading of the kernels), not measured" for device in TABLE}


def lookup(device_name: str, op: str, dtype: torch.dtype, available: list[str]) -> tuple[str, str]:
    """(strategy, where the choice came from) for ``op`` on ``device_name`` among ``available``
    (the registered strategies that support the inputs; it must hold "reference")."""
    device = next((d for d in TABLE if d != "*" and d in device_name), "*")
    order = TABLE[device].get((op, dtype), ())
    for name in order:
        if name in available:
            return name, f"{device} row, {STATUS[device]}"
    fallback = "fused" if "fused" in available else "reference"
    return fallback, f"no {device} row for {op} {dtype}: {fallback}"
