"""Training checkpoints: atomic writes, the newest complete one, RNG states, reference export.

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

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "atomic_save",
    "checkpoint_path",
    "list_checkpoints",
    "load_checkpoint",
    "latest_checkpoint",
    "read_config",
    "prune_checkpoints",
    "capture_rng",
    "restore_rng",
    "model_from_checkpoint",
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
        raise ValueError(f"checkpoint {str(path)!r} has format {ckpt['format']}, this version reads "
                         f"{', '.join(map(str, READABLE_FORMATS))}")
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


def model_from_checkpoint(ckpt: dict, use_ema: bool = True, device="cpu"):
    """Rebuild the model of a checkpoint in eval mode, with its EMA weights by default."""
    from .models import create

    kw = dict(ckpt["model_kwargs"])
    model = create(kw.pop("name"), **kw)
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    return model.to(device).eval()


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
