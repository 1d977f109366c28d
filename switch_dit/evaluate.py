"""The demo's quality figure: does a classifier trained on real digits see the requested class?

A class-conditional generator that learned the digits draws a "3" when asked for a 3.
We fit a support-vector classifier on the real training digits (the same pixels the
diffusion model trains on) and report how often it recognises the requested class in
the samples. Its own accuracy on held-out real digits is the ceiling of that figure;
pure noise lands near chance (10 %).

An RBF SVM on the raw pixels is ~98 % accurate on held-out digits and fits in well
under a second on a CPU, so the metric costs nothing next to training.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import DigitsSplit, load_digits

__all__ = ["DigitsClassifier", "sample_accuracy", "evaluate_samples"]


class DigitsClassifier:
    """RBF-SVM on flattened pixels of (N, 1, S, S) images in [-1, 1]."""

    def __init__(self, C: float = 10.0):
        self.C = C
        self._svm = None
        self.image_shape: tuple[int, ...] | None = None

    def fit(self, train: DigitsSplit) -> "DigitsClassifier":
        from sklearn.svm import SVC

        self.image_shape = tuple(train.images.shape[1:])
        self._svm = SVC(C=self.C, gamma="scale")
        self._svm.fit(self._features(train.images), train.labels.cpu().numpy())
        return self

    def _features(self, images: torch.Tensor) -> np.ndarray:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        if self.image_shape is not None and tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images must be (N, {', '.join(map(str, self.image_shape))}), got {tuple(images.shape)}")
        # Samples can overshoot the data range a little; the SVM only knows [-1, 1].
        x = images.detach().float().clamp(-1.0, 1.0).cpu()
        return x.flatten(1).numpy()

    def features(self, images: torch.Tensor) -> np.ndarray:
        """(N, 1, S, S) -> float64 (N, 45): the SVM's one-vs-one decision values, one continuous
        margin per pair of classes; the feature space of the digits Frechet distance
        (``switch_dit.metrics``)."""
        if self._svm is None:
            raise RuntimeError("DigitsClassifier.features called before fit")
        saved = self._svm.decision_function_shape
        self._svm.decision_function_shape = "ovo"  # read at call time; "ovr" folds the pairs into votes
        try:
            return np.asarray(self._svm.decision_function(self._features(images)), dtype=np.float64)
        finally:
            self._svm.decision_function_shape = saved

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) -> int64 (N,) predicted classes."""
        if self._svm is None:
            raise RuntimeError("DigitsClassifier.predict called before fit")
        return torch.from_numpy(self._svm.predict(self._features(images)).astype(np.int64))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of images classified as their label (labels: int (N,))."""
        labels = torch.as_tensor(labels).cpu()
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        return float((self.predict(images) == labels).float().mean())


def sample_accuracy(classifier: DigitsClassifier, samples: torch.Tensor, requested: torch.Tensor) -> dict:
    """The quality figure for generated samples, with a per-class breakdown.

    samples: (N, 1, S, S) float; requested: int64 (N,) the classes asked for.
    Returns {"accuracy": float, "per_class": {class: float}}.
    """
    requested = requested.cpu()
    pred = classifier.predict(samples)
    hit = (pred == requested).float()
    per_class = {int(c): float(hit[requested == c].mean()) for c in torch.unique(requested)}
    return {"accuracy": float(hit.mean()), "per_class": per_class}


def evaluate_samples(samples: torch.Tensor, labels: torch.Tensor, image_size: int) -> dict:
    """Fit the classifier on the real training digits of ``image_size`` and score the samples.

    Returns classifier_test_accuracy (its accuracy on the held-out real digits, the ceiling),
    sample_accuracy (how often it sees the requested class), per_class and num_samples.
    """
    train_split, test_split = load_digits(size=image_size)
    clf = DigitsClassifier().fit(train_split)
    result = sample_accuracy(clf, samples, labels)
    return {
        "classifier_test_accuracy": clf.accuracy(test_split.images, test_split.labels),
        "sample_accuracy": result["accuracy"],
        "per_class": result["per_class"],
        "num_samples": int(labels.shape[0]),
    }
