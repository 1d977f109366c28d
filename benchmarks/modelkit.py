"""Model set-up shared by the block and training-step benchmarks.

Variants of a model, by name:
  reference  switch_dit.models with backend="reference", eager
  fast       backend="triton" (the fused path), skipped until the fused ops exist
  official   Switch-DiT whose SMoE layers run the public implementation's algorithm
  +compile   any of them under torch.compile (the whole model, as the official
             training script does)
"""

from __future__ import annotations

import contextlib

import torch

from . import adapters
from .flops import ModelConfig
from .official import use_official_routers

# create() keyword -> ModelConfig field, for configs of overridden (tiny) models
_CFG_FIELDS = {"hidden_size": "hidden", "num_heads": "heads", "depth": "depth", "input_size": "input_size",
               "in_channels": "in_channels", "num_experts": "num_experts", "top_k": "top_k"}


def config_for(name: str, overrides: dict) -> ModelConfig:
    return ModelConfig.from_name(name, **{_CFG_FIELDS[k]: v for k, v in overrides.items() if k in _CFG_FIELDS})


def parse_variant(variant: str) -> tuple[str, bool]:
    """'fast+compile' -> ('fast', True)."""
    base, _, suffix = variant.partition("+")
    return base, suffix == "compile"


def build_model(name: str, overrides: dict, variant: str, device: torch.device):
    """A model in train mode on ``device`` for a variant name; raises Unavailable for fast
    variants before the fused ops exist and for official variants of non-Switch models."""
    from switch_dit import models

    base, _ = parse_variant(variant)
    if base == "fast":
        adapters.fast_model_path()
    if base == "official" and not name.startswith("Switch-DiT"):
        raise adapters.Unavailable("the official SMoE algorithm applies to Switch-DiT only")
    backend = "triton" if base == "fast" else "reference"
    with torch.device(device):
        model = models.create(name, backend=backend, **overrides)
    model.to(device).train()
    randomize_zero_parameters(model)
    if base == "official":
        use_official_routers(model)
    return model


def randomize_zero_parameters(model: torch.nn.Module, std: float = 0.02) -> None:
    """adaLN-Zero, the experts and the final layer start at zero; timing on zeros is not
    representative (DESIGN.md §4), so give every all-zero parameter small random values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.normal_(0.0, std)


def maybe_compile(model, variant: str, backend: str, mode: str | None):
    _, compiled = parse_variant(variant)
    return torch.compile(model, backend=backend, mode=mode) if compiled else model


def autocast(device: torch.device, precision: str):
    """'bf16-autocast' / 'fp16-autocast+scaler' / 'fp32' -> a context manager."""
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("fp16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def batches(model, batch: int, count: int, device: torch.device) -> list[tuple]:
    """Random latents (never zeros), timesteps and labels: (x, t, y) per set."""
    out = []
    for _ in range(count):
        x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=device)
        t = torch.randint(0, model.num_timesteps, (batch,), device=device)
        y = torch.randint(0, model.num_classes, (batch,), device=device)
        out.append((x, t, y))
    return out
