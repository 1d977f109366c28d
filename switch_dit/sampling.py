"""Sampling from a trained model: image batches, PNG grids and sharded ``.npz`` sample sets.

    generate(model, labels, ...)         (B, C, H, W) samples: DDPM respaced or DDIM, guidance
    grid_labels(per_class)               the labels of a grid with one row per class
    to_uint8(images)                     (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, 3), the ADM layout
    save_grid(images, path, nrow)        a PNG grid
    sample_to_npz(model, out_dir, n)     any number of images, sharded over torchrun ranks, resumable

Models come from ``switch_dit.checkpoint.load_model``; latent models decode through
``switch_dit.vae``.

The ``.npz`` layout is the one the ADM evaluation suite (and DiT's ``sample_ddp.py``) writes and
reads: ``arr_0`` uint8 (N, H, W, 3), here with the requested classes in ``arr_1`` int64 (N,).

Randomness: shard i of a sample set draws its classes and noise from its own generator, seeded
from (seed, i). The set is therefore the same for a seed whatever the number of ranks, and a
shard rewritten after an interruption is the shard that would have been written the first time.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import distributed
from . import flow as flow_lib
from . import vae as vae_lib
from .data import NUM_CLASSES
from .diffusion import accepts_shared_timestep, create_diffusion
from .diffusion import sample as diffusion_sample
from .models import DiT

__all__ = [
    "sampling_diffusion",
    "generate",
    "CapturedStep",
    "grid_labels",
    "to_uint8",
    "save_grid",
    "shard_seed",
    "sample_to_npz",
    "read_npz",
]


# -----------------------------------------------------------------------------
# Sampling
# -----------------------------------------------------------------------------


def sampling_diffusion(
    method: str = "ddpm", steps: int = 250, noise_schedule: str = "cosine", learn_sigma: bool = True
):
    """The process to sample with: DDPM evenly respaced to ``steps`` or DDIM's "ddimN" spacing."""
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be an int in [1, 1000], got {steps!r}")
    respacing = f"ddim{steps}" if method == "ddim" else str(steps)
    return create_diffusion(timestep_respacing=respacing, noise_schedule=noise_schedule, learn_sigma=learn_sigma)


@torch.no_grad()
def generate(
    model: DiT,
    labels: torch.Tensor,
    *,
    method: str = "ddpm",
    steps: int = 250,
    cfg_scale: float = 1.5,
    noise_schedule: str = "cosine",
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    progress: bool = False,
    capture: bool | None = None,
) -> torch.Tensor:
    """Class-conditional samples (B, C, H, W) float32 for labels int64 (B,), on the labels' device.

    A rectified-flow model (``model.objective == "flow"``, DiffMoE) samples with ``method``
    "euler" or "heun" (``switch_dit.flow.sample``). ``cfg_scale`` 1 runs the conditional model
    alone; above 1, DiT's guidance on the epsilon channels. ``clip_denoised`` clips the predicted x0
    to [-1, 1] at every step (right for pixels; pass False for VAE latents, which are not bounded).
    Randomness comes from ``generator``, or a fresh one seeded with ``seed`` (0 if neither is given).

    ``capture``: replay the model's step from a CUDA graph (``CapturedStep``); None = on CUDA for
    models with ``accepts_shared_timestep`` (DiT, DTR, Switch-DiT, Remix-DiT), whose step has fixed
    shapes and no host sync; others (DiffMoE's expert choice) run eagerly unless asked.
    """
    if not isinstance(cfg_scale, (int, float)) or isinstance(cfg_scale, bool) or not 1.0 <= cfg_scale < math.inf:
        raise ValueError(f"cfg_scale must be a number >= 1 (1 = no guidance), got {cfg_scale!r}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be an int64 tensor (B,), got {getattr(labels, 'dtype', type(labels))} "
            f"{tuple(getattr(labels, 'shape', ()))}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= model.num_classes):
        raise ValueError(
            f"labels must be classes in [0, {model.num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    flow = getattr(model, "objective", "diffusion") == "flow"
    if flow and method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun' for a rectified-flow model, got {method!r}")
    diffusion = None if flow else sampling_diffusion(method, steps, noise_schedule, learn_sigma=model.learn_sigma)
    if generator is None:
        generator = torch.Generator(device=labels.device).manual_seed(0 if seed is None else seed)
    if capture is None:
        capture = capture_by_default(model, labels.device)
    if capture and labels.device.type != "cuda":
        raise ValueError(f"capture needs CUDA (a CUDA graph of the sampling step); the labels are on {labels.device}")
    was_training = model.training
    model.eval()  # in training mode DiT drops labels at random
    try:
        net = CapturedStep(model) if capture else model
        if flow:  # switch_dit.flow: Euler or Heun from t = 0 to 1; clipping applies to the result
            x = flow_lib.sample(
                net, labels, steps=steps, method=method, cfg_scale=float(cfg_scale), generator=generator
            )
            return x.clamp(-1, 1) if clip_denoised else x
        return diffusion_sample(
            net,
            diffusion,
            labels,
            cfg_scale=float(cfg_scale),
            method=method,
            generator=generator,
            progress=progress,
            clip_denoised=clip_denoised,
        )
    finally:
        model.train(was_training)


def capture_by_default(model, device: torch.device) -> bool:
    """Whether ``generate`` captures the step when not told: on CUDA, for models built for it
    (``accepts_shared_timestep``: fixed shapes and no host sync in the step)."""
    return torch.device(device).type == "cuda" and accepts_shared_timestep(model)


class CapturedStep:
    """A model whose sampling step runs as one CUDA graph: the launch cost of its hundreds of
    small kernels, which dominates small models and small batches, is paid once.

    It stands in for the model in ``diffusion.sample`` (other attributes are the model's).
    Sampling has fixed shapes: every step calls ``forward`` (or ``forward_with_cfg``) with
    x of one shape, one 0-d timestep (``accepts_shared_timestep``, one row of gates and one
    mixed weight per block, docs/design.md §2) and the same labels and guidance scale. The
    first call of each (function, shapes, constants) runs the step twice eagerly on a side
    stream (where ``backend="auto"`` may time its strategies: never inside a capture) and
    captures a third; later calls copy their inputs into the graph's buffers and replay it.
    The step must be free of host syncs, as the fast path is (value checks of CUDA tensors are
    off by default, see ``switch_dit._checks``); a step that syncs fails the capture loudly.
    """

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self._graphs: dict = {}

    def __getattr__(self, name):  # num_classes, in_channels, parameters, accepts_shared_timestep, ...
        return getattr(self._model, name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._replay(self._model.forward, x, t, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        return self._replay(self._model.forward_with_cfg, x, t, y, cfg_scale=cfg_scale)

    def _replay(self, fn, *tensors: torch.Tensor, **constants) -> torch.Tensor:
        key = (fn.__name__, tuple((a.shape, a.dtype, a.device) for a in tensors), tuple(sorted(constants.items())))
        if key not in self._graphs:
            self._graphs[key] = _capture_graph(fn, tensors, constants)
        graph, inputs, output = self._graphs[key]
        for buffer, value in zip(inputs, tensors):
            buffer.copy_(value)
        graph.replay()
        return output.clone()  # the next replay overwrites the graph's output buffer


def _capture_graph(fn, tensors, constants, warmup: int = 2):
    """(graph, input buffers, output buffer) of ``fn(*buffers, **constants)`` captured on CUDA."""
    inputs = [a.clone() for a in tensors]
    side = torch.cuda.Stream(device=inputs[0].device)
    side.wait_stream(torch.cuda.current_stream(inputs[0].device))
    with torch.cuda.stream(side):  # warm-up off the capture: allocations, autotuning, lazy inits
        for _ in range(warmup):
            fn(*inputs, **constants)
    torch.cuda.current_stream(inputs[0].device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            output = fn(*inputs, **constants)
    except RuntimeError as e:
        raise RuntimeError(
            f"capturing the sampling step as a CUDA graph failed ({e}); the step must not sync "
            "with the host (unset SWITCH_DIT_CHECK_VALUES), or sample without capture "
            "(generate(capture=False), `switch-dit sample --no-capture`)"
        ) from e
    return graph, inputs, output


# -----------------------------------------------------------------------------
# Images
# -----------------------------------------------------------------------------


def grid_labels(samples_per_class: int, num_classes: int = NUM_CLASSES, device="cpu") -> torch.Tensor:
    """int64 (num_classes * samples_per_class,): 0,0,..,1,1,..; one grid row per class."""
    return torch.arange(num_classes, device=device).repeat_interleave(samples_per_class)


def to_uint8(images: torch.Tensor, rgb: bool = True) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> uint8 (N, H, W, C) numpy; grey (C = 1) is repeated to
    3 channels with ``rgb`` (the ADM suite and the Inception networks read RGB)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be a (N, 1 or 3, H, W) tensor, got {tuple(getattr(images, 'shape', ()))}")
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if rgb and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def save_grid(images: torch.Tensor, path, nrow: int, scale: int = 1, pad: int = 2) -> Path:
    """Write (N, C, H, W) images in [-1, 1] (C = 1 or 3) as a PNG with ``nrow`` images per row,
    each magnified ``scale`` times (nearest neighbour). Returns the path."""
    from PIL import Image

    if not isinstance(nrow, int) or nrow < 1 or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"nrow and scale must be positive ints, got {nrow!r} and {scale!r}")
    x = to_uint8(images, rgb=False)  # (N, H, W, C)
    n, h, w, c = x.shape
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 64, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = x[i]
    path = Path(path)
    Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB").save(path)
    return path


# -----------------------------------------------------------------------------
# Sharded sample sets
# -----------------------------------------------------------------------------


def shard_seed(seed: int, shard: int) -> int:
    """A well-mixed 63-bit seed for shard ``shard`` of the set drawn with ``seed``."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _save_npz_atomic(path: Path, **arrays) -> None:
    # Written beside the target and renamed: an interrupted write never leaves a shard that
    # looks complete.
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def read_npz(path) -> tuple[np.ndarray, np.ndarray | None]:
    """(arr_0 uint8 (N, H, W, C), arr_1 int64 (N,) or None) of a sample set or shard."""
    with np.load(path) as f:
        if "arr_0" not in f:
            raise ValueError(f"{str(path)!r} has no arr_0 (not an ADM-layout sample file)")
        return f["arr_0"], (f["arr_1"] if "arr_1" in f else None)


def _shard_ok(path: Path, count: int) -> bool:
    try:
        images, labels = read_npz(path)
    except Exception:  # truncated or foreign file: sample it again
        return False
    return images.shape[0] == count and images.dtype == np.uint8 and labels is not None and labels.shape == (count,)


def sample_to_npz(
    model: DiT,
    out_dir,
    num_samples: int,
    *,
    batch_size: int = 32,
    classes: Sequence[int] | None = None,
    method: str = "ddpm",
    steps: int = 250,
    cfg_scale: float = 1.5,
    noise_schedule: str = "cosine",
    seed: int = 0,
    vae=None,
    clip_denoised: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    capture: bool | None = None,
    log=print,
) -> Path | None:
    """Sample ``num_samples`` images into ``out_dir``, sharded over ranks; rank 0 merges.

    Shard i (``batch_size`` images, the last one fewer) goes to rank i % world_size and is written
    to ``out_dir/shards/shard-iiiiii.npz``. Shards already on disk are kept: rerunning an
    interrupted command finishes the set. ``out_dir/manifest.json`` records the settings; a rerun
    with other settings is refused rather than mixing two sample sets. Classes are drawn
    uniformly from the model's classes, or from ``classes`` if given.

    After a barrier (when torch.distributed is initialised) rank 0 writes
    ``out_dir/samples_{N}x{H}x{W}x3.npz`` (arr_0 uint8 NHWC, arr_1 int64 labels) and returns its
    path; other ranks return None. Latent models pass ``vae`` to decode (see ``switch_dit.vae``).
    ``capture`` as in ``generate``.
    """
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if rank is None or world_size is None:
        env_rank, env_world = distributed.rank_and_world()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if classes is not None:
        classes = sorted({int(c) for c in classes})
        if not classes or classes[0] < 0 or classes[-1] >= model.num_classes:
            raise ValueError(f"classes must be a non-empty list of classes in [0, {model.num_classes}), got {classes}")
    if model.in_channels == 4 and vae is None:
        raise ValueError(
            "the model samples VAE latents: pass vae (see switch_dit.vae.load_vae) to decode them into images"
        )
    if clip_denoised is None:
        clip_denoised = vae is None  # pixels are bounded, latents are not
    device = next(model.parameters()).device

    out_dir = Path(out_dir)
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "num_samples": num_samples,
        "shard_size": batch_size,
        "classes": classes,
        "method": method,
        "steps": steps,
        "cfg_scale": float(cfg_scale),
        "noise_schedule": noise_schedule,
        "seed": seed,
        "clip_denoised": clip_denoised,
        "model": {
            "routing": model.routing,
            "hidden_size": model.hidden_size,
            "depth": model.depth,
            "input_size": model.input_size,
            "num_classes": model.num_classes,
        },
    }
    manifest = out_dir / "manifest.json"
    expected = json.loads(json.dumps(settings))  # as it reads back from JSON (tuples -> lists)
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old != expected:
            diff = sorted(k for k in expected if old.get(k) != expected[k])
            raise ValueError(
                f"{str(out_dir)!r} holds samples drawn with other settings ({', '.join(diff)}); "
                f"use another output folder or delete it"
            )
    else:
        # Every rank may write it: the content is the same and the rename is atomic.
        tmp = manifest.with_name(f"manifest.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        os.replace(tmp, manifest)

    num_shards = math.ceil(num_samples / batch_size)
    mine = list(range(rank, num_shards, world_size))
    sizes = {i: min(batch_size, num_samples - i * batch_size) for i in mine}
    paths = {i: shard_dir / f"shard-{i:06d}.npz" for i in range(num_shards)}
    todo = [i for i in mine if not _shard_ok(paths[i], sizes[i])]
    if len(todo) < len(mine):
        log(f"rank {rank}: {len(mine) - len(todo)} of its {len(mine)} shards already written, kept")
    bar = None
    if progress and todo and rank == 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(sizes[i] for i in todo), desc="sampling", unit="img", dynamic_ncols=True)
        except ImportError:
            bar = None
    class_table = torch.tensor(classes if classes is not None else range(model.num_classes), device=device)
    for i in todo:
        g = torch.Generator(device=device).manual_seed(shard_seed(seed, i))
        labels = class_table[torch.randint(len(class_table), (sizes[i],), generator=g, device=device)]
        x = generate(
            model,
            labels,
            method=method,
            steps=steps,
            cfg_scale=cfg_scale,
            noise_schedule=noise_schedule,
            clip_denoised=clip_denoised,
            generator=g,
            capture=capture,
        )
        if vae is not None:
            x = vae_lib.decode(vae, x)
        _save_npz_atomic(paths[i], arr_0=to_uint8(x), arr_1=labels.cpu().numpy().astype(np.int64))
        if bar is not None:
            bar.update(sizes[i])
    if bar is not None:
        bar.close()

    distributed.barrier()
    if rank != 0:
        return None
    missing = [i for i in range(num_shards) if not paths[i].exists()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} shards are missing in {str(shard_dir)!r} (first: {missing[:5]}); "
            f"the other ranks have not finished: run the same command again to complete the set"
        )
    images, labels = [], []
    for i in range(num_shards):
        a, b = read_npz(paths[i])
        images.append(a)
        labels.append(b)
    images_np = np.concatenate(images)[:num_samples]
    labels_np = np.concatenate(labels)[:num_samples]
    n, h, w, c = images_np.shape
    final = out_dir / f"samples_{n}x{h}x{w}x{c}.npz"
    _save_npz_atomic(final, arr_0=images_np, arr_1=labels_np)
    log(f"wrote {final} (arr_0 {images_np.dtype} {images_np.shape}, arr_1 labels)")
    return final
