"""Interop with the public reference implementation's checkpoints.

Our module names follow the reference's ``models/DiT/models.py``, so parameter keys are
the same. What differs are the fixed tables the reference stores as buffers and we
rebuild from the config: ``full_time`` (arange(T)), ``prior._unit_mapping`` (w_prior,
(T, N*M)) and DTR's ``routers.{i}._unit_mapping`` ((T, D), one copy per block).
Loading checks those tables against ours, so a checkpoint of another T, M, k or size
fails with a message that names the mismatch instead of loading silently.

Checkpoints saved through DDP or torch.compile carry ``module.`` / ``_orig_mod.``
prefixes; they are stripped.

Remix-DiT (docs/design.md §6): our module names and shapes are the published code's
(VainF/Remix-DiT ``remix_dit.py``: mixed weights (K, out, in), ``coefficients.weight``
(N, K)), and its ``prior`` is not in its state dict, so ``load_official`` and
``official_state_dict`` take and give its checkpoints as they are.
``init_remix_from_dit`` starts a Remix-DiT from a trained DiT (ours or the reference
code's) as the published ``load_dit_state_dict`` does.

DiffMoE (docs/design.md §6; KwaiVGI/DiffMoE ``models/models_DiffMoE.py``): the keys are the
published ones except the experts, which the public code keeps as a list of MLPs
(``blocks.{i}.mlp.experts.{j}.fc1.weight`` ...) and we stack per layer
(``blocks.{i}.mlp.fc1_weight`` (E, 4D, D) ...); the thresholds ``expert_threshold`` and
``ema_decay`` load with the weights.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .diffmoe import DiffMoE
from .models import DiT
from .remix_dit import RemixDiT

__all__ = [
    "load_official",
    "official_state_dict",
    "unwrap_checkpoint",
    "init_remix_from_dit",
    "init_remix_from_dit_file",
]

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
        raise ValueError(
            f"checkpoint {key} has shape {tuple(got.shape)}, this model expects {tuple(want.shape)} ({what})"
        )
    if not torch.equal(got.float().cpu(), want.float().cpu()):
        raise ValueError(f"checkpoint {key} differs from this model's {what}: a different alpha/beta or (M, k) setting")


def load_official(model: DiT | RemixDiT, checkpoint: Any, *, ema: bool = False) -> DiT | RemixDiT:
    """Load a reference-implementation state dict (or training checkpoint) into ``model``.

    Raises ValueError naming the keys or shapes that do not match (wrong family, size,
    patch, number of experts, classes or timesteps).
    """
    sd = unwrap_checkpoint(checkpoint, ema=ema)
    if isinstance(model, DiffMoE):
        sd = _diffmoe_from_official(model, sd)
        _check_fit(model.state_dict(), sd, f"checkpoint does not fit {_describe(model)}:")
        model.load_state_dict(sd, strict=True)
        return model
    T = model.num_timesteps
    _expect_table(sd, "full_time", torch.arange(T), f"timestep table of T={T}")
    if model.routing == "switch":
        _expect_table(
            sd,
            "prior._unit_mapping",
            model.w_prior,
            f"prior table of T={T}, N={model.depth}, M={model.num_experts}, k={model.top_k}",
        )
    for key in [k for k in sd if k.startswith("routers.") and k.endswith("._unit_mapping")]:
        if model.routing != "dtr":
            raise ValueError(f"checkpoint holds DTR masks ({key}) but the model has routing={model.routing!r}")
        _expect_table(sd, key, model.dtr_mask, f"DTR mask of T={T}, D={model.hidden_size}")
    # The reference keeps pos_embed as a frozen parameter, ours is a buffer: same key.
    _check_fit(model.state_dict(), sd, f"checkpoint does not fit {_describe(model)}:")
    model.load_state_dict(sd, strict=True)
    return model


def _check_fit(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], header: str) -> None:
    """Raise ValueError (``header``, then the first few mismatched, missing and unexpected keys)
    unless ``sd`` has exactly the keys and shapes of ``own``."""

    def head(items, sep=", "):
        return sep.join(items[:6]) + (" ..." if len(items) > 6 else "")

    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        lines = [header]
        if wrong:
            lines.append("  shape mismatch: " + head(wrong, "; "))
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + head(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + head(unexpected))
        raise ValueError("\n".join(lines))


def official_state_dict(model: DiT | RemixDiT) -> dict[str, torch.Tensor]:
    """Our model's weights in the reference implementation's layout (loadable by its DiT).

    The objective must be the public code's (ValueError otherwise): rectified flow for DiffMoE,
    Gaussian diffusion on integer timesteps for DiT, DTR, Switch-DiT and Remix-DiT; the public code
    would read weights trained for the other objective as its own."""
    if isinstance(model, DiffMoE):
        if model.objective != "flow":
            raise ValueError(
                f"{_describe(model)} was built with objective {model.objective!r}: the public DiffMoE code "
                "trains rectified flow, so its layout cannot carry the model; keep our checkpoint"
            )
        return _diffmoe_to_official(model, {k: v.detach().clone() for k, v in model.state_dict().items()})
    if getattr(model, "objective", "diffusion") == "flow":
        raise ValueError(
            f"{_describe(model)} was built with objective 'flow': the reference code of this family "
            "is diffusion-only (integer timesteps), so its layout cannot carry the model; keep our checkpoint"
        )
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    device = model.pos_embed.device
    if model.routing == "switch":
        sd["full_time"] = torch.arange(model.num_timesteps, device=device)
        sd["prior._unit_mapping"] = model.w_prior.clone()
    elif model.routing == "dtr":
        for i in range(model.depth):
            sd[f"routers.{i}._unit_mapping"] = model.dtr_mask.clone()
    return sd


def _describe(model: DiT | RemixDiT | DiffMoE) -> str:
    if isinstance(model, DiffMoE):
        return (
            f"DiffMoE (D={model.hidden_size}, depth={model.depth}, patch={model.patch_size}, "
            f"classes={model.num_classes}, E={model.num_experts}, interleave={model.interleave})"
        )
    if isinstance(model, RemixDiT):
        return (
            f"Remix-DiT (D={model.hidden_size}, depth={model.depth}, patch={model.patch_size}, "
            f"classes={model.num_classes}, K={model.num_basis}, N={model.num_experts})"
        )
    fam = {"none": "DiT", "dtr": "DTR", "switch": "Switch-DiT"}[model.routing]
    extra = f", M={model.num_experts}, k={model.top_k}" if model.routing == "switch" else ""
    return (
        f"{fam} (D={model.hidden_size}, depth={model.depth}, patch={model.patch_size}, "
        f"classes={model.num_classes}{extra})"
    )


# DiffMoE: per-expert MLP keys (public) <-> stacked expert weights (ours).
_EXPERT_PARAMS = {
    "fc1_weight": "fc1.weight",
    "fc1_bias": "fc1.bias",
    "fc2_weight": "fc2.weight",
    "fc2_bias": "fc2.bias",
}


def _diffmoe_to_official(model: DiffMoE, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for i in model.moe_blocks:
        p = f"blocks.{i}.mlp."
        for ours, theirs in _EXPERT_PARAMS.items():
            for j, w in enumerate(sd.pop(p + ours).unbind(0)):
                sd[f"{p}experts.{j}.{theirs}"] = w.clone()
    return sd


def _diffmoe_from_official(model: DiffMoE, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    for i in model.moe_blocks:
        p = f"blocks.{i}.mlp."
        experts = {int(k[len(p + "experts.") :].split(".")[0]) for k in sd if k.startswith(p + "experts.")}
        if not experts:
            continue  # left to _check_fit: the missing stacked keys name the block
        if experts != set(range(model.num_experts)):
            raise ValueError(
                f"checkpoint block {i} has experts {sorted(experts)[:4]}... ({len(experts)} in all), "
                f"this model has E = {model.num_experts} (num_experts)"
            )
        for ours, theirs in _EXPERT_PARAMS.items():
            keys = [f"{p}experts.{j}.{theirs}" for j in range(model.num_experts)]
            missing = [k for k in keys if k not in sd]
            if missing:
                raise ValueError(f"checkpoint lacks {missing[0]} (and {len(missing) - 1} more) of block {i}'s experts")
            sd[p + ours] = torch.stack([sd.pop(k) for k in keys])
    return sd


# Remix-DiT: the layers a DiT's weights are repeated into (published ``load_dit_state_dict``).
_MIXED = ("attn.qkv.", "attn.proj.", "mlp.fc1.", "mlp.fc2.")


def init_remix_from_dit(model: RemixDiT, checkpoint: Any, *, ema: bool | None = None) -> RemixDiT:
    """Initialise a Remix-DiT from a trained DiT (ours, or the reference code's
    ``models.py``; a state dict or a training checkpoint), in place.

    As the published ``load_dit_state_dict``: every mixed layer's weight and bias are
    repeated K times (so every expert starts as the DiT), everything else loads as it
    is, and the coefficient table keeps the model's prior initialisation. ema: take the
    checkpoint's EMA weights (None: the EMA when the checkpoint has one, as the
    published training does). Raises ValueError naming what does not fit. A state dict does not
    say which objective it was trained with: ``init_remix_from_dit_file``, which loads the
    checkpoint's model, refuses a DiT of another objective; here the caller vouches for it.
    """
    if not isinstance(model, RemixDiT):
        raise TypeError(f"init_remix_from_dit needs a RemixDiT, got {type(model).__name__}")
    if ema is None:
        ema = isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("ema"), Mapping)
    sd = unwrap_checkpoint(checkpoint, ema=ema)
    routed = sorted(k for k in sd if k.startswith(("routers.", "prior.")))
    if routed:
        raise ValueError(
            f"init_remix_from_dit needs a plain DiT checkpoint; this one has routing tables "
            f"({', '.join(routed[:3])}{' ...' if len(routed) > 3 else ''}): a Switch-DiT or DTR"
        )
    sd.pop("full_time", None)
    K = model.num_basis
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks.") and any(m in k for m in _MIXED) and k.endswith((".weight", ".bias")):
            v = v.unsqueeze(0).repeat(K, *([1] * v.dim()))
        out[k] = v
    if "coefficients.weight" in out:
        raise ValueError("checkpoint already holds coefficients.weight: it is a Remix-DiT, load it with load_official")
    out["coefficients.weight"] = model.coefficients.weight.detach().clone()
    _check_fit(
        model.state_dict(),
        out,
        f"DiT checkpoint does not fit {_describe(model)} (after repeating the mixed layers K={K} times):",
    )
    model.load_state_dict(out, strict=True)
    return model


def init_remix_from_dit_file(model: RemixDiT, path) -> RemixDiT:
    """``init_remix_from_dit`` from a file or run folder: our training checkpoints or the
    reference code's (``switch_dit.checkpoint.load_model`` reads both), its EMA weights when
    it has them, else its trained weights (as the published training script). The
    checkpoint must hold a plain DiT (not Switch-DiT, DTR or Remix-DiT)."""
    from .checkpoint import load_model  # late: checkpoint builds on this module

    try:
        dit, _ = load_model(path, ema=True, backend="reference", num_heads=model.num_heads)
    except ValueError as e:
        if "has no 'ema' weights" not in str(e):
            raise
        dit, _ = load_model(path, ema=False, backend="reference", num_heads=model.num_heads)
    if not isinstance(dit, DiT) or dit.routing != "none":
        family = {"dtr": "DTR", "switch": "Switch-DiT"}.get(getattr(dit, "routing", None), type(dit).__name__)
        raise ValueError(f"{str(path)!r} holds a {family} model: a Remix-DiT is initialised from a plain DiT")
    if dit.objective != model.objective:  # a flow DiT's embedder has seen flow times, not steps
        raise ValueError(
            f"{str(path)!r} holds a DiT trained with objective {dit.objective!r}; this Remix-DiT has "
            f"objective {model.objective!r}: initialise it from a DiT of the same objective"
        )
    return init_remix_from_dit(model, dit.state_dict())
