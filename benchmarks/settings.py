"""What each mode measures: shapes, models, precisions, iteration counts.

full  (GPU) every benchmark at the paper's sizes;
quick (GPU) the cases that decide the targets (they also run first in full mode);
gpu   (GPU) the plan of ``make gpu`` (benchmarks/gpu.py): every op strategy at the S, B and XL
      widths (DiffMoE's expert MLP at XL only), block rows, S/2 and XL/2 training steps, shorter
      timing loops to fit its budget;
smoke (CPU) tiny shapes, fp32, a few iterations: checks the harness, not the speed (``make gpu DRY=1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FAMILIES = ("Switch-DiT", "DiT", "DTR")


@dataclass
class Settings:
    mode: str
    op_dtype: torch.dtype
    op_shapes: list  # dicts B, L, D (M and k below)
    op_quick_D: tuple
    plan_shapes: list  # dicts N, T, M, B, k, L (tokens, for the tile schedule); the first is quick
    # dicts B, L, D of DiffMoE's expert MLP (bench "expert_mlp"), None: the op shapes. Its 16
    # experts of 4D hidden units cost several times a routed linear: make gpu runs the XL width
    # only, the smoke run a narrower shape (the interpreted fused kernels take seconds per call)
    moe_shapes: list | None = None
    M: int = 3
    k: int = 2
    input_sets: int = 4
    block_sizes: tuple = ("S/2", "B/2", "XL/2")
    block_quick_sizes: tuple = ("B/2", "XL/2")
    block_batch: int = 32
    block_precision: str = "bf16-autocast"
    step_sizes: tuple = ("S/2", "B/2", "XL/2")
    step_quick_sizes: tuple = ("S/2", "XL/2")
    step_batch: int = 32
    step_precisions: tuple = ("bf16-autocast", "fp16-autocast+scaler")
    step_warmup: int = 3
    step_iters: int = 15
    overrides: dict = field(default_factory=dict)  # model overrides (tiny models in smoke)
    repeats: int = 1
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_warmup: int = 1
    cpu_iters: int = 5
    # Seconds that must be left before the deadline for a case to start (runner.Context).
    heavy_margin_s: float = 120.0
    light_margin_s: float = 15.0


def settings_for(mode: str) -> Settings:
    if mode == "smoke":
        return Settings(
            mode="smoke",
            op_dtype=torch.float32,  # the Triton interpreter's bf16 dot is wrong (docs/design.md §4)
            op_shapes=[{"B": 2, "L": 16, "D": 32}],
            op_quick_D=(32, 16),
            moe_shapes=[{"B": 2, "L": 16, "D": 16}],
            plan_shapes=[{"N": 2, "T": 50, "M": 3, "B": 4, "k": 2, "L": 16}],
            input_sets=2,
            block_sizes=("S/2",),
            block_quick_sizes=("S/2",),
            block_batch=2,
            block_precision="fp32",
            step_sizes=("S/2",),
            step_quick_sizes=("S/2",),
            step_batch=2,
            step_warmup=1,
            step_iters=1,  # an interpreted fast step takes seconds
            overrides={"hidden_size": 32, "num_heads": 2, "input_size": 8, "num_classes": 10, "depth": 1},
            cpu_warmup=0,  # the runner's first call already warmed up
            cpu_iters=1,  # one timed call: the interpreter takes seconds per fused call
            heavy_margin_s=5.0,  # make gpu DRY=1 gives each suite a budget of about a minute
            light_margin_s=1.0,
        )
    if mode == "gpu":
        # Every case is "quick" here: the plan is what make gpu runs, phase by phase, each under
        # its own budget (benchmarks/gpu.py); the cases deciding the targets come first.
        return Settings(
            mode="gpu",
            op_dtype=torch.bfloat16,
            op_shapes=[{"B": 32, "L": 256, "D": D} for D in (384, 768, 1152)],  # S, B, XL widths
            op_quick_D=(384, 768, 1152),
            moe_shapes=[{"B": 32, "L": 256, "D": 1152}],  # the XL width of the DiffMoE target only
            plan_shapes=[{"N": 28, "T": 1000, "M": 3, "B": 256, "k": 2, "L": 256}],
            # XL first: its rows decide the MFU and the XL targets, and a budget cuts the tail
            block_sizes=("XL/2", "B/2"),
            step_sizes=("XL/2", "S/2"),
            repeats=2,
            warmup_ms=10,
            rep_ms=40,
            step_warmup=2,
            step_iters=8,
            heavy_margin_s=40.0,
            light_margin_s=4.0,
        )
    if mode not in ("quick", "full"):
        raise ValueError(f"mode must be smoke, quick, gpu or full, got {mode!r}")
    return Settings(
        mode=mode,
        op_dtype=torch.bfloat16,
        op_shapes=[{"B": 32, "L": 256, "D": D} for D in (384, 768, 1152)],
        op_quick_D=(384, 1152),
        plan_shapes=[
            {"N": 28, "T": 1000, "M": 3, "B": 256, "k": 2, "L": 256},
            {"N": 12, "T": 1000, "M": 3, "B": 32, "k": 2, "L": 256},
        ],
        repeats=2,  # docs/design.md §5: time twice, the spread is the noise (quick rows are kept by --resume)
        step_iters=20 if mode == "full" else 10,
    )


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def model_name(family: str, size: str) -> str:
    return f"{family}-{size}"
