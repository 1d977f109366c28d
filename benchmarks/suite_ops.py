"""Op benchmarks: routed expert linear, mask+LN+modulate, gated residual+LN+modulate, routing plan.

Variants of every op, side by side in one run:
  fast               the fused kernel (switch_dit.ops / switch_dit.routing), when it exists
  reference          the project's plain PyTorch path, eager
  reference+compile  the same under torch.compile
  official           (routed linear, routing) the public implementation's algorithm
  dense_linear       (routed linear) one dense D x D F.linear on the same tokens: the floor
                     a routed linear can hope for (DESIGN.md §2a)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import adapters, flops
from .modes import mode_runner
from .official import official_expert_mask
from .runner import Case, Context
from .settings import DTYPE_NAMES, Settings
from .timing import rotate

MODES = ("fwd", "bwd", "fwd+bwd")


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

        for variant, make in (
            ("fast", lambda: adapters.expert_mask("triton")),
            ("reference", _reference_expert_mask),
            ("reference+compile", lambda: _compiled(ctx, _reference_expert_mask())),
            ("official", lambda: official_expert_mask),
            ("dense_linear", None),
        ):
            build = _dense_linear_build(ctx, s, shape) if make is None else _routed_build(ctx, s, shape, make)
            out.append(Case("ops", "routed_linear", variant, full_shape, dtype, MODES, build, routed_work,
                            quick=quick, compiled="compile" in variant))

        for bench, op, make_inputs, work in (
            ("mask_ln_modulate", adapters.mask_ln_modulate, _mask_ln_inputs, flops.mask_ln_modulate_work),
            ("gated_residual_ln_modulate", adapters.gated_residual_ln_modulate, _gated_inputs,
             flops.gated_residual_work),
        ):
            for variant, make in (
                ("fast", lambda op=op: op("triton")),
                ("reference", lambda op=op: op("reference")),
                ("reference+compile", lambda op=op: _compiled(ctx, op("reference"))),
            ):
                out.append(Case("ops", bench, variant, dict(shape), dtype, MODES,
                                _simple_build(ctx, s, shape, make, make_inputs),
                                lambda mode, work=work, B=B, L=L, D=D: work(B, L, D, elem, mode),
                                quick=quick, compiled="compile" in variant))

    for i, shape in enumerate(s.plan_shapes):
        for variant, make in (
            ("fast", adapters.routing_plan),
            ("reference", lambda: adapters.ref_routing),
            ("official", lambda: adapters.official_routing),
        ):
            out.append(Case("ops", "routing_plan", variant, dict(shape), "fp32", ("fwd",),
                            _plan_build(ctx, shape, make),
                            lambda mode, sh=shape: flops.routing_plan_work(sh["N"], sh["T"], sh["M"], sh["B"], sh["k"]),
                            quick=i == 0))
    return out


# ------------------------------------------------------------------ builders


def _compiled(ctx: Context, fn):
    return torch.compile(fn, backend=ctx.compile_backend, mode=ctx.compile_mode)


def _reference_expert_mask():
    return adapters.expert_mask("reference")


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
            sets.append((_rand((B, L, D), ctx, dt), _rand((s.M, D, D), ctx, dt, scale=D**-0.5),
                         _rand((s.M, D), ctx, dt, scale=0.1), idx, g))
        return lambda mode: mode_runner(fn, sets, lambda inp: [inp[0], inp[1], inp[2], inp[4]], mode)

    return build


def _dense_linear_build(ctx: Context, s: Settings, shape: dict):
    def build():
        B, L, D = shape["B"], shape["L"], shape["D"]
        dt = s.op_dtype
        sets = [(_rand((B, L, D), ctx, dt), _rand((D, D), ctx, dt, scale=D**-0.5), _rand((D,), ctx, dt, scale=0.1))
                for _ in range(s.input_sets)]
        return lambda mode: mode_runner(F.linear, sets, lambda inp: list(inp), mode)

    return build


def _mask_ln_inputs(ctx, s, B, L, D):
    dt = s.op_dtype
    return (_rand((B, L, D), ctx, dt), _rand((B, L, D), ctx, dt, scale=0.5),
            _rand((B, D), ctx, dt, scale=0.1), _rand((B, D), ctx, dt, scale=0.1))


def _gated_inputs(ctx, s, B, L, D):
    dt = s.op_dtype
    return (_rand((B, L, D), ctx, dt), _rand((B, L, D), ctx, dt), _rand((B, L, D), ctx, dt),
            _rand((B, D), ctx, dt, scale=0.5), _rand((B, D), ctx, dt, scale=0.1), _rand((B, D), ctx, dt, scale=0.1))


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
        sets = [(torch.softmax(torch.randn(N, T, M, device=ctx.device), dim=-1),
                 torch.randint(0, T, (B,), device=ctx.device), k, shape["L"]) for _ in range(4)]
        nxt = rotate(sets)

        def run():
            with torch.no_grad():  # routing carries no gradient of its own
                return fn(*nxt())

        return lambda mode: run

    return build
