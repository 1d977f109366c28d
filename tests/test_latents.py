"""The latents pipeline: image folder -> shards + manifest -> training batches, with a
stand-in encoder (the real VAE's weights cannot be downloaded in CI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from switch_dit import latents
from switch_dit.latents import LatentsDataset, center_crop, extract_latents, find_images

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


class StandIn:
    """(B, 3, S, S) in [-1, 1] -> (B, 4, S/8, S/8): 8x8 means plus their average as a 4th
    channel, plus a little noise from the generator (like sampling the VAE's Gaussian)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, generator):
        self.calls += 1
        z = F.avg_pool2d(x, 8)
        z = torch.cat([z, z.mean(1, keepdim=True)], dim=1)
        return z + 0.01 * torch.randn(z.shape, generator=generator)


def make_images(root, classes=("cat", "dog"), per_class=3, size=(40, 24), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path / "images")


def extract(images, out, **kw):
    kw = {"image_size": 32, "shard_size": 2, "batch_size": 2, "log": lambda *a: None, **kw}
    enc = kw.pop("encoder", None) or StandIn()
    return extract_latents(images, out, enc, **kw), enc


def test_find_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        find_images(tmp_path / "flat")
    files, labels, classes = find_images(tmp_path / "flat", unconditional=True)
    assert len(files) == 1 and labels == [0] and classes == [""]
    root = make_images(tmp_path / "imgs")
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="class folder .*empty.* holds no images"):
        find_images(root)


def test_center_crop_is_adm_style():
    im = Image.fromarray(np.arange(100 * 50 * 3, dtype=np.uint8).reshape(50, 100, 3) % 255)
    out = center_crop(im, 16)
    assert out.size == (16, 16)
    assert center_crop(Image.new("RGB", (16, 16)), 16).size == (16, 16)


def test_extract_writes_shards_manifest_and_reads_back(images, tmp_path):
    out = tmp_path / "lat"
    manifest, enc = extract(images, out)
    assert manifest["count"] == 6 and manifest["num_classes"] == 2 and manifest["classes"] == ["cat", "dog"]
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["flips"] == "stored" and manifest["scale"] == 0.18215
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.pt", "shard-00001.pt", "shard-00002.pt"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    ds = LatentsDataset(out)
    assert len(ds) == 6 and ds.latent_shape == (4, 4, 4) and ds.flips_stored
    x, y = ds.get(torch.tensor([0, 5, 3]))
    assert x.shape == (3, 4, 4, 4) and x.dtype == torch.float32 and y.tolist() == [0, 1, 1]
    # Row 5 is the third dog; its stored latents are the stand-in's on the cropped image and its mirror.
    files, _, _ = find_images(images)
    batch = torch.stack([latents._ImageFiles(files, 32)[i] for i in (4, 5)])  # shard 2 is one batch
    gen = torch.Generator().manual_seed(2)  # shard 2, seed 0; the mirror follows in the same stream
    pair = [StandIn()(batch, gen), StandIn()(batch.flip(-1), gen)]
    torch.testing.assert_close(x[1], pair[0][1])
    xf, _ = ds.get(torch.tensor([5]), flip=torch.tensor([True]))
    torch.testing.assert_close(xf[0], pair[1][1])


def test_extraction_resumes_and_is_reproducible(images, tmp_path):
    out = tmp_path / "lat"
    extract(images, out)
    before = {p.name: torch.load(p, weights_only=True)["latents"] for p in out.glob("shard-*.pt")}
    # A crash after shard 0: the others lost, and no manifest.
    for i in (1, 2):
        (out / f"shard-{i:05d}.json").unlink()
    (out / "manifest.json").unlink()
    _, enc = extract(images, out)
    assert enc.calls == 2 * 2  # two shards (one batch each), image and mirror
    assert sorted(p.name for p in out.glob("shard-*.pt")) == sorted(before)
    for name, z in before.items():  # the same latents: the encoder's noise is seeded per shard
        assert torch.equal(torch.load(out / name, weights_only=True)["latents"], z), name
    assert LatentsDataset(out).manifest["count"] == 6
    # Other settings make other shards: nothing is reused.
    _, enc = extract(images, out, seed=1)
    assert enc.calls == 3 * 2


def test_flips_not_stored_mirror_the_latent(images, tmp_path):
    out = tmp_path / "lat"
    extract(images, out, flips="none", dtype=torch.float16)
    ds = LatentsDataset(out)
    assert not ds.flips_stored
    x, _ = ds.get(torch.tensor([1, 2]))
    xf, _ = ds.get(torch.tensor([1, 2]), flip=torch.tensor([True, False]))
    torch.testing.assert_close(xf[0], x[0].flip(-1))
    torch.testing.assert_close(xf[1], x[1])


def test_bad_data_gives_clear_errors(images, tmp_path):
    out = tmp_path / "lat"
    extract(images, out)
    with pytest.raises(FileNotFoundError, match="latents folder .* does not exist"):
        LatentsDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        LatentsDataset(images)
    with pytest.raises(ValueError, match="image_size is 64 but the latents .* 32x32 images"):
        LatentsDataset(out, expected_image_size=64)

    shard = out / "shard-00001.pt"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])  # a truncated copy
    with pytest.raises(ValueError, match="shard-00001.pt.* is corrupt: .* bytes, the manifest says"):
        LatentsDataset(out)
    shard.write_bytes(b"\0" * len(good))  # right size, garbage inside
    with pytest.raises(ValueError, match="shard-00001.pt.* is corrupt and cannot be read"):
        LatentsDataset(out)
    shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit: only the checksum sees it
    with pytest.raises(ValueError, match="SHA-256"):
        LatentsDataset(out, verify=True)

    # Latents of the wrong size (e.g. a shard from another extraction copied in).
    torch.save({"latents": torch.zeros(2, 2, 4, 8, 8), "labels": torch.zeros(2, dtype=torch.int64)}, shard)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][1]["bytes"] = shard.stat().st_size
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"shape \(2, 2, 4, 8, 8\), the manifest says \(2, 2, 4, 4, 4\).*wrong size"):
        LatentsDataset(out)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.pt.* is missing"):
        LatentsDataset(out)


def test_bad_extraction_arguments(images, tmp_path):
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 8"):
        extract(images, tmp_path / "a", image_size=30)
    with pytest.raises(ValueError, match="flips must be"):
        extract(images, tmp_path / "a", flips="maybe")
    with pytest.raises(ValueError, match="non-finite latents"):
        extract(images, tmp_path / "a", encoder=lambda x, g: torch.full((x.shape[0], 4, 4, 4), float("nan")))


def test_missing_vae_says_what_to_do(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_diffusers(name, *a, **k):
        if name.startswith("diffusers"):
            raise ImportError("No module named 'diffusers'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    with pytest.raises(ImportError, match="pip install diffusers"):
        latents.vae_encoder("ema")


def test_training_on_latents(images, tmp_path):
    """End to end: extract, then a few steps of the trainer on the shards with flips."""
    from switch_dit.checkpoint import load_checkpoint
    from switch_dit.config import TrainConfig
    from switch_dit.train import train

    extract(images, tmp_path / "lat")
    cfg = TrainConfig(
        data=str(tmp_path / "lat"),
        model="Switch-DiT-S/2",
        hidden_size=32,
        depth=2,
        num_heads=2,
        steps=3,
        batch_size=4,
        precision="fp32",
        device="cpu",
        out=str(tmp_path / "run"),
        progress=False,
        log_every=1,
    )
    summary = train(cfg, log=lambda *a: None)
    assert summary["steps"] == 3
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck["model_kwargs"]["in_channels"] == 4 and ck["model_kwargs"]["input_size"] == 4
    assert ck["model_kwargs"]["num_classes"] == 2
    # The image size of the run must be the latents': a clear error otherwise.
    with pytest.raises(ValueError, match="image_size is 64"):
        train(TrainConfig(**{**cfg.to_dict(), "image_size": 64, "out": str(tmp_path / "r2")}), log=lambda *a: None)
    with pytest.raises(ValueError, match="batch_size must be <= 6"):
        train(TrainConfig(**{**cfg.to_dict(), "batch_size": 8, "out": str(tmp_path / "r3")}), log=lambda *a: None)


def test_commands_report_missing_folders(tmp_path, capsys):
    from switch_dit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--no-progress"])
    assert e.value.code == 2 and "latents folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["extract-latents", str(tmp_path / "missing"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "image folder" in err and "does not exist" in err
