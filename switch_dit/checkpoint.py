"""Checkpoints and run folders: atomic writes, which file a path means, RNG states, model loading.

    find_checkpoint(path)              a file, or a run folder's final / newest checkpoint (sampling, figures)
    resume_checkpoint(resume, out)     what ``train --resume`` continues from (unreadable files skipped)
    run_folder(ckpt), check_run_folder where a run writes, and never over another run's checkpoints
    load_model(path)                   a model in eval mode from our checkpoints or the reference layout

A checkpoint is one ``torch.save`` dict (format 2):

    format, step, config, model_kwargs       what the run is
    model, ema                               whole (unsharded) state dicts, no wrapper prefixes
    opt                                      AdamW state as a single-process run holds it
    scaler                                   GradScaler state (fp16), else None
    rng                                      {"ranks": [per-rank states], "shared": {...}}
    data                                     the sampler's position (ShardedBatchSampler)
    train_state                              counters and the open logging window
    world_size, parallel                     how it was written

Because every tensor is whole and unprefixed, a checkpoint written by N ranks (DDP or
FSDP2) resumes on any number of processes, and ``switch_dit.interop.load_official``
reads its "model"/"ema" as it reads the reference implementation's checkpoints.
``export_reference`` writes the reference training script's own layout.

Files are written to ``<name>.tmp``, flushed, fsynced and renamed: a crash leaves either
the old set of checkpoints or the new one, never a truncated file under a final name.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from .diffmoe import SIZES as DIFFMOE_SIZES
from .models import SIZES, DiT, create

__all__ = [
    "FORMAT",
    "atomic_save",
    "checkpoint_path",
    "list_checkpoints",
    "load_checkpoint",
    "latest_checkpoint",
    "read_config",
    "prune_checkpoints",
    "default_run_dir",
    "run_folder",
    "find_checkpoint",
    "resume_checkpoint",
    "check_run_folder",
    "capture_rng",
    "restore_rng",
    "build_model",
    "model_from_checkpoint",
    "infer_model_kwargs",
    "load_model",
    "export_reference",
]

FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1: the first digits demo (no RNG, optimizer only)
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


def atomic_save(obj, path) -> Path:
    """torch.save to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename itself must reach the disk too, or a power cut can undo it.
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return path
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
    return path


def checkpoint_path(folder, step: int) -> Path:
    """<folder>/ckpt-<step, 8 digits>.pt"""
    return Path(folder) / f"ckpt-{step:08d}.pt"


def list_checkpoints(folder) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint files in ``folder``, newest first (temporary files ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Read a switch-dit training checkpoint (clear errors for anything else).

    mmap: map the file instead of reading it (tensors are read when used): cheap for
    checking a big checkpoint or taking its config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"checkpoint {str(path)!r} could not be read (truncated or corrupt?): {e}") from e
    missing = [k for k in ("format", "model_kwargs", "model", "ema") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{str(path)!r} is not a switch-dit training checkpoint (missing {', '.join(missing)})")
    if ckpt["format"] not in READABLE_FORMATS:
        raise ValueError(
            f"checkpoint {str(path)!r} has format {ckpt['format']}, this version reads "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    return ckpt


def latest_checkpoint(folder, log=None) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``folder`` that reads back whole, or None.

    A file that does not load (a copy cut short outside our atomic writes, a full disk)
    is reported through ``log`` and skipped, so a resume falls back to the one before.
    """
    for _, path in list_checkpoints(folder):
        try:
            ckpt = load_checkpoint(path, mmap=True)
        except ValueError as e:
            if log is not None:
                log(f"skipping unreadable checkpoint {path}: {e}")
            continue
        if ckpt["format"] != FORMAT:
            if log is not None:
                log(f"skipping {path}: format {ckpt['format']} cannot resume training")
            continue
        return path, ckpt
    return None


def read_config(path) -> dict:
    """The config stored in a checkpoint, without reading its tensors."""
    ckpt = load_checkpoint(path, mmap=True)
    if not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"checkpoint {str(path)!r} holds no config")
    return ckpt["config"]


def prune_checkpoints(folder, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints of ``folder``; returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    deleted = []
    for _, path in list_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)
        deleted.append(path)
    return deleted


# -----------------------------------------------------------------------------
# Run folders: which checkpoint a path means, and where a run writes
# -----------------------------------------------------------------------------
#
# A run folder holds config.json, log.*, checkpoints/ckpt-<step>.pt and, once finished,
# checkpoint.pt. Every command that takes "a checkpoint or a run folder" resolves it here.


def default_run_dir(data: str = "digits", root: str = "runs") -> Path:
    """runs/<data name>-<timestamp>, made unique when two runs start in the same second."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = "digits" if data == "digits" else (Path(data).name or "latents")
    path = Path(root) / f"{name}-{stamp}"
    n = 1
    while path.exists():
        path = Path(root) / f"{name}-{stamp}-{n}"
        n += 1
    return path


def run_folder(checkpoint) -> Path:
    """The run folder a checkpoint file belongs to: <run>/checkpoints/ckpt-*.pt and
    <run>/checkpoint.pt both give <run>; a file anywhere else gives its own folder."""
    path = Path(checkpoint)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def find_checkpoint(path) -> Path:
    """The checkpoint to sample from or draw: ``path`` itself if it is a file; for a run folder
    its ``checkpoint.pt`` (a finished run), else the newest ``ckpt-<step>.pt`` in it or in its
    ``checkpoints/`` (a run in progress). Raises FileNotFoundError naming what was looked for."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "checkpoint.pt").is_file():
            return path / "checkpoint.pt"
        for folder in (path, path / "checkpoints"):
            found = list_checkpoints(folder)
            if found:
                return found[0][1]
        raise FileNotFoundError(
            f"run folder {str(path)!r} holds no checkpoint.pt or ckpt-<step>.pt (in it or in its checkpoints/)"
        )
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


def resume_checkpoint(resume, out=None, log=None) -> Path | None:
    """The checkpoint ``--resume`` means: a file; the newest complete one of a run folder (or
    of its checkpoints/), unreadable files skipped; "auto": the newest of the run folder
    ``out``, None when it has none yet (a fresh start). None for None."""
    if resume is None:
        return None
    if resume == "auto":
        if not out:
            raise ValueError("--resume without a PATH needs --out (the run folder to continue)")
        found = latest_checkpoint(Path(out) / "checkpoints", log)
        return found[0] if found else None
    path = Path(resume)
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = latest_checkpoint(folder, log)
        if found is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {str(folder)!r}")
        return found[0]
    raise FileNotFoundError(f"--resume: {str(path)!r} does not exist")


def check_run_folder(out, resumed_from=None) -> None:
    """Refuse a run folder whose checkpoints belong to another run: a fresh run needs a folder
    without checkpoints, a resumed one its own folder (``run_folder(resumed_from)``) or one
    without checkpoints. The trainer writes ckpt-<step>.pt and checkpoint.pt by step number,
    so a folder holding another run's files would have them overwritten."""
    out = Path(out).resolve()
    if resumed_from is not None and run_folder(resumed_from).resolve() == out:
        return
    theirs = [p.name for _, p in list_checkpoints(out / "checkpoints")]
    if (out / "checkpoint.pt").is_file():
        theirs.append("checkpoint.pt")
    if theirs:
        what = "resume it with --resume" if resumed_from is None else "resume into its own folder"
        raise ValueError(
            f"--out {str(out)!r} holds checkpoints of another run ({', '.join(theirs[:3])}); "
            f"choose an empty folder, or {what}"
        )


# -----------------------------------------------------------------------------
# Random number generators
# -----------------------------------------------------------------------------


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """This process's RNG states: torch (CPU and current CUDA device), Python, NumPy, and named generators.

    Plain types and tensors only, so that ``torch.load(weights_only=True)`` reads them.
    """
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of ``capture_rng``; every named generator must be in the state."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    for key, gen in (generators or {}).items():
        if key not in state["generators"]:
            raise ValueError(f"checkpoint has no state for the {key!r} generator")
        gen.set_state(state["generators"][key])


# -----------------------------------------------------------------------------
# Models out of checkpoints
# -----------------------------------------------------------------------------


def build_model(model_kwargs: dict, backend: str = "auto"):
    """``models.create`` of the arguments a checkpoint stores (``{"name", ...}``), in train mode."""
    kw = dict(model_kwargs)
    return create(kw.pop("name"), backend=backend, **kw)


def model_from_checkpoint(ckpt: dict, use_ema: bool = True, device="cpu", backend: str = "auto"):
    """Rebuild the model of one of our checkpoints (a loaded dict) in eval mode, with its EMA
    weights by default."""
    which = "ema" if use_ema else "model"
    if ckpt.get(which) is None:
        raise ValueError(f"the checkpoint has no {which!r} weights")
    model = build_model(ckpt["model_kwargs"], backend)
    model.load_state_dict(ckpt[which])
    return model.to(device).eval()


class _Opaque:
    """Loaded in place of an object whose class torch's weights-only loader does not allow,
    such as the Hydra/OmegaConf config that the reference training script stores under
    "config": its data is dropped and none of its code runs."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _torch_load(path: Path):
    """torch.load with weights_only, allowing the argparse.Namespace that reference training
    scripts store under "args" (a plain attribute bag, safe to unpickle); other classes
    outside torch's allow list (a Hydra config) load as empty stand-ins, never as themselves."""

    def load(extra: list):
        with torch.serialization.safe_globals([argparse.Namespace, *extra]):
            try:  # mapped: the ranks of a sharded sampler share the page cache, not 8 copies in RAM
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # files in torch's legacy (non-zip) format cannot be mapped
                return torch.load(path, map_location="cpu", weights_only=True)

    try:
        return load([])
    except Exception as e:  # noqa: BLE001 - retried below, reported as a ValueError
        first = e
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip checkpoint, unreadable: report the first error
        unknown = []
    if unknown:
        try:
            return load([(_Opaque, name) for name in unknown])
        except Exception as e:  # noqa: BLE001
            first = e
    raise ValueError(f"checkpoint {str(path)!r} could not be read: {first}") from first


def infer_model_kwargs(state_dict: dict, num_heads: int | None = None) -> dict:
    """Arguments of ``models.create`` read off the tensor shapes of a reference-layout state dict.

    Returns {"name", "input_size", "in_channels", "num_classes", "learn_sigma", "num_timesteps",
    and for Switch-DiT "num_experts", "top_k", for Remix-DiT "num_experts", "num_basis", for DiffMoE
    "num_experts", "interleave", "shared_expert"; plus hidden_size/depth/num_heads when they are
    not a named size}. The head count is not visible in the weights: it comes from the named size
    whose width matches, or from ``num_heads``.
    """
    sd = state_dict
    try:
        proj = sd["x_embedder.proj.weight"]  # (D, C, p, p)
        pos = sd["pos_embed"]  # (1, L, D)
        table = sd["y_embedder.embedding_table.weight"]  # (classes + 1, D)
        final = sd["final_layer.linear.weight"]  # (p*p*C_out, D)
    except KeyError as e:
        raise ValueError(
            f"checkpoint is not a switch-dit training checkpoint nor a DiT-family state dict (no {e.args[0]!r})"
        ) from None
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    grid = math.isqrt(pos.shape[1])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_channels = final.shape[0] // (patch * patch)
    if any(k.startswith("routers.") and k.endswith("experts.w") for k in sd):
        family = "Switch-DiT"
    elif any(k.startswith("routers.") and k.endswith("_unit_mapping") for k in sd):
        family = "DTR"
    elif "coefficients.weight" in sd:  # the published Remix-DiT (switch_dit.remix_dit)
        family = "Remix-DiT"
    elif any(k.endswith(".mlp.gate_weight") for k in sd):  # the published DiffMoE (switch_dit.diffmoe)
        family = "DiffMoE"
    else:
        family = "DiT"
    if patch not in (2, 4, 8):
        raise ValueError(f"checkpoint has patch size {patch}; the named models have 2, 4 or 8")
    size = next((s for s, (d, n, _) in SIZES.items() if d == hidden and n == depth), None)
    kw = dict(
        input_size=grid * patch,
        in_channels=in_channels,
        num_classes=table.shape[0] - 1,  # the last row is the null class of guidance
        learn_sigma=out_channels == 2 * in_channels,
        num_timesteps=int(sd["full_time"].shape[0]) if "full_time" in sd else 1000,
    )
    if size is None:
        sizes = DIFFMOE_SIZES if family == "DiffMoE" else SIZES  # DiffMoE-S has the published 16 heads
        heads = num_heads or next((h for d, _, h in sizes.values() if d == hidden), None)
        if heads is None:
            raise ValueError(f"checkpoint has width {hidden}, not a named size: pass num_heads (--num-heads)")
        size = "S"
        kw.update(hidden_size=hidden, depth=depth, num_heads=heads)
    elif num_heads:
        kw["num_heads"] = num_heads
    if family == "Switch-DiT":
        kw["num_experts"] = sd["routers.0.experts.w"].shape[0]
        prior = sd.get("prior._unit_mapping")
        # w_prior has k*N ones per row; without it fall back to the paper's k = 2.
        kw["top_k"] = int(round(float(prior[0].sum()) / depth)) if prior is not None else min(2, kw["num_experts"])
    if family == "Remix-DiT":
        kw["num_experts"], kw["num_basis"] = sd["coefficients.weight"].shape
    if family == "DiffMoE":
        moe = sorted(int(k.split(".")[1]) for k in sd if k.endswith(".mlp.gate_weight"))
        kw["num_experts"] = sd[f"blocks.{moe[0]}.mlp.gate_weight"].shape[0]
        kw["interleave"] = moe != list(range(depth))
        kw["shared_expert"] = f"blocks.{moe[0]}.mlp.shared_experts.fc1.weight" in sd
    kw["name"] = f"{family}-{size}/{patch}"
    return kw


def load_model(
    path,
    *,
    ema: bool = True,
    device="cpu",
    model_name: str | None = None,
    num_heads: int | None = None,
    backend: str = "auto",
) -> tuple[DiT, dict]:
    """A model in eval mode from a checkpoint file (or a run folder, see ``find_checkpoint``),
    with its EMA weights by default.

    Reads our training checkpoints (the model is rebuilt from the stored arguments) and the
    reference implementation's layout ({"model", "ema", "opt", "args"} or a bare state dict,
    loaded through ``interop.load_official``; the architecture is read off the shapes,
    ``model_name`` / ``num_heads`` settle what shapes cannot tell). A bare state dict is taken as
    is (released checkpoints hold the EMA weights alone).

    Returns (model, info) with info = {"layout": "switch-dit" | "reference", "step", "config"}.
    """
    path = find_checkpoint(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    which = "ema" if ema else "model"
    if "model_kwargs" in obj and "format" in obj:
        # Every format of our checkpoints holds whole "model" / "ema" state dicts and the
        # arguments of models.create; that is all sampling needs.
        if which not in obj:
            raise ValueError(f"checkpoint {str(path)!r} has no {which!r} weights")
        name = obj["model_kwargs"]["name"]
        if model_name is not None and model_name != name:
            raise ValueError(f"model_name {model_name!r} does not match the checkpoint's model {name!r}")
        model = model_from_checkpoint(obj, use_ema=ema, device=device, backend=backend)
        return model, {"layout": "switch-dit", "step": obj.get("step"), "config": obj.get("config", {})}

    from .interop import load_official, unwrap_checkpoint

    if "model" in obj or "ema" in obj:
        if which not in obj:
            raise ValueError(
                f"checkpoint {str(path)!r} has no {which!r} weights (it has {sorted(obj)[:6]}); "
                + ("use the trained weights (--raw-weights)" if ema else "use the EMA weights")
            )
        sd = unwrap_checkpoint(obj, ema=ema)
    else:
        sd = unwrap_checkpoint(obj)
    kw = infer_model_kwargs(sd, num_heads=num_heads)
    name = kw.pop("name")
    if model_name is not None:
        if model_name.split("/")[0].rsplit("-", 1)[0] != name.split("/")[0].rsplit("-", 1)[0]:
            raise ValueError(f"model_name {model_name!r} does not match the checkpoint, which holds a {name}")
        name = model_name
    model = create(name, backend=backend, **kw)
    load_official(model, sd)
    args = obj.get("args")
    config = vars(args) if isinstance(args, argparse.Namespace) else {}
    return model.to(device).eval(), {"layout": "reference", "step": obj.get("train_steps"), "config": config}


def export_reference(ckpt: dict, path=None) -> dict:
    """Our checkpoint -> the reference training script's layout {"model", "ema", "opt", "args"}.

    "model" and "ema" are state dicts the reference DiT loads directly (its fixed tables
    ``full_time`` and ``prior._unit_mapping`` included, see interop.official_state_dict);
    "opt" is our AdamW state (parameters in our order); "args" our config. Written
    atomically to ``path`` when given.
    """
    from .interop import official_state_dict

    out = {"args": dict(ckpt.get("config", {})), "opt": ckpt.get("opt")}
    for key in ("model", "ema"):
        out[key] = official_state_dict(model_from_checkpoint(ckpt, use_ema=key == "ema"))
    if path is not None:
        atomic_save(out, path)
    return out
