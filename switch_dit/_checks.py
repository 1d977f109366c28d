"""Argument checks shared by models and ops: clear errors instead of wrong answers.

Checking the *values* of a device tensor (is every timestep < T?) copies a flag to the
host, a sync per call. CPU tensors are always checked; CUDA tensors only when
``SWITCH_DIT_CHECK_VALUES=1`` is set in the environment or ``set_value_checks(True)``
was called (the default keeps the training step free of host syncs).
"""

from __future__ import annotations

import os

import torch

_value_checks_on_device = os.environ.get("SWITCH_DIT_CHECK_VALUES", "0") not in ("", "0")


def set_value_checks(enabled: bool) -> None:
    """Check index/timestep values of CUDA tensors too (costs a host sync per check)."""
    global _value_checks_on_device
    _value_checks_on_device = bool(enabled)


def _should_check_values(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return x.device.type == "cpu" or _value_checks_on_device


def check_index(x: torch.Tensor, upper: int, name: str, batch: int | None = None) -> None:
    """x must be a 1-D integer tensor (of length ``batch`` if given) with values in [0, upper)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.dim() != 1 or (batch is not None and x.shape[0] != batch):
        want = f"({batch},)" if batch is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if _should_check_values(x) and x.numel() and (int(x.min()) < 0 or int(x.max()) >= upper):
        raise ValueError(f"{name} values must be in [0, {upper}), got range [{int(x.min())}, {int(x.max())}]")


def check_expert_index_values(idx: torch.Tensor, num_experts: int, name: str = "topk_idx") -> None:
    """Every expert index in [0, num_experts) (M = weight.shape[0]); where values are checked (see above)."""
    if idx.numel() and _should_check_values(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"{name} values must be in [0, {num_experts}) (M = weight.shape[0]), got range [{lo}, {hi}]"
            )


def check_timesteps(t: torch.Tensor, num_timesteps: int, batch: int | None = None) -> None:
    check_index(t, num_timesteps, "t (timesteps)", batch)


def check_labels(y: torch.Tensor, num_rows: int, batch: int | None = None) -> None:
    check_index(y, num_rows, "y (class labels)", batch)


def check_sample_args(model, y: torch.Tensor, cfg_scale: float, shape) -> tuple[tuple[int, ...], torch.dtype]:
    """The samplers' common checks (``diffusion.sample``, ``flow.sample``): y (B,) int64/int32
    labels and a numeric cfg_scale. Returns the noise's shape (B, C, H, W), from the per-sample
    ``shape`` (C, H, W) or else the model's in_channels and input_size, and the model's dtype
    (float32 for a model without parameters)."""
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype not in (torch.int64, torch.int32):
        raise ValueError("y must be an int64 tensor of labels with shape (B,)")
    if not isinstance(cfg_scale, (int, float)) or isinstance(cfg_scale, bool):
        raise ValueError(f"cfg_scale must be a number, got {cfg_scale!r}")
    if shape is None:
        try:
            shape = (model.in_channels, model.input_size, model.input_size)
        except AttributeError:
            raise ValueError("shape is required when the model has no in_channels/input_size") from None
    try:
        dtype = next(model.parameters()).dtype
    except (AttributeError, StopIteration):
        dtype = torch.float32
    return (y.shape[0], *shape), dtype
