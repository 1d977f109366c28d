"""The shipped strategy table: what ``backend="auto"`` runs on a GPU where it may not time.

Used under CUDA-graph capture and torch.compile tracing (when no measured choice is cached),
with ``SWITCH_DIT_AUTOTUNE=0`` and in deterministic mode (docs/design.md §3). Keyed by device
(a substring of ``torch.cuda.get_device_name``: A100, H100, H200; "*" for any other GPU), op and
dtype; each entry is an order of preference, and the first strategy that is registered and
supports the inputs runs ("reference" always can).

Status: **predicted, not measured.** No GPU run has timed the strategies yet. The orders
follow docs/design.md §2 and the expert reading of the kernels in the strategy issue
(bf16, XL shapes, H100): the fused forward/dx kernels are estimated at 50-70 us against ~35 us
for one dense cuBLAS GEMM, and the fused weight gradient at 140-230 us (4 MMA steps per sample,
the pipeline drained after each) against M row-scaled cuBLAS GEMMs of ~40 us each; so for
training the cuBLAS compositions are predicted ahead of "fused". Of the two, "bmm" does one
dense linear's FLOPs forward and two backward (dx, and P = x^T dA giving dW and dcoef), where
"grouped" does k each way (switch_dit.perf_model: 237 against 290 us fwd+bwd at XL, bf16, k = 2,
H100), so "bmm" comes first. In fp32 without TF32 every fused candidate spills, so fp32 goes to
"bmm" (cuBLAS SGEMM, the documented fp32 default of switch_dit.ops.composed_linear), then the
reference (itself cuBLAS bmm); "grouped" in fp32 on CUDA has no sync-free grouped GEMM and runs
its per-pair fallback, so it comes after them, and "fused" last. The norm/residual
ops are memory-bound single passes: "fused" reads and writes each row once, the minimum; the
compiled reference ("compiled") should be close, the eager reference several passes behind.
When a GPU run measures them, replace the orders with the measured winners and change
``STATUS`` per device.
"""

from __future__ import annotations

import torch

__all__ = ["TABLE", "STATUS", "lookup"]

_ROUTED = ("mixed_linear", "expert_mask", "expert_mask_and_apply")
_NORM = ("mask_ln_modulate", "residual_ln_modulate", "gated_residual")
_HALF = (torch.float16, torch.bfloat16)

_ROUTED_HALF = ("bmm", "grouped", "fused", "reference")
_ROUTED_FP32 = ("bmm", "reference", "grouped", "fused")
_NORM_ANY = ("fused", "compiled", "reference")

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

STATUS = {device: "predicted, not measured" for device in TABLE}


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
