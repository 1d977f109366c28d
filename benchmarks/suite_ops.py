"""Op benchmarks: routed expert linear, mask+LN+modulate, gated residual+LN+modulate, routing plan,
DiffMoE's expert MLP.

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
  dense_mlp               (role "floor"; expert MLP) one dense DiT MLP (D -> 4D -> D, tanh GELU) over
                          the S pool tokens: at capacity 1 the E experts process E * C = S rows, the
                          same activated FLOPs (DiffMoE's "dense MLP of equal activated size")
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
# bench name -> the switch_dit.ops function it times
NORM_OPS = {
    "mask_ln_modulate": "mask_ln_modulate",
    "gated_residual_ln_modulate": "residual_ln_modulate",
}

# DiffMoE training (docs/design.md §1.6): E experts, each a DiT MLP of hidden MOE_MLP_RATIO * D, expert
# choice over the batch's pool of S = B * L tokens with capacity 1, i.e. C = S // E tokens per expert.
MOE_EXPERTS = 16
MOE_MLP_RATIO = 4
MOE_CAPACITY = 1


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

    # DiffMoE's expert MLP last, the newest rows: a budget that cuts the sweep cuts these first
    for shape in s.op_shapes if s.moe_shapes is None else s.moe_shapes:
        moe = moe_shape(shape)

        def moe_work(mode, sh=moe):
            return flops.expert_mlp_work(sh["S"], sh["D"], sh["H"], sh["E"], sh["C"], elem, mode)

        # max-autotune as the norm ops: not in make gpu's budget, nor in the smoke run
        moe_variants = [
            (v, role, _maker(ctx, "expert_mlp", v, strategy))
            for v, role, strategy in variants("expert_mlp", max_autotune=s.mode not in ("gpu", "smoke"))
        ]
        for variant, role, make in moe_variants + [("dense_mlp", "floor", None)]:
            build = _dense_mlp_build(ctx, s, moe) if make is None else _expert_mlp_build(ctx, s, moe, make)
            out.append(
                Case(
                    "ops",
                    "expert_mlp",
                    variant,
                    moe,
                    dtype,
                    MODES,
                    build,
                    moe_work,
                    quick=shape["D"] in s.op_quick_D,
                    compiled="+" in variant,
                    role=role,
                )
            )
    return out


def moe_shape(shape: dict) -> dict:
    """The expert-MLP shape of an op shape (B, L, D): the pool S = B * L, E experts of hidden H,
    C = S // E slots per expert (capacity 1). The keys S, D, H, E, C are switch_dit.perf_model's."""
    B, L, D = shape["B"], shape["L"], shape["D"]
    S = B * L
    C = MOE_CAPACITY * S // MOE_EXPERTS
    if C < 1:
        raise ValueError(f"expert_mlp: a pool of S = {S} tokens gives {MOE_EXPERTS} experts no token each")
    return {"B": B, "L": L, "D": D, "S": S, "E": MOE_EXPERTS, "H": MOE_MLP_RATIO * D, "C": C}


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


def _linear_init(gen: torch.Generator, shape, fan_in: int, ctx: Context, dtype) -> torch.Tensor:
    """nn.Linear's initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for a weight or a bias:
    activations and GELU inputs of the scale a freshly built model has."""
    bound = fan_in**-0.5
    t = (torch.rand(shape, generator=gen, device=ctx.device) * 2 - 1) * bound
    return t.to(dtype).requires_grad_(True)


def _expert_mlp_inputs(ctx: Context, s: Settings, sh: dict, seed: int) -> tuple:
    """(x, index, gating, w1, b1, w2, b2) of one DiffMoE training call, seeded: the router's
    softmax over the experts per token, then each expert takes its C best tokens of the pool
    (expert choice: a token may be chosen by several experts, or by none)."""
    S, D, H, E, C = (sh[k] for k in ("S", "D", "H", "E", "C"))
    dt = s.op_dtype
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    x = torch.randn((S, D), generator=gen, device=ctx.device).to(dt).requires_grad_(True)
    scores = torch.softmax(torch.randn((S, E), generator=gen, device=ctx.device), dim=-1).t()  # (E, S)
    gating, index = torch.topk(scores, C, dim=1)
    return (
        x,
        index,
        gating.to(dt).requires_grad_(True),  # the router's gradient flows through the scores
        _linear_init(gen, (E, H, D), D, ctx, dt),
        _linear_init(gen, (E, H), D, ctx, dt),
        _linear_init(gen, (E, D, H), H, ctx, dt),
        _linear_init(gen, (E, D), H, ctx, dt),
    )


def _expert_mlp_build(ctx: Context, s: Settings, sh: dict, make):
    def build():
        fn = make()
        sets = [_expert_mlp_inputs(ctx, s, sh, seed) for seed in range(s.input_sets)]
        # gradients as in training: the pool, the gate scores and every weight (not the indices)
        return lambda mode: mode_runner(fn, sets, lambda inp: [inp[0], *inp[2:]], mode)

    return build


def _dense_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def _dense_mlp_build(ctx: Context, s: Settings, sh: dict):
    """The floor of the expert MLP: one DiT MLP of the same widths over the S pool tokens."""

    def build():
        S, D, H = sh["S"], sh["D"], sh["H"]
        dt = s.op_dtype
        sets = []
        for seed in range(s.input_sets):
            gen = torch.Generator(device=ctx.device).manual_seed(seed)
            x = torch.randn((S, D), generator=gen, device=ctx.device).to(dt).requires_grad_(True)
            w1, b1 = _linear_init(gen, (H, D), D, ctx, dt), _linear_init(gen, (H,), D, ctx, dt)
            w2, b2 = _linear_init(gen, (D, H), H, ctx, dt), _linear_init(gen, (D,), H, ctx, dt)
            sets.append((x, w1, b1, w2, b2))
        return lambda mode: mode_runner(_dense_mlp, sets, lambda inp: list(inp), mode)

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
