"""Op benchmarks: routed expert linear, mask+LN+modulate, gated residual+LN+modulate, routing plan.

Variants of every op, side by side in one run (the row's ``extra.role`` says which kind):
  <strategy>              (role "strategy") every strategy ``switch_dit.ops.strategies(op)`` lists,
                          called with backend=<strategy>: the fused Triton kernels, the cuBLAS
                          compositions, "reference" (the project's plain PyTorch twin, eager)...
  auto                    (role "auto") backend="auto": what the models run (its first call
                          chooses; the timing is of the chosen strategy)
  reference+compile       (baseline) the reference twin under torch.compile, default mode
  reference+max-autotune  (baseline) the same, mode="max-autotune-no-cudagraphs"
  official                (baseline; routed linear, routing) the public implementation's algorithm
  dense_linear            (role "floor"; routed linear) one dense D x D F.linear on the same tokens:
                          the floor a routed linear can hope for (docs/design.md §2)
Speed-ups are taken against the best of a baseline's eager and compiled variants
(benchmarks/README.md, "Definitions").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import adapters, flops
from .modelkit import compile_mode
from .modes import mode_runner
from .official import official_expert_mask
from .runner import Case, Context
from .settings import DTYPE_NAMES, Settings
from .timing import rotate

MODES = ("fwd", "bwd", "fwd+bwd")
# bench name -> (switch_dit.ops function, input maker name, work formula)
NORM_OPS = {
    "mask_ln_modulate": "mask_ln_modulate",
    "gated_residual_ln_modulate": "residual_ln_modulate",
}


def variants(op: str, max_autotune: bool = True) -> list[tuple[str, str, str | None]]:
    """(variant, role, strategy) of an op: its strategies, auto, then the compiled reference twins
    (not where the op registers "compiled", the same thing as a strategy; max-autotune only when
    asked: it costs ~45 s of autotuning per shape on a cold GPU)."""
    try:
        names = adapters.strategies(op)
    except Exception as exc:  # noqa: BLE001 - a broken registry is one error row, not a crash
        return [("strategies", "strategy", f"!{type(exc).__name__}: {exc}")]
    out = [(name, "strategy", name) for name in names]
    out.append(("auto", "auto", "auto"))
    if "compiled" not in names:
        out.append(("reference+compile", "baseline", "reference"))
    if max_autotune:
        out.append(("reference+max-autotune", "baseline", "reference"))
    return out


def cases(s: Settings, ctx: Context) -> list[Case]:
    out = []
    dtype = DTYPE_NAMES[s.op_dtype]
    elem = torch.empty((), dtype=s.op_dtype).element_size()
    for shape in s.op_shapes:
        B, L, D = shape["B"], shape["L"], shape["D"]
        quick = D in s.op_quick_D
        full_shape = {**shape, "M": s.M, "k": s.k}

        def routed_work(mode, B=B, L=L, D=D):
            return flops.routed_linear_work(B, L, D, s.M, s.k, elem, mode)

        # make gpu's budget allows max-autotune at the XL width only (the target's shape)
        # (and not in the smoke run, where the compile backend, aot_eager, has no modes)
        autotune = s.mode in ("full", "quick") or (s.mode == "gpu" and D == max(sh["D"] for sh in s.op_shapes))
        routed = [
            (v, role, _maker(ctx, "expert_mask", v, strategy))
            for v, role, strategy in variants("expert_mask", max_autotune=autotune)
        ]
        routed += [("official", "baseline", lambda: official_expert_mask), ("dense_linear", "floor", None)]
        for variant, role, make in routed:
            build = _dense_linear_build(ctx, s, shape) if make is None else _routed_build(ctx, s, shape, make)
            out.append(
                Case(
                    "ops",
                    "routed_linear",
                    variant,
                    full_shape,
                    dtype,
                    MODES,
                    build,
                    routed_work,
                    quick=quick,
                    compiled="+" in variant,
                    role=role,
                )
            )

    # the norm ops after every routed-linear row: a budget that cuts the sweep cuts these first
    for shape in s.op_shapes:
        B, L, D = shape["B"], shape["L"], shape["D"]
        quick = D in s.op_quick_D
        for bench, make_inputs, work in (
            ("mask_ln_modulate", _mask_ln_inputs, flops.mask_ln_modulate_work),
            ("gated_residual_ln_modulate", _gated_inputs, flops.gated_residual_work),
        ):
            op = NORM_OPS[bench]
            for variant, role, strategy in variants(op, max_autotune=s.mode not in ("gpu", "smoke")):
                out.append(
                    Case(
                        "ops",
                        bench,
                        variant,
                        dict(shape),
                        dtype,
                        MODES,
                        _simple_build(ctx, s, shape, _maker(ctx, op, variant, strategy), make_inputs),
                        lambda mode, work=work, B=B, L=L, D=D: work(B, L, D, elem, mode),
                        quick=quick,
                        compiled="+" in variant,
                        role=role,
                    )
                )

    for i, shape in enumerate(s.plan_shapes):
        for variant, role, make in (
            ("fast", "strategy", adapters.routing_plan),
            ("reference", "baseline", lambda: adapters.ref_routing),
            ("official", "baseline", lambda: adapters.official_routing),
        ):
            out.append(
                Case(
                    "ops",
                    "routing_plan",
                    variant,
                    dict(shape),
                    "fp32",
                    ("fwd",),
                    _plan_build(ctx, shape, make),
                    lambda mode, sh=shape: flops.routing_plan_work(sh["N"], sh["T"], sh["M"], sh["B"], sh["k"]),
                    quick=i == 0,
                    role=role,
                )
            )
    return out


# ------------------------------------------------------------------ builders


def _maker(ctx: Context, op: str, variant: str, strategy: str):
    """A zero-argument function returning the callable of a variant (built when the case runs)."""

    def make():
        if strategy.startswith("!"):
            raise RuntimeError(f"switch_dit.ops.strategies({op!r}) failed: {strategy[1:]}")
        fn = adapters.op_fn(op, strategy)
        if "+" in variant:
            mode = compile_mode(variant, ctx.compile_mode) if ctx.compile_backend == "inductor" else None
            fn = torch.compile(fn, backend=ctx.compile_backend, mode=mode)
        return fn

    return make


def _rand(shape, ctx, dtype, grad=True, scale=1.0):
    t = torch.randn(shape, device=ctx.device, dtype=dtype) * scale
    return t.requires_grad_(grad)


def _routing_inputs(ctx: Context, s: Settings, B: int, M: int, k: int, dtype):
    """Top-k of random softmax gates: every expert gets samples, weights are the probabilities."""
    probs = torch.softmax(torch.randn(B, M, device=ctx.device), dim=-1)
    w, idx = probs.topk(k, dim=-1)
    return idx, w.to(dtype).requires_grad_(True)


def _routed_build(ctx: Context, s: Settings, shape: dict, make):
    def build():
        fn = make()
        B, L, D = shape["B"], shape["L"], shape["D"]
        dt = s.op_dtype
        sets = []
        for _ in range(s.input_sets):
            idx, g = _routing_inputs(ctx, s, B, s.M, s.k, dt)
            sets.append(
                (
                    _rand((B, L, D), ctx, dt),
                    _rand((s.M, D, D), ctx, dt, scale=D**-0.5),
                    _rand((s.M, D), ctx, dt, scale=0.1),
                    idx,
                    g,
                )
            )
        return lambda mode: mode_runner(fn, sets, lambda inp: [inp[0], inp[1], inp[2], inp[4]], mode)

    return build


def _dense_linear_build(ctx: Context, s: Settings, shape: dict):
    def build():
        B, L, D = shape["B"], shape["L"], shape["D"]
        dt = s.op_dtype
        sets = [
            (_rand((B, L, D), ctx, dt), _rand((D, D), ctx, dt, scale=D**-0.5), _rand((D,), ctx, dt, scale=0.1))
            for _ in range(s.input_sets)
        ]
        return lambda mode: mode_runner(F.linear, sets, lambda inp: list(inp), mode)

    return build


def _mask_ln_inputs(ctx, s, B, L, D):
    dt = s.op_dtype
    return (
        _rand((B, L, D), ctx, dt),
        _rand((B, L, D), ctx, dt, scale=0.5),
        _rand((B, D), ctx, dt, scale=0.1),
        _rand((B, D), ctx, dt, scale=0.1),
    )


def _gated_inputs(ctx, s, B, L, D):
    dt = s.op_dtype
    return (
        _rand((B, L, D), ctx, dt),
        _rand((B, L, D), ctx, dt),
        _rand((B, L, D), ctx, dt),
        _rand((B, D), ctx, dt, scale=0.5),
        _rand((B, D), ctx, dt, scale=0.1),
        _rand((B, D), ctx, dt, scale=0.1),
    )


def _simple_build(ctx: Context, s: Settings, shape: dict, make, make_inputs):
    def build():
        fn = make()
        sets = [make_inputs(ctx, s, shape["B"], shape["L"], shape["D"]) for _ in range(s.input_sets)]
        return lambda mode: mode_runner(fn, sets, lambda inp: list(inp), mode)

    return build


def _plan_build(ctx: Context, shape: dict, make):
    def build():
        fn = make()
        N, T, M, B, k = (shape[c] for c in ("N", "T", "M", "B", "k"))  # L: tokens for the tile schedule
        sets = [
            (
                torch.softmax(torch.randn(N, T, M, device=ctx.device), dim=-1),
                torch.randint(0, T, (B,), device=ctx.device),
                k,
                shape["L"],
            )
            for _ in range(4)
        ]
        nxt = rotate(sets)

        def run():
            with torch.no_grad():  # routing carries no gradient of its own
                return fn(*nxt())

        return lambda mode: run

    return build
