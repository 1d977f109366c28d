"""Training-step benchmarks: forward, loss with the prior, backward, AdamW, EMA.

One step as the official training script runs it, at the paper's per-GPU batch (32):
autocast (bf16, or fp16 with a GradScaler as the official code trains), the hybrid
diffusion loss plus the diffusion prior loss, backward, AdamW (lr 1e-4, no weight
decay; the fused implementation on CUDA), EMA update (decay 0.9999, one foreach lerp).
Figures: step time (CUDA events around each step, back to back), images/s, model FLOP
utilisation (the analytic model FLOPs of ``flops.train_step_flops`` over the dtype's datasheet
peak and over the peak measured in the same run), peak memory, host syncs per step.
"""

from __future__ import annotations

import time

import torch

from . import flops
from .modelkit import autocast, batches, build_model, config_for, maybe_compile
from .runner import Case, Context
from .settings import Settings, model_name
from .timing import quantiles_ms, rotate

EMA_DECAY = 0.9999

# (family, variant, precisions it runs in, precisions in which it is in the quick set)
BOTH = ("bf16-autocast", "fp16-autocast+scaler")
# (family, variant, precisions it runs in, precisions in which it is in the quick set), in the
# order they run: the rows deciding the targets first, so a time limit cuts the others.
PLAN = (
    ("Switch-DiT", "fast", BOTH, ("bf16-autocast",)),
    ("Switch-DiT", "reference", BOTH, ("bf16-autocast",)),
    ("Switch-DiT", "reference+compile", BOTH, ("bf16-autocast",)),
    # a model built by the reference code, after switch_dit.accelerate
    ("Switch-DiT", "patched", ("bf16-autocast",), ("bf16-autocast",)),
    ("Switch-DiT", "fast+compile", BOTH, ("bf16-autocast",)),
    # what users of the official code run: its SMoE algorithm, whole-model compile; the official
    # script trains in fp16 with a scaler, bf16 is measured too (benchmarks/README.md, Definitions)
    ("Switch-DiT", "official+compile", BOTH, ()),
    ("Switch-DiT", "official", BOTH, ()),
    ("Switch-DiT", "reference+max-autotune", ("bf16-autocast",), ()),
    ("Switch-DiT", "official+max-autotune", ("bf16-autocast",), ()),
    ("DiT", "reference", ("bf16-autocast",), ()),
    ("DiT", "reference+compile", ("bf16-autocast",), ()),
)


def cases(s: Settings, ctx: Context) -> list[Case]:
    out = []
    for size in s.step_sizes:
        for family, variant, precisions, quick_precisions in PLAN:
            name = model_name(family, size)
            cfg = config_for(name, s.overrides)
            for precision in precisions:
                if precision not in s.step_precisions:
                    continue
                if s.mode == "smoke" and (variant == "fast+compile" or variant.endswith("max-autotune")):
                    continue  # the block suite already compiles the fast path; the interpreter is slow
                shape = {"model": name, "depth": cfg.depth, "B": s.step_batch, "L": cfg.tokens, "D": cfg.hidden}
                out.append(
                    Case(
                        "step",
                        "train_step",
                        variant,
                        shape,
                        precision,
                        ("step",),
                        _build(ctx, s, name, variant, precision),
                        lambda mode, cfg=cfg: flops.step_work(cfg, s.step_batch),
                        # the smoke run also checks the fp16 + scaler path, with the reference model
                        quick=size in s.step_quick_sizes
                        and (precision in quick_precisions or (s.mode == "smoke" and variant == "reference")),
                        heavy=cfg.depth * cfg.hidden >= 12 * 768 or "+" in variant,
                        compiled="+" in variant,
                        role="strategy" if variant.startswith("fast") else "baseline",
                        measure=_measure(s, cfg),
                    )
                )
    return out


def _build(ctx: Context, s: Settings, name: str, variant: str, precision: str):
    def build():
        from switch_dit.diffusion import create_diffusion

        model = build_model(name, s.overrides, variant, ctx.device)
        train_model = maybe_compile(model, variant, ctx.compile_backend, ctx.compile_mode)
        diffusion = create_diffusion()  # T = 1000, learned sigma, lambda_dp = 1
        params = [p for p in model.parameters() if p.requires_grad]
        # The fused AdamW on CUDA for every row, ours and the baselines' (what the trainer uses):
        # for Remix-DiT's 2.0B parameters the optimizer is a large part of the step.
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=ctx.device.type == "cuda" or None)
        ema = [p.detach().clone() for p in params]
        scaler = torch.amp.GradScaler(ctx.device.type) if precision.startswith("fp16") else None
        nxt = rotate(batches(model, s.step_batch, s.input_sets, ctx.device))

        def step():
            x0, t, y = nxt()
            with autocast(ctx.device, precision):
                loss = diffusion.training_losses(train_model, x0, t, y)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1.0 - EMA_DECAY)

        step.scaler = scaler  # measure() warms fp16 up until the loss scale settles
        return lambda mode: step

    return build


def _measure(s: Settings, cfg):
    def measure(ctx: Context, step, case: Case, mode: str) -> dict:
        timer = ctx.timer
        t0 = time.perf_counter()
        step()  # compilation happens here
        timer.sync()
        first_s = time.perf_counter() - t0
        for _ in range(max(0, s.step_warmup - 1)):
            step()
        timer.sync()
        scaler, extra = getattr(step, "scaler", None), {}
        if scaler is not None:
            # GradScaler starts at 2^16 and halves on every overflow, skipping that step's
            # AdamW update: timed steps must be real ones.
            scales = [scaler.get_scale()]
            while len(scales) < 40 and (len(scales) < 4 or len(set(scales[-3:])) > 1):
                step()
                scales.append(scaler.get_scale())
            extra["loss_scale_before"] = scales[-1]
        times = timer.step_times(step, s.step_iters)
        ms = quantiles_ms(times)
        reruns = [quantiles_ms(timer.step_times(step, s.step_iters))["median"] for _ in range(ctx.repeats - 1)]
        wall = timer.wall(step, max(2, s.step_iters // 2))
        peak, before = timer.memory_mib(step)
        syncs = timer.host_syncs(step, calls=2)
        extra.update(mem_before_call_mib=before, event_waits=timer.event_waits(step, calls=2))
        if scaler is not None:
            extra["loss_scale_after"] = scaler.get_scale()
        precision = case.dtype.split("-")[0]
        step_flops = flops.train_step_flops(cfg, s.step_batch)
        secs = ms["median"] / 1e3
        return {
            "ms": ms,
            "reruns_ms": reruns,
            "wall_ms": wall,
            "peak_mem_mib": peak,
            "host_syncs": syncs,
            "extra": {
                **extra,
                "first_step_s": round(first_s, 3),
                "images_per_s": s.step_batch / secs,
                # Model FLOPs over the peak, two ways (benchmarks/README.md, Definitions).
                "mfu_measured_peak": step_flops / secs / ctx.peaks["flops"][precision],
                "mfu_datasheet": step_flops / secs / ctx.datasheet["flops"][precision] if ctx.datasheet else None,
                "model_gflops_per_image_fwd": flops.model_flops(cfg) / 1e9,
                "step_tflop": step_flops / 1e12,
            },
        }

    return measure
