"""Interop with the public reference implementation's checkpoints.

Our module names follow the reference's ``models/DiT/models.py``, so parameter keys are
the same. What differs are the fixed tables the reference stores as buffers and we
rebuild from the config: ``full_time`` (arange(T)), ``prior._unit_mapping`` (w_prior,
(T, N*M)) and DTR's ``routers.{i}._unit_mapping`` ((T, D), one copy per block).
Loading checks those tables against ours, so a checkpoint of another T, M, k or size
fails with a message that names the mismatch instead of loading silently.

Checkpoints saved through DDP or torch.compile carry ``module.`` / ``_orig_mod.``
prefixes; they are stripped.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .models import DiT

__all__ = ["load_official", "official_state_dict", "unwrap_checkpoint"]

_PREFIXES = ("module.", "_orig_mod.")


def unwrap_checkpoint(obj: Any, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """A reference training checkpoint ({"model": ..., "ema": ..., "opt": ...}) or a bare
    state dict -> the model state dict (the EMA twin with ``ema=True``)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint must be a state dict or a dict holding one, got {type(obj).__name__}")
    key = "ema" if ema else "model"
    if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
    elif ema:
        raise KeyError(f"checkpoint has no 'ema' entry (keys: {sorted(obj)[:8]})")
    out = {}
    for k, v in obj.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def _expect_table(sd: dict, key: str, want: torch.Tensor, what: str) -> None:
    got = sd.pop(key, None)
    if got is None:
        return
    if tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"checkpoint {key} has shape {tuple(got.shape)}, this model expects {tuple(want.shape)} ({what})")
    if not torch.equal(got.float().cpu(), want.float().cpu()):
        raise ValueError(f"checkpoint {key} differs from this model's {what}: a different alpha/beta or (M, k) setting")


def load_official(model: DiT, checkpoint: Any, *, ema: bool = False) -> DiT:
    """Load a reference-implementation state dict (or training checkpoint) into ``model``.

    Raises ValueError naming the keys or shapes that do not match (wrong family, size,
    patch, number of experts, classes or timesteps).
    """
    sd = unwrap_checkpoint(checkpoint, ema=ema)
    T = model.num_timesteps
    _expect_table(sd, "full_time", torch.arange(T), f"timestep table of T={T}")
    if model.routing == "switch":
        _expect_table(sd, "prior._unit_mapping", model.w_prior, f"prior table of T={T}, N={model.depth}, M={model.num_experts}, k={model.top_k}")
    for key in [k for k in sd if k.startswith("routers.") and k.endswith("._unit_mapping")]:
        if model.routing != "dtr":
            raise ValueError(f"checkpoint holds DTR masks ({key}) but the model has routing={model.routing!r}")
        _expect_table(sd, key, model.dtr_mask, f"DTR mask of T={T}, D={model.hidden_size}")
    # The reference keeps pos_embed as a frozen parameter, ours is a buffer: same key.
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"checkpoint does not fit {_describe(model)}:"]
        if wrong:
            lines.append("  shape mismatch: " + "; ".join(wrong[:6]) + (" ..." if len(wrong) > 6 else ""))
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:6]) + (" ..." if len(unexpected) > 6 else ""))
        raise ValueError("\n".join(lines))
    model.load_state_dict(sd, strict=True)
    return model


def official_state_dict(model: DiT) -> dict[str, torch.Tensor]:
    """Our model's weights in the reference implementation's layout (loadable by its DiT)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    device = model.pos_embed.device
    if model.routing == "switch":
        sd["full_time"] = torch.arange(model.num_timesteps, device=device)
        sd["prior._unit_mapping"] = model.w_prior.clone()
    elif model.routing == "dtr":
        for i in range(model.depth):
            sd[f"routers.{i}._unit_mapping"] = model.dtr_mask.clone()
    return sd


def _describe(model: DiT) -> str:
    fam = {"none": "DiT", "dtr": "DTR", "switch": "Switch-DiT"}[model.routing]
    extra = f", M={model.num_experts}, k={model.top_k}" if model.routing == "switch" else ""
    return f"{fam} (D={model.hidden_size}, depth={model.depth}, patch={model.patch_size}, classes={model.num_classes}{extra})"
