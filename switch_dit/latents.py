"""VAE latents: encode an image folder once, train from the shards.

    switch-dit extract-latents IMAGES OUT        (or torchrun ... -m switch_dit.latents IMAGES OUT)

IMAGES is an ImageNet-style folder (one sub-folder per class; ``--unconditional``
treats every image as one class, for FFHQ). Each image is centre-cropped to
``image_size`` as ADM and DiT do, scaled to [-1, 1] and encoded with diffusers'
AutoencoderKL (sd-vae-ft-ema or -mse); the latents are multiplied by 0.18215. With
``--flips stored`` the mirrored image is encoded too, so that training flips exactly
rather than mirroring the latent (the VAE is only approximately mirror-symmetric).

OUT receives ``shard-NNNNN.pt`` files ({"latents": (n, V, C, h, w), "labels": (n,)},
V = 2 with stored flips), a ``shard-NNNNN.json`` record beside each finished shard, and
``manifest.json`` last. Extraction is resumable: a rerun skips the shards whose record
is present, and the encoder's noise is seeded per shard, so the result does not depend
on where a run was interrupted. Several processes split the shards between them.

``LatentsDataset`` reads OUT back (memory-mapped) with clear errors for a missing or
incomplete folder, a corrupt shard and latents of the wrong size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import vae as vae_lib

__all__ = [
    "IMAGE_EXTENSIONS",
    "find_images",
    "center_crop",
    "vae_encoder",
    "extract_latents",
    "LatentsDataset",
    "add_extract_arguments",
    "extract_from_args",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff")
MANIFEST = "manifest.json"
FORMAT_NAME = "switch-dit-latents"
FORMAT_VERSION = 1

Encoder = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# -----------------------------------------------------------------------------
# Images
# -----------------------------------------------------------------------------


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def find_images(root, unconditional: bool = False) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of an image folder, in a fixed (sorted) order.

    Class folders are the sub-folders of ``root`` (searched recursively for images);
    with ``unconditional`` every image under ``root`` is class 0.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} is not a folder")
    if unconditional:
        files = sorted(p for p in root.rglob("*") if _is_image(p))
        if not files:
            raise ValueError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return files, [0] * len(files), [""]
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(
            f"image folder {str(root)!r} has no class sub-folders (ImageNet layout: "
            "root/<class>/<image>); pass --unconditional for a folder of unlabelled images"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if _is_image(p))
        if not found:
            raise ValueError(f"class folder {str(root / name)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def center_crop(image, size: int):
    """ADM's centre crop: halve with a box filter while the short side is >= 2 * size,
    resize (bicubic) so the short side is ``size``, cut the centre square."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


class _ImageFiles(torch.utils.data.Dataset):
    """file i -> (3, size, size) float32 in [-1, 1]."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                im = center_crop(im.convert("RGB"), self.size)
        except Exception as e:
            raise ValueError(f"could not read image {str(self.files[i])!r}: {e}") from None
        x = torch.from_numpy(np.array(im, dtype=np.float32)).permute(2, 0, 1)
        return x / 127.5 - 1.0


# -----------------------------------------------------------------------------
# The VAE
# -----------------------------------------------------------------------------


def vae_encoder(name: str = "ema", device="cpu") -> Encoder:
    """The encoder of ``extract_latents``: images (B, 3, S, S) in [-1, 1] -> scaled latents, through
    ``switch_dit.vae`` ("ema", "mse", a Hugging Face id or a local folder). It carries the VAE's
    ``name`` and ``device`` for the manifest and the per-shard generators."""
    model = vae_lib.load_vae(name, device)

    def encode(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return vae_lib.encode(model, x, generator)

    encode.name, encode.device = model.name, torch.device(device)
    return encode


# -----------------------------------------------------------------------------
# Extraction
# -----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.pt"


def _shard_key(files: list[Path], labels: list[int], root: Path, **settings) -> str:
    """What a shard's content depends on: its images (names, labels) and the settings."""
    text = json.dumps(
        {"files": [str(f.relative_to(root)) for f in files], "labels": labels, **settings}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _shard_done(out: Path, i: int, key: str) -> bool:
    """A shard is finished when its record exists, was made from the same images and
    settings, and matches the file on disk."""
    record_path = (out / _shard_name(i)).with_suffix(".json")
    try:
        record = json.loads(record_path.read_text())
        return record["key"] == key and (out / _shard_name(i)).stat().st_size == record["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def extract_latents(
    image_folder,
    out_folder,
    encoder: Encoder,
    *,
    image_size: int = 256,
    shard_size: int = 4096,
    batch_size: int = 32,
    flips: str = "stored",
    dtype: torch.dtype = torch.float32,
    unconditional: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    vae_name: str = "",
    progress: bool = False,
    log=print,
) -> dict | None:
    """Encode ``image_folder`` into shards in ``out_folder``; returns the manifest (on rank 0).

    ``encoder(images, generator)`` maps (B, 3, S, S) in [-1, 1] to scaled latents. With
    several processes, rank r encodes shards r, r + world_size, ...; ``barrier`` waits
    for all of them before rank 0 writes the manifest.
    """
    if not isinstance(image_size, int) or image_size < 8 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8, got {image_size!r}")
    for name, v in (("shard_size", shard_size), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if flips not in ("stored", "none"):
        raise ValueError(f"flips must be 'stored' or 'none', got {flips!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    files, labels, classes = find_images(image_folder, unconditional)
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # the folder is being (re)written: not complete until the new manifest
        (out / MANIFEST).unlink(missing_ok=True)

    n_shards = (len(files) + shard_size - 1) // shard_size
    spans = [(i, i * shard_size, min(len(files), (i + 1) * shard_size)) for i in range(n_shards)]
    vae_name = vae_name or getattr(encoder, "name", "custom")
    settings = dict(image_size=image_size, flips=flips, dtype=str(dtype), seed=seed, vae=vae_name)
    keys = {i: _shard_key(files[a:b], labels[a:b], Path(image_folder), **settings) for i, a, b in spans}
    mine = [s for s in spans if s[0] % world_size == rank and not _shard_done(out, s[0], keys[s[0]])]
    if rank == 0:
        log(
            f"{len(files)} images in {len(classes)} class(es) -> {n_shards} shard(s) in {out}; "
            f"{n_shards - len(mine) if world_size == 1 else 'some'} already done"
        )
    label_t = torch.tensor(labels, dtype=torch.int64)

    # One loader over all pending images of this rank; batches never straddle shards.
    pending = [f for _, a, b in mine for f in files[a:b]]
    batches, offset = [], 0
    for _, a, b in mine:
        batches += [list(range(offset + j, offset + min(j + batch_size, b - a))) for j in range(0, b - a, batch_size)]
        offset += b - a
    loader = torch.utils.data.DataLoader(
        _ImageFiles(pending, image_size), batch_sampler=batches, num_workers=num_workers
    )
    it = iter(loader)
    bar = None
    if progress and rank == 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc="extract", unit="img", dynamic_ncols=True)
        except ImportError:
            pass
    for i, a, b in mine:
        gen = torch.Generator(device=_encoder_device(encoder)).manual_seed(seed * 1_000_003 + i)
        parts = []
        done = 0
        while done < b - a:
            x = next(it)
            z = encoder(x, gen)
            if flips == "stored":
                z = torch.stack([z, encoder(x.flip(-1), gen)], dim=1)
            else:
                z = z.unsqueeze(1)
            parts.append(z.detach().to("cpu", dtype))
            done += x.shape[0]
            if bar is not None:
                bar.update(x.shape[0])
        latents = torch.cat(parts)
        if not torch.isfinite(latents.float()).all():
            raise ValueError(f"the encoder produced non-finite latents for shard {i} (images {a}..{b - 1})")
        path = out / _shard_name(i)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save({"latents": latents, "labels": label_t[a:b].clone()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _write_json(
            {
                "count": b - a,
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
                "latent_shape": list(latents.shape[2:]),
                "key": keys[i],
            },
            path.with_suffix(".json"),
        )
    if bar is not None:
        bar.close()
    if barrier is not None:
        barrier()
    if rank != 0:
        return None

    records = []
    for i, _start, _stop in spans:
        if not _shard_done(out, i, keys[i]):
            raise RuntimeError(f"shard {_shard_name(i)} is missing after extraction (did a process fail?)")
        rec = json.loads((out / _shard_name(i)).with_suffix(".json").read_text())
        records.append({"file": _shard_name(i), **rec})
    shapes = {tuple(r["latent_shape"]) for r in records}
    if len(shapes) != 1:
        raise RuntimeError(f"the shards hold latents of different shapes {sorted(shapes)}")
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source": str(Path(image_folder).resolve()),
        "vae": vae_name,
        "scale": vae_lib.SCALE,
        "image_size": image_size,
        "latent_shape": list(shapes.pop()),
        "flips": flips,
        "dtype": str(dtype).replace("torch.", ""),
        "num_classes": len(classes),
        "classes": classes,
        "count": len(files),
        "shards": [{k: r[k] for k in ("file", "count", "bytes", "sha256")} for r in records],
    }
    _write_json(manifest, out / MANIFEST)
    log(
        f"wrote {out / MANIFEST}: {len(files)} latents of shape {manifest['latent_shape']}"
        f"{' (+ mirrored)' if flips == 'stored' else ''}"
    )
    return manifest


def _encoder_device(encoder) -> str:
    """Generators must live where the encoder draws its noise; diffusers' VAE: its device."""
    return str(getattr(encoder, "device", "cpu"))


# -----------------------------------------------------------------------------
# Reading
# -----------------------------------------------------------------------------


class LatentsDataset:
    """The shards of a latents folder, memory-mapped; ``get(indices, flip)`` gathers a batch.

    expected_image_size: the run's image size; 0 or None accepts the manifest's.
    verify: also compare every shard's SHA-256 with the manifest (reads everything once).
    """

    def __init__(self, folder, expected_image_size: int | None = None, verify: bool = False):
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"latents folder {str(folder)!r} does not exist")
        if not (folder / MANIFEST).is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} has no {MANIFEST}: not a latents folder written by "
                "`switch-dit extract-latents`, or its extraction has not finished"
            )
        try:
            m = json.loads((folder / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(folder / MANIFEST)!r} is corrupt (not JSON): {e}") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise ValueError(f"{str(folder / MANIFEST)!r} is not a switch-dit latents manifest")
        if m.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{str(folder / MANIFEST)!r} has version {m.get('version')}, this version reads {FORMAT_VERSION}"
            )
        self.folder, self.manifest = folder, m
        self.image_size = int(m["image_size"])
        self.latent_shape = tuple(int(s) for s in m["latent_shape"])
        self.num_classes = int(m["num_classes"])
        self.flips_stored = m["flips"] == "stored"
        if expected_image_size and expected_image_size != self.image_size:
            raise ValueError(
                f"image_size is {expected_image_size} but the latents in {str(folder)!r} were "
                f"extracted from {self.image_size}x{self.image_size} images "
                f"(latents {'x'.join(map(str, self.latent_shape))}); set image_size to "
                f"{self.image_size} or 0"
            )
        if len(self.latent_shape) != 3 or self.latent_shape[1] != self.latent_shape[2]:
            raise ValueError(f"{str(folder / MANIFEST)!r}: latent_shape must be (C, h, h), got {self.latent_shape}")
        if self.latent_shape[1] * 8 != self.image_size:
            raise ValueError(
                f"{str(folder / MANIFEST)!r}: latents of size {self.latent_shape[1]} do not come from "
                f"{self.image_size}-pixel images with an 8x VAE"
            )
        variants = 2 if self.flips_stored else 1
        self._latents, self._labels, counts = [], [], []
        for rec in m["shards"]:
            path = folder / rec["file"]
            if not path.is_file():
                raise FileNotFoundError(f"shard {str(path)!r} listed in the manifest is missing")
            size = path.stat().st_size
            if size != rec["bytes"]:
                raise ValueError(
                    f"shard {str(path)!r} is corrupt: {size} bytes, the manifest says {rec['bytes']} "
                    "(truncated copy? re-run extract-latents to rewrite it)"
                )
            if verify and _sha256(path) != rec["sha256"]:
                raise ValueError(f"shard {str(path)!r} is corrupt: its SHA-256 differs from the manifest's")
            try:
                shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                z, y = shard["latents"], shard["labels"]
            except Exception as e:
                raise ValueError(f"shard {str(path)!r} is corrupt and cannot be read: {e}") from None
            want = (rec["count"], variants, *self.latent_shape)
            if tuple(z.shape) != want:
                raise ValueError(
                    f"shard {str(path)!r} holds latents of shape {tuple(z.shape)}, the manifest "
                    f"says {want} (count, variants, C, h, w): latents of the wrong size"
                )
            if tuple(y.shape) != (rec["count"],) or y.dtype != torch.int64:
                raise ValueError(
                    f"shard {str(path)!r} has labels of shape {tuple(y.shape)} ({y.dtype}), "
                    f"expected ({rec['count']},) int64"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"shard {str(path)!r} has labels outside [0, {self.num_classes})")
            self._latents.append(z)
            self._labels.append(y)
            counts.append(rec["count"])
        if sum(counts) != m["count"] or not counts:
            raise ValueError(
                f"{str(folder / MANIFEST)!r}: the shards hold {sum(counts)} latents, the manifest says {m['count']}"
            )
        self._ends = torch.tensor(np.cumsum(counts), dtype=torch.int64)
        self.labels = torch.cat(self._labels)

    def __len__(self) -> int:
        return int(self._ends[-1])

    @property
    def in_channels(self) -> int:
        return self.latent_shape[0]

    @property
    def input_size(self) -> int:
        """The latents' side: what the model sees as its image size."""
        return self.latent_shape[1]

    def get(self, indices: torch.Tensor, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, C, h, w) float32 and labels (B,) of dataset rows ``indices``;
        ``flip`` (B,) bool takes the mirrored latent (stored, or mirrored here)."""
        indices = indices.cpu()
        shard = torch.searchsorted(self._ends, indices, right=True)
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), self._ends[:-1]])
        local = indices - starts[shard]
        use_flip = flip is not None and bool(flip.any())
        rows = []
        for b, (s, i) in enumerate(zip(shard.tolist(), local.tolist())):
            variant = int(flip[b]) if (use_flip and self.flips_stored) else 0
            rows.append(self._latents[s][i, variant])
        x = torch.stack(rows).float()
        if use_flip and not self.flips_stored:
            x = torch.where(flip.cpu().view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels[indices]


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def add_extract_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", help="image folder: one sub-folder per class (ImageNet layout)")
    p.add_argument("out", help="folder for the shards and manifest.json")
    p.add_argument(
        "--vae",
        default="ema",
        help="ema or mse (stabilityai/sd-vae-ft-*), a hub id or a local folder (default %(default)s)",
    )
    p.add_argument("--image-size", type=int, default=256, help="crop size in pixels (default %(default)s)")
    p.add_argument(
        "--flips",
        choices=("stored", "none"),
        default="stored",
        help="also encode the mirrored images (default %(default)s)",
    )
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call (default %(default)s)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="stored latent type (default %(default)s)",
    )
    p.add_argument("--workers", type=int, default=4, help="image decoding processes (default %(default)s)")
    p.add_argument("--unconditional", action="store_true", help="every image is class 0 (FFHQ)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the encoder's noise (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 keeps torch's default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def extract_from_args(args: argparse.Namespace) -> int:
    """Run extraction as `switch-dit extract-latents` / torchrun describe; returns 0."""
    from . import distributed

    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Check the images before loading a VAE of 80 M parameters.
    find_images(args.images, args.unconditional)
    ctx = distributed.setup(args.device)
    try:
        encoder = vae_encoder(args.vae, ctx.device)
        extract_latents(
            args.images,
            args.out,
            encoder,
            image_size=args.image_size,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            flips=args.flips,
            dtype=getattr(torch, args.dtype),
            unconditional=args.unconditional,
            num_workers=args.workers,
            seed=args.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            barrier=ctx.barrier,
            vae_name=encoder.name,
            progress=not args.no_progress,
            log=print if ctx.is_main else (lambda *a: None),
        )
    finally:
        distributed.cleanup()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m switch_dit.latents", description=__doc__.split("\n\n")[0])
    add_extract_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return extract_from_args(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        parser.exit(2, f"extract-latents: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
