"""The embedded demo dataset: scikit-learn's handwritten digits as small images.

scikit-learn ships 1797 grey 8x8 digits (10 classes, pixel values 0..16) inside the
package, so the demo needs no download. We upsample them bilinearly (16x16 by default,
so a patch-2 transformer sees an 8x8 grid of tokens) and scale to [-1, 1], the range
the diffusion process assumes for data.

No augmentation: a horizontal flip turns some digits into other shapes (a flipped 2
is not a 2), and the set is small enough to hold in memory as one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DigitsSplit", "load_digits", "batches", "NUM_CLASSES", "DigitsData", "open_training_data", "data_info"]

NUM_CLASSES = 10
_PIXEL_MAX = 16.0  # sklearn digits are integers in [0, 16]


@dataclass
class DigitsSplit:
    """images: float32 (N, 1, S, S) in [-1, 1]; labels: int64 (N,) in [0, 10)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "DigitsSplit":
        return DigitsSplit(self.images.to(device), self.labels.to(device))


def _upsample(images8: np.ndarray, size: int) -> torch.Tensor:
    """(N, 8, 8) values 0..16 -> float32 (N, 1, size, size) in [-1, 1]."""
    x = torch.from_numpy(images8.astype(np.float32) / _PIXEL_MAX).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    # Bilinear interpolation of values in [0, 1] stays in [0, 1]; clamp guards rounding.
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def load_digits(size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> tuple[DigitsSplit, DigitsSplit]:
    """The digits as (train, test) splits, stratified by class with a fixed seed.

    The split does not depend on the training seed, so every run (and the quality
    classifier) holds out the same test digits.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"size must be an int >= 8 (the digits are 8x8), got {size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits demo needs scikit-learn: pip install 'switch-dit[demo]'") from e

    raw = _sk_load_digits()
    images8, labels = raw.images, raw.target.astype(np.int64)
    # Stratified split by hand: shuffle each class and cut the same fraction from each.
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_idx)] = True

    images = _upsample(images8, size)
    labels_t = torch.from_numpy(labels)
    train = DigitsSplit(images[~torch.from_numpy(is_test)], labels_t[~torch.from_numpy(is_test)])
    test = DigitsSplit(images[torch.from_numpy(is_test)], labels_t[torch.from_numpy(is_test)])
    return train, test


def batches(data: DigitsSplit, batch_size: int, generator: torch.Generator):
    """Endless (images, labels) batches: reshuffle every epoch, drop the ragged tail.

    Sampling is driven by ``generator`` alone (on the CPU), so the stream of batches is
    the same for a seed on any device.
    """
    n = len(data)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int in [1, {n}] (the training set size), got {batch_size!r}")
    device = data.images.device
    while True:
        perm = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield data.images[idx], data.labels[idx]


# -----------------------------------------------------------------------------
# The trainer's view of a dataset
# -----------------------------------------------------------------------------


class DigitsData:
    """The digits' training split in memory, with the interface of latents.LatentsDataset:
    ``len``, ``get(indices, flip)`` and the in_channels / input_size / num_classes of the data."""

    def __init__(self, image_size: int, device="cpu"):
        split, _ = load_digits(size=image_size)
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.in_channels, self.input_size, self.num_classes = 1, image_size, NUM_CLASSES

    def __len__(self) -> int:
        return self.labels.shape[0]

    def get(self, indices: torch.Tensor, flip: torch.Tensor | None = None):
        """Images (n, 1, S, S) and labels (n,) of ``indices``; rows with ``flip`` true mirrored."""
        idx = indices.to(self.images.device)
        x = self.images[idx]
        if flip is not None:
            x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels[idx]


def open_training_data(data: str, image_size: int, device="cpu"):
    """The training set a config names: "digits" (held on ``device``) or a latents folder
    (``latents.LatentsDataset``, memory-mapped on the CPU, its image size checked)."""
    if data == "digits":
        return DigitsData(image_size, device)
    from .latents import LatentsDataset

    return LatentsDataset(data, expected_image_size=image_size)


def data_info(data) -> dict:
    """What the model's shape depends on: {"in_channels", "input_size", "num_classes"}."""
    return {"in_channels": data.in_channels, "input_size": data.input_size, "num_classes": data.num_classes}
