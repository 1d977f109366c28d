"""Block benchmarks: one Switch-DiT, DTR or DiT block, fast vs reference, eager and compiled.

A block is timed as a 1-block model (patch embedding, conditioning, one block, final
layer) through its public forward, so that the benchmark does not depend on how the fast
path organises its internals (conditioning once per step, fused ops). The embedders and
the final layer are under 2% of a block's FLOPs at B/2 and XL/2; the reference dense
DiT rows carry the same overhead, so the comparisons stay fair.
"""

from __future__ import annotations

from . import flops
from .modelkit import autocast, batches, build_model, config_for, maybe_compile
from .modes import mode_runner
from .runner import Case, Context
from .settings import FAMILIES, Settings, model_name

MODES = ("fwd", "bwd", "fwd+bwd")
VARIANTS = ("reference", "reference+compile", "fast", "fast+compile", "official")
# In quick mode: the rows behind the issue targets (fast Switch-DiT block vs the
# reference Switch-DiT and the reference dense DiT block).
QUICK = {"Switch-DiT": set(VARIANTS), "DiT": {"reference", "reference+compile"}, "DTR": set()}
NOTE = "1-block model: embedders, one block, final layer"


def cases(s: Settings, ctx: Context) -> list[Case]:
    out = []
    overrides = {**s.overrides, "depth": 1}
    elem = 2 if s.block_precision.startswith(("bf16", "fp16")) else 4
    for size in s.block_sizes:
        for family in FAMILIES:
            name = model_name(family, size)
            cfg = config_for(name, overrides)
            shape = {"model": name, "depth": 1, "B": s.block_batch, "L": cfg.tokens, "D": cfg.hidden}
            for variant in VARIANTS:
                if variant == "official" and family != "Switch-DiT":
                    continue
                if s.mode == "smoke" and variant == "fast+compile":
                    continue  # compiling around interpreted kernels costs a minute and checks nothing new
                out.append(
                    Case(
                        "block",
                        f"{family} block",
                        variant,
                        shape,
                        s.block_precision,
                        # the smoke run times the mode the targets read; the interpreter is slow
                        ("fwd+bwd",) if s.mode == "smoke" else MODES,
                        _build(ctx, s, name, overrides, variant),
                        lambda mode, cfg=cfg: flops.model_work(cfg, s.block_batch, elem, mode),
                        quick=size in s.block_quick_sizes and variant in QUICK[family],
                        compiled="+" in variant,
                        note=NOTE,
                        role="strategy" if variant.startswith("fast") else "baseline",
                    )
                )
    return out


def _build(ctx: Context, s: Settings, name: str, overrides: dict, variant: str):
    def build():
        model = build_model(name, overrides, variant, ctx.device)
        run_model = maybe_compile(model, variant, ctx.compile_backend, ctx.compile_mode)
        params = [p for p in model.parameters() if p.requires_grad]
        sets = batches(model, s.block_batch, s.input_sets, ctx.device)

        def forward(x, t, y):
            with autocast(ctx.device, s.block_precision):
                return run_model(x, t, y)

        return lambda mode: mode_runner(forward, sets, lambda inp: params, mode)

    return build
