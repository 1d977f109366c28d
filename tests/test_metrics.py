"""Metrics: the Frechet distance, the digits metrics (do they tell a trained model from an
untrained one?) and the FID/IS/precision-recall wrapper with its missing-dependency messages."""

from __future__ import annotations

import importlib.machinery
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch

from switch_dit import checkpoint, metrics, models, sampling
from switch_dit import data as digits

pytest.importorskip("sklearn")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- Frechet distance --------------------------------------------------------------


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([1.0, -2.0, 0.5])
    # Same covariance, shifted mean: exactly ||shift||^2.
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # Scaled by s: the mean moves by (s - 1) mu, and Tr(S + s^2 S - 2 s S) = (1 - s)^2 Tr(S).
    s = 3.0
    mu, cov = a.mean(0), np.cov(a, rowvar=False)
    assert metrics.frechet_distance(a, a * s) == pytest.approx((1 - s) ** 2 * (mu @ mu + np.trace(cov)), rel=1e-9)


def test_frechet_distance_matches_the_sqrtm_formula():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(torch.from_numpy(a), b) == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_bad_input():
    with pytest.raises(ValueError, match="features"):
        metrics.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="width"):
        metrics.frechet_distance(np.random.rand(5, 3), np.random.rand(5, 4))


# -- digits metrics ---------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out():
    _, test = digits.load_digits(size=16)
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:100]
    return test.images[idx], test.labels[idx]


def test_digits_metrics_on_real_digits_and_noise(held_out):
    images, labels = held_out
    real = metrics.digits_metrics(images, labels)
    noise = metrics.digits_metrics(torch.rand(100, 1, 16, 16) * 2 - 1, labels)
    assert real["classifier_test_accuracy"] > 0.95
    assert real["sample_accuracy"] > 0.9 and noise["sample_accuracy"] < 0.3
    assert real["frechet_distance"] < 1.0 < 10.0 < noise["frechet_distance"]
    assert 0 < real["real_frechet_distance"] < 1.0
    assert set(real["per_class"]) <= set(range(10))
    unlabelled = metrics.digits_metrics(images)
    assert unlabelled["sample_accuracy"] is None and unlabelled["frechet_distance"] == real["frechet_distance"]


def test_classifier_features_are_the_pairwise_margins(held_out):
    from switch_dit.evaluate import DigitsClassifier

    images, labels = held_out
    clf = metrics._digits_classifier(16)[0]
    f = metrics.classifier_features(clf, images[:7])
    assert f.shape == (7, 45) and f.dtype == np.float64 and np.isfinite(f).all()
    assert clf._svm.decision_function_shape == "ovr"  # restored: predict is unaffected
    with pytest.raises(RuntimeError, match="before fit"):
        DigitsClassifier().features(images)


def test_digits_metric_separates_a_trained_model_from_an_untrained_one(tmp_path):
    """A tiny Switch-DiT trained for 150 steps (~3 s on one core) against the same model untrained.

    So short a run draws digit-like blobs, not yet recognisable digits: the requested-class
    accuracy needs ~1500 steps to leave chance (the demo's default), too slow for a unit test.
    The Frechet distance in the classifier's feature space already separates the two by a wide
    margin (measured: ~11 against ~51); real held-out digits stand in for a fully trained model
    in the accuracy test above (99 % against chance for noise).
    """
    from switch_dit.config import TrainConfig
    from switch_dit.train import train

    cfg = TrainConfig(
        model="Switch-DiT-S/4",
        hidden_size=64,
        depth=2,
        num_heads=2,
        steps=150,
        batch_size=32,
        warmup_steps=10,
        lr=3e-3,
        sample=False,
        progress=False,
        out=str(tmp_path),
        device="cpu",
        log_every=50,
        seed=0,
    )
    train(cfg, log=lambda *a, **k: None)
    trained, _ = checkpoint.load_model(tmp_path / "checkpoint.pt")
    torch.manual_seed(0)
    untrained = models.create(
        "Switch-DiT-S/4", input_size=16, in_channels=1, num_classes=10, hidden_size=64, depth=2, num_heads=2
    ).eval()
    labels = torch.arange(10).repeat_interleave(10)
    scores = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        x = sampling.generate(model, labels, method="ddim", steps=20, cfg_scale=4.0, seed=0)
        scores[name] = metrics.digits_metrics(x, labels)["frechet_distance"]
    assert scores["trained"] < 0.5 * scores["untrained"], scores


def test_digits_metrics_from_an_npz_sample_file(tmp_path, held_out):
    images, labels = held_out
    path = tmp_path / "samples_100x16x16x3.npz"
    np.savez(path, arr_0=sampling.to_uint8(images), arr_1=labels.numpy())
    from_file = metrics.digits_metrics_npz(path)
    direct = metrics.digits_metrics(images, labels)
    assert from_file["sample_accuracy"] == direct["sample_accuracy"]  # uint8 rounding does not move the class
    assert from_file["frechet_distance"] == pytest.approx(direct["frechet_distance"], abs=0.05)


def test_digits_metrics_bad_input(held_out):
    images, labels = held_out
    with pytest.raises(ValueError, match="samples"):
        metrics.digits_metrics(images[:, 0])
    with pytest.raises(ValueError, match="labels"):
        metrics.digits_metrics(images, labels[:3])
    with pytest.raises(ValueError, match="at least 2"):
        metrics.digits_metrics(images[:1])


# -- FID / IS / precision-recall through a library ---------------------------------


def fake_module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # so importlib.util.find_spec sees it
    mod.__dict__.update(attrs)
    return mod


def hide(monkeypatch, *names):
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        return None if name in names else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


IMAGES = np.random.default_rng(0).integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)


def test_missing_metric_libraries_say_what_to_install(monkeypatch):
    hide(monkeypatch, "torch_fidelity", "cleanfid")
    with pytest.raises(ImportError, match="pip install torch-fidelity.*pip install clean-fid"):
        metrics.fidelity_metrics(IMAGES, IMAGES)
    with pytest.raises(ImportError, match="pip install clean-fid"):
        metrics.fidelity_metrics(IMAGES, IMAGES, backend="clean-fid")
    with pytest.raises(ValueError, match="backend"):
        metrics.fidelity_metrics(IMAGES, IMAGES, backend="tf")


def test_torch_fidelity_gets_uint8_rgb_datasets_and_results_are_renamed(monkeypatch, tmp_path):
    seen = {}

    def calculate_metrics(**kwargs):
        seen.update(kwargs)
        return {
            "frechet_inception_distance": 12.5,
            "inception_score_mean": 3.0,
            "inception_score_std": 0.1,
            "precision": 0.6,
            "recall": 0.4,
            "f_score": 0.48,
        }

    monkeypatch.setitem(
        sys.modules, "torch_fidelity", fake_module("torch_fidelity", calculate_metrics=calculate_metrics)
    )
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=IMAGES[..., :1])  # grey samples from a file
    out = metrics.fidelity_metrics(path, IMAGES, backend="torch-fidelity", weights_path="/w/inception.pth")
    assert out == {
        "backend": "torch-fidelity",
        "fid": 12.5,
        "inception_score": 3.0,
        "inception_score_std": 0.1,
        "precision": 0.6,
        "recall": 0.4,
    }
    item = seen["input1"][0]
    assert len(seen["input1"]) == 6 and item.dtype == torch.uint8 and item.shape == (3, 16, 16)
    assert torch.equal(seen["input2"][2], torch.from_numpy(IMAGES[2]).permute(2, 0, 1))
    assert seen["fid"] and seen["isc"] and seen["prc"] and seen["cuda"] is torch.cuda.is_available()
    assert seen["feature_extractor_weights_path"] == "/w/inception.pth"


def test_weights_that_cannot_be_downloaded_are_explained(monkeypatch):
    def calculate_metrics(**kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setitem(
        sys.modules, "torch_fidelity", fake_module("torch_fidelity", calculate_metrics=calculate_metrics)
    )
    with pytest.raises(RuntimeError, match="could not load or download.*weights_path"):
        metrics.fidelity_metrics(IMAGES, IMAGES, backend="torch-fidelity")


def test_clean_fid_computes_fid_from_png_folders(monkeypatch):
    seen = {}

    def compute_fid(d1, d2, **kwargs):
        from pathlib import Path

        seen["counts"] = (len(list(Path(d1).glob("*.png"))), len(list(Path(d2).glob("*.png"))))
        return 7.0

    cleanfid = fake_module("cleanfid")
    cleanfid.fid = fake_module("cleanfid.fid", compute_fid=compute_fid)
    monkeypatch.setitem(sys.modules, "cleanfid", cleanfid)
    monkeypatch.setitem(sys.modules, "cleanfid.fid", cleanfid.fid)
    hide(monkeypatch, "torch_fidelity")
    out = metrics.fidelity_metrics(IMAGES, IMAGES[:4], isc=False, prc=False)  # auto picks clean-fid
    assert out["backend"] == "clean-fid" and out["fid"] == 7.0 and out["precision"] is None
    assert seen["counts"] == (6, 4)


def test_load_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        metrics.load_images(tmp_path / "none.npz")
    np.savez(tmp_path / "x.npz", images=IMAGES)
    with pytest.raises(ValueError, match="no arr_0"):
        metrics.load_images(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="uint8"):
        metrics.load_images(IMAGES.astype(np.float32))


# -- the command ------------------------------------------------------------------


def test_eval_command(tmp_path, held_out, capsys, monkeypatch):
    from switch_dit.cli import main

    images, labels = held_out
    path = tmp_path / "samples_100x16x16x3.npz"
    np.savez(path, arr_0=sampling.to_uint8(images), arr_1=labels.numpy())
    assert main(["eval", str(path), "--json", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    import json

    result = json.loads((tmp_path / "m.json").read_text())
    assert result["kind"] == "digits" and result["sample_accuracy"] > 0.9 and '"frechet_distance"' in printed
    hide(monkeypatch, "torch_fidelity", "cleanfid")
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(path), "--ref", str(path)])
    assert exc.value.code == 1 and "pip install torch-fidelity" in capsys.readouterr().err
    big = tmp_path / "imagenet.npz"
    np.savez(big, arr_0=np.zeros((2, 128, 128, 3), np.uint8), arr_1=np.array([5, 900]))
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(big)])
    assert exc.value.code == 2 and "does not hold digit samples" in capsys.readouterr().err
