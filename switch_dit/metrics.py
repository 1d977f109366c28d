"""Sample quality: FID / IS / precision-recall through a metrics library, and download-free
metrics on the embedded digits.

    fidelity_metrics(samples, reference)   FID, Inception Score, precision and recall through
                                           torch-fidelity (or FID alone through clean-fid), each
                                           with its own feature extractor (downloaded once)
    frechet_distance(f1, f2)               Frechet distance of two feature sets (N, d)
    digits_metrics(samples, labels)        on the digits: how often a classifier trained on the
                                           real digits sees the requested class, and the Frechet
                                           distance to the real held-out digits in its feature space
    load_images(path)                      uint8 (N, H, W, C) from an ADM .npz, or an array

The digits metrics need no download: the classifier (``switch_dit.evaluate``) fits on the
real training digits in about a second. Its feature space is the 45 pairwise (one-vs-one)
decision values of the SVM, continuous margins that move with how a digit is drawn; the
distance of the real training digits to the held-out ones is the floor a perfect model
reaches (reported as ``real_frechet_distance``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "load_images",
    "fidelity_metrics",
    "feature_statistics",
    "frechet_distance",
    "classifier_features",
    "digits_metrics",
    "digits_metrics_npz",
    "images_from_uint8",
]


# -----------------------------------------------------------------------------
# Inputs
# -----------------------------------------------------------------------------


def load_images(source) -> np.ndarray:
    """uint8 (N, H, W, C) images: ``source`` is an ADM-layout .npz (arr_0) or such an array."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"sample file {str(path)!r} does not exist")
        with np.load(path) as f:
            if "arr_0" not in f:
                raise ValueError(f"{str(path)!r} has no arr_0: not an ADM-layout sample file")
            source = f["arr_0"]
    if (
        not isinstance(source, np.ndarray)
        or source.dtype != np.uint8
        or source.ndim != 4
        or source.shape[-1] not in (1, 3)
    ):
        raise ValueError(
            "images must be uint8 (N, H, W, 1 or 3), got "
            f"{getattr(source, 'dtype', type(source))} {getattr(source, 'shape', '')}"
        )
    return source


def images_from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, 1, H, W) in [-1, 1], grey (the mean of the channels)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().mean(-1, keepdim=True)
    return (x / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


class _UInt8Images(torch.utils.data.Dataset):
    """(N, H, W, C) uint8 as a dataset of (3, H, W) uint8 tensors, what torch-fidelity reads."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


# -----------------------------------------------------------------------------
# FID / IS / precision-recall through a library
# -----------------------------------------------------------------------------


def _pick_backend(backend: str) -> str:
    import importlib.util

    have = {
        "torch-fidelity": importlib.util.find_spec("torch_fidelity") is not None,
        "clean-fid": importlib.util.find_spec("cleanfid") is not None,
    }
    if backend == "auto":
        for name, ok in have.items():
            if ok:
                return name
        raise ImportError(
            "FID, Inception Score and precision/recall need torch-fidelity "
            "(pip install torch-fidelity) or, for FID alone, clean-fid (pip install clean-fid)"
        )
    if backend not in have:
        raise ValueError(f"backend must be 'auto', 'torch-fidelity' or 'clean-fid', got {backend!r}")
    if not have[backend]:
        pip = {"torch-fidelity": "torch-fidelity", "clean-fid": "clean-fid"}[backend]
        raise ImportError(f"backend {backend!r} is not installed: pip install {pip}")
    return backend


def _download_failure(e: BaseException) -> bool:
    # No network shows up as URLError / socket errors (OSError subclasses), or as a library's own
    # exception whose message names the download.
    text = str(e).lower()
    return isinstance(e, (OSError, ConnectionError)) or any(
        w in text for w in ("download", "urlopen", "http", "connection", "resolve", "network")
    )


def _write_pngs(images: np.ndarray, folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB").save(folder / f"{i:06d}.png")
    return folder


def fidelity_metrics(
    samples,
    reference,
    *,
    backend: str = "auto",
    fid: bool = True,
    isc: bool = True,
    prc: bool = True,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    weights_path: str | None = None,
    verbose: bool = False,
) -> dict:
    """FID, IS and precision/recall of ``samples`` against ``reference``.

    samples, reference: ADM-layout .npz paths or uint8 (N, H, W, C) arrays (a folder of images
    is passed to the library as is). backend: "torch-fidelity" (all four metrics), "clean-fid"
    (FID only; IS and precision/recall come back as None) or "auto" (the first installed).
    weights_path: torch-fidelity's feature_extractor_weights_path, for machines that cannot
    download the Inception weights. Returns {"backend", "fid", "inception_score",
    "inception_score_std", "precision", "recall"} (None where not computed).

    Raises ImportError naming the package to install, RuntimeError when the library's network
    weights can be neither found nor downloaded.
    """
    backend = _pick_backend(backend)
    if not (fid or isc or prc):
        raise ValueError("nothing to compute: fid, isc and prc are all False")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    inputs = [s if isinstance(s, (str, Path)) and Path(s).is_dir() else load_images(s) for s in (samples, reference)]
    out = {
        "backend": backend,
        "fid": None,
        "inception_score": None,
        "inception_score_std": None,
        "precision": None,
        "recall": None,
    }
    try:
        if backend == "torch-fidelity":
            import torch_fidelity

            def as_input(x):
                return str(x) if isinstance(x, (str, Path)) else _UInt8Images(x)

            kwargs = dict(
                input1=as_input(inputs[0]),
                input2=as_input(inputs[1]),
                cuda=device.type == "cuda",
                batch_size=batch_size,
                fid=fid,
                isc=isc,
                prc=prc,
                verbose=verbose,
            )
            if weights_path is not None:
                kwargs["feature_extractor_weights_path"] = str(weights_path)
            result = torch_fidelity.calculate_metrics(**kwargs)
            keys = {
                "fid": "frechet_inception_distance",
                "inception_score": "inception_score_mean",
                "inception_score_std": "inception_score_std",
                "precision": "precision",
                "recall": "recall",
            }
            for ours, theirs in keys.items():
                if theirs in result:
                    out[ours] = float(result[theirs])
        else:
            from cleanfid import fid as cleanfid

            if not fid:
                raise ValueError("clean-fid computes FID only: ask for fid=True or install torch-fidelity")
            with tempfile.TemporaryDirectory() as tmp:
                dirs = [
                    str(x) if isinstance(x, (str, Path)) else str(_write_pngs(x, Path(tmp) / f"set{i}"))
                    for i, x in enumerate(inputs)
                ]
                out["fid"] = float(
                    cleanfid.compute_fid(
                        dirs[0],
                        dirs[1],
                        mode="clean",
                        device=device,
                        batch_size=batch_size,
                        num_workers=0,
                        verbose=verbose,
                    )
                )
    except (ImportError, ValueError):
        raise
    except Exception as e:
        if _download_failure(e):
            hint = (
                "pass weights_path (--weights) to a local copy of the feature extractor's weights, or "
                if backend == "torch-fidelity"
                else ""
            )
            raise RuntimeError(
                f"{backend} could not load or download the weights of its feature extractor "
                f"(Inception/VGG): {e}. Without internet access, {hint}run once where it can "
                f"download them: they are cached (TORCH_HOME) for later runs"
            ) from e
        raise
    return out


# -----------------------------------------------------------------------------
# Frechet distance
# -----------------------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) in float64 of features (N, d), N >= 2."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, d), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(features1, features2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two feature sets (N1, d), (N2, d).

    Tr((S1 S2)^(1/2)) is taken as the sum of the square roots of the eigenvalues of
    S1^(1/2) S2 S1^(1/2), a symmetric PSD matrix, so there is no complex round-off to discard.
    """
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature sets must have the same width, got {mu1.shape[0]} and {mu2.shape[0]}")
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root1 @ s2 @ root1)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # round-off can take an exact 0 a hair below


# -----------------------------------------------------------------------------
# The digits
# -----------------------------------------------------------------------------


def classifier_features(classifier, images: torch.Tensor) -> np.ndarray:
    """Features of (N, 1, S, S) images in the digits classifier's space: (N, d) float64."""
    return np.asarray(classifier.features(images), dtype=np.float64)


_FITTED: dict = {}


def _digits_classifier(image_size: int):
    """The classifier fitted on the real training digits of this size (cached per process)."""
    from . import data as digits
    from .evaluate import DigitsClassifier

    if image_size not in _FITTED:
        train, test = digits.load_digits(size=image_size)
        _FITTED[image_size] = (DigitsClassifier().fit(train), train, test)
    return _FITTED[image_size]


def digits_metrics(samples: torch.Tensor, labels: torch.Tensor | None = None, *, classifier=None) -> dict:
    """Download-free quality of digit samples (N, 1, S, S) in [-1, 1] drawn for ``labels`` int (N,).

    Returns {"num_samples", "sample_accuracy" (None without labels), "per_class",
    "frechet_distance" (samples vs the real held-out digits, classifier features),
    "real_frechet_distance" (real training vs held-out digits: the floor),
    "classifier_test_accuracy" (the classifier on held-out real digits: the ceiling)}.
    ``classifier`` defaults to one fitted on the real training digits of the samples' size.
    """
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or samples.shape[1] != 1:
        raise ValueError(f"samples must be a (N, 1, S, S) tensor, got {tuple(getattr(samples, 'shape', ()))}")
    if samples.shape[0] < 2:
        raise ValueError(f"samples must hold at least 2 images for a Frechet distance, got {samples.shape[0]}")
    if samples.shape[-1] != samples.shape[-2] or samples.shape[-1] < 8:
        raise ValueError(f"samples must be square digits of side >= 8, got {tuple(samples.shape[-2:])}")
    from .evaluate import sample_accuracy

    fitted, train, test = _digits_classifier(int(samples.shape[-1]))
    clf = classifier or fitted
    out = {"num_samples": int(samples.shape[0]), "sample_accuracy": None, "per_class": None}
    if labels is not None:
        labels = torch.as_tensor(labels).cpu().long()
        if labels.shape != (samples.shape[0],):
            raise ValueError(f"labels must have shape ({samples.shape[0]},), got {tuple(labels.shape)}")
        acc = sample_accuracy(clf, samples.cpu(), labels)
        out["sample_accuracy"], out["per_class"] = acc["accuracy"], acc["per_class"]
    real = classifier_features(clf, test.images)
    out["frechet_distance"] = frechet_distance(classifier_features(clf, samples.cpu()), real)
    out["real_frechet_distance"] = frechet_distance(classifier_features(clf, train.images), real)
    out["classifier_test_accuracy"] = clf.accuracy(test.images, test.labels)
    return out


def digits_metrics_npz(path) -> dict:
    """``digits_metrics`` of an ADM-layout sample file (arr_0 uint8 NHWC, arr_1 labels if present)."""
    images = load_images(path)
    with np.load(path) as f:
        labels = torch.from_numpy(f["arr_1"].astype(np.int64)) if "arr_1" in f else None
    if images.shape[1] > 64 or (
        labels is not None and labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < 10
    ):
        raise ValueError(
            f"{str(path)!r} does not hold digit samples (images {images.shape[1]}x{images.shape[2]}, "
            f"labels outside 0..9?): score it against a reference set with fidelity_metrics (--ref)"
        )
    return digits_metrics(images_from_uint8(images), labels)
