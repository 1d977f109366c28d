"""Model set-up shared by the block and training-step benchmarks.

Variants of a model, by name:
  reference  switch_dit.models with backend="reference", eager
  fast       backend="triton" (the fused path)
  official   Switch-DiT whose SMoE layers run the public implementation's algorithm
  patched    a model shaped like the reference code (benchmarks/reference_code.py) after
             switch_dit.accelerate: what a user of the reference training script runs
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
_CFG_FIELDS = {
    "hidden_size": "hidden",
    "num_heads": "heads",
    "depth": "depth",
    "input_size": "input_size",
    "in_channels": "in_channels",
    "num_experts": "num_experts",
    "top_k": "top_k",
}


def config_for(name: str, overrides: dict) -> ModelConfig:
    return ModelConfig.from_name(name, **{_CFG_FIELDS[k]: v for k, v in overrides.items() if k in _CFG_FIELDS})


# variant suffix -> torch.compile mode (None: the run's --compile-mode, default "default")
COMPILE_SUFFIXES = {"compile": None, "max-autotune": "max-autotune-no-cudagraphs"}


def parse_variant(variant: str) -> tuple[str, bool]:
    """'fast+compile' -> ('fast', True); 'reference+max-autotune' -> ('reference', True)."""
    base, _, suffix = variant.partition("+")
    return base, suffix in COMPILE_SUFFIXES


def compile_mode(variant: str, default: str | None) -> str | None:
    """The torch.compile mode of a variant: "+max-autotune" is max-autotune-no-cudagraphs (CUDA
    graphs would overwrite the outputs that the bwd timings replay), "+compile" the run's default."""
    _, _, suffix = variant.partition("+")
    return COMPILE_SUFFIXES.get(suffix) or default


def build_model(name: str, overrides: dict, variant: str, device: torch.device):
    """A model in train mode on ``device`` for a variant name; raises Unavailable for fast
    variants before the fused ops exist and for official variants of non-Switch models."""
    from switch_dit import models

    base, _ = parse_variant(variant)
    if base in ("official", "patched") and not name.startswith("Switch-DiT"):
        raise adapters.Unavailable(f"the {base} variant applies to Switch-DiT only")
    if base == "patched":
        return _patched_reference_model(name, overrides, device)
    backend = "triton" if base == "fast" else "reference"
    with torch.device(device):
        model = models.create(name, backend=backend, **overrides)
    model.to(device).train()
    randomize_zero_parameters(model)
    if base == "official":
        use_official_routers(model)
    return model


class ReferenceAdapter(torch.nn.Module):
    """A reference-code model behind our model contract: ``forward`` returns the output and
    keeps the training-mode aux loss (w_JSD * L_dp) for ``prior_loss``, which the diffusion
    loss calls next (lambda_dp = 1 adds it as the reference's train.py does)."""

    def __init__(self, model, num_classes: int, num_timesteps: int):
        super().__init__()
        self.model = model
        self.in_channels = model.in_channels
        self.input_size = model.x_embedder.patch_size[0] * int(model.x_embedder.num_patches**0.5)
        self.num_classes, self.num_timesteps = num_classes, num_timesteps
        self._aux = None

    def forward(self, x, t, y):
        out = self.model(x, t, y)
        if isinstance(out, tuple):
            out, self._aux = out
        return out

    def prior_loss(self, t):
        aux, self._aux = self._aux, None
        if aux is None:
            raise RuntimeError("prior_loss(t) needs a training-mode forward first")
        return aux


def _patched_reference_model(name: str, overrides: dict, device: torch.device):
    import switch_dit

    from .reference_code import RefDiT

    cfg = config_for(name, overrides)
    num_classes = overrides.get("num_classes", 1000)
    with torch.device(device):
        model = RefDiT(
            "DMoE",
            input_size=cfg.input_size,
            patch_size=cfg.patch,
            in_channels=cfg.in_channels,
            hidden_size=cfg.hidden,
            depth=cfg.depth,
            num_heads=cfg.heads,
            num_classes=num_classes,
            taskcount=1000,
            num_experts=cfg.num_experts,
            k=cfg.top_k,
        )
    model.to(device).train()
    randomize_zero_parameters(model)
    switch_dit.accelerate(model)  # backend "auto": the fused path on CUDA
    return ReferenceAdapter(model, num_classes, 1000)


def randomize_zero_parameters(model: torch.nn.Module, std: float = 0.02) -> None:
    """adaLN-Zero, the experts and the final layer start at zero; timing on zeros is not
    representative (docs/design.md §5), so give every all-zero parameter small random values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.normal_(0.0, std)


def maybe_compile(model, variant: str, backend: str, mode: str | None):
    _, compiled = parse_variant(variant)
    if not compiled:
        return model
    # Only inductor has modes (aot_eager, the smoke run's backend, would warn and ignore it).
    return torch.compile(model, backend=backend, mode=compile_mode(variant, mode) if backend == "inductor" else None)


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
