"""Sampling from checkpoints: determinism, guidance at scale 1, the .npz sample sets and resume."""

from __future__ import annotations

import argparse
import sys
import types

import numpy as np
import pytest
import torch

from switch_dit import checkpoint, distributed, models, sampling, vae
from switch_dit.interop import official_state_dict

TINY = dict(input_size=16, in_channels=1, num_classes=10, hidden_size=32, depth=2, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(name="Switch-DiT-S/4", seed=0, **kw):
    """A tiny model with every weight random (the zero-initialised experts and final layer
    would make every sample the same function of the noise)."""
    torch.manual_seed(seed)
    model = models.create(name, **{**TINY, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


LABELS = torch.tensor([0, 3, 7, 9])


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_generate_is_deterministic_for_a_seed(model, method):
    a = sampling.generate(model, LABELS, method=method, steps=4, cfg_scale=2.0, seed=5)
    b = sampling.generate(model, LABELS, method=method, steps=4, cfg_scale=2.0, seed=5)
    c = sampling.generate(model, LABELS, method=method, steps=4, cfg_scale=2.0, seed=6)
    assert a.shape == (4, 1, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.abs().max() <= 1.0 + 1e-6  # clip_denoised keeps pixels in range at the last step


def test_cfg_at_scale_one_equals_the_conditional_model(model):
    # One forward: the guided half's epsilon is uncond + 1 * (cond - uncond) = cond.
    x = torch.randn(4, 1, 16, 16)
    t = torch.tensor([999, 500, 10, 0])
    null = torch.full_like(LABELS, model.num_classes)
    guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([LABELS, null]), 1.0)
    torch.testing.assert_close(guided[:4], model(x, t, LABELS), rtol=0, atol=1e-6)
    # Whole sampling loop (DDIM, eta 0: no noise after the initial one): forced through
    # forward_with_cfg at scale 1, against generate's conditional path (scale 1 skips the
    # doubled batch), from the same initial noise.
    plain = sampling.generate(model, LABELS, method="ddim", steps=5, cfg_scale=1.0, seed=1)
    z = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))  # what generate drew
    diffusion = sampling.sampling_diffusion("ddim", 5)
    with torch.no_grad():
        doubled = diffusion.ddim_sample_loop(
            model.forward_with_cfg,
            (8, 1, 16, 16),
            {"y": torch.cat([LABELS, null]), "cfg_scale": 1.0},
            noise=torch.cat([z, z]),
            clip_denoised=True,
        )
    torch.testing.assert_close(doubled[:4], plain, rtol=0, atol=1e-5)
    assert not torch.allclose(plain, sampling.generate(model, LABELS, method="ddim", steps=5, cfg_scale=3.0, seed=1))


def test_generate_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="cfg_scale"):
        sampling.generate(model, LABELS, cfg_scale=0.5)
    with pytest.raises(ValueError, match="labels"):
        sampling.generate(model, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="labels"):
        sampling.generate(model, LABELS.float())
    with pytest.raises(ValueError, match="method"):
        sampling.generate(model, LABELS, method="euler")
    with pytest.raises(ValueError, match="steps"):
        sampling.generate(model, LABELS, steps=0)


# -- sample sets (.npz) -----------------------------------------------------------


def npz(model, out, n=10, **kw):
    kw = {
        "batch_size": 4,
        "method": "ddim",
        "steps": 3,
        "cfg_scale": 2.0,
        "seed": 3,
        "progress": False,
        "log": lambda *a: None,
        **kw,
    }
    return sampling.sample_to_npz(model, out, n, **kw)


def test_npz_layout_reads_back(model, tmp_path):
    path = npz(model, tmp_path)
    assert path.name == "samples_10x16x16x3.npz"
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (10, 16, 16, 3) and images.dtype == np.uint8  # ADM: NHWC uint8, RGB
    assert labels.shape == (10,) and labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < 10
    assert (images[..., 0] == images[..., 2]).all()  # grey repeated to three channels
    assert images.std() > 0
    # The same images as sampling the shard's batch directly.
    g = torch.Generator().manual_seed(sampling.shard_seed(3, 0))
    y = torch.arange(10)[torch.randint(10, (4,), generator=g)]
    x = sampling.generate(model, y, method="ddim", steps=3, cfg_scale=2.0, generator=g)
    assert np.array_equal(sampling.to_uint8(x), images[:4]) and np.array_equal(y.numpy(), labels[:4])


def test_npz_classes_restrict_the_labels(model, tmp_path):
    _, labels = sampling.read_npz(npz(model, tmp_path, n=8, classes=[2, 5]))
    assert set(labels.tolist()) <= {2, 5}


def test_npz_resume_keeps_existing_shards(model, tmp_path):
    first = npz(model, tmp_path)
    shards = sorted((tmp_path / "shards").glob("shard-*.npz"))
    assert [p.name for p in shards] == ["shard-000000.npz", "shard-000001.npz", "shard-000002.npz"]
    images, labels = sampling.read_npz(first)
    # Interrupted run: one shard missing, one truncated, the merged file not yet written.
    first.unlink()
    shards[1].unlink()
    shards[2].write_bytes(b"PK\x03\x04 truncated")
    kept = shards[0].stat().st_mtime_ns
    lines = []
    again = npz(model, tmp_path, log=lines.append)
    assert shards[0].stat().st_mtime_ns == kept  # kept, not resampled
    assert any("1 of its 3 shards already written" in line for line in lines)
    images2, labels2 = sampling.read_npz(again)
    assert np.array_equal(images, images2) and np.array_equal(labels, labels2)  # same set as uninterrupted


def test_npz_refuses_to_mix_settings(model, tmp_path):
    npz(model, tmp_path)
    with pytest.raises(ValueError, match="other settings.*seed"):
        npz(model, tmp_path, seed=4)


def test_npz_ranks_split_the_shards_and_rank0_merges(model, tmp_path):
    single = sampling.read_npz(npz(model, tmp_path / "one"))
    # Two ranks run one after the other here (torchrun runs them at once, with a barrier).
    with pytest.raises(RuntimeError, match="shards are missing"):
        npz(model, tmp_path / "two", rank=0, world_size=2)
    assert npz(model, tmp_path / "two", rank=1, world_size=2) is None
    assert sorted(p.name for p in (tmp_path / "two" / "shards").glob("*.npz")) == [
        "shard-000000.npz",
        "shard-000001.npz",
        "shard-000002.npz",
    ]
    merged = sampling.read_npz(npz(model, tmp_path / "two", rank=0, world_size=2))
    assert np.array_equal(single[0], merged[0]) and np.array_equal(single[1], merged[1])  # independent of ranks
    with pytest.raises(ValueError, match="rank"):
        npz(model, tmp_path / "three", rank=2, world_size=2)


def test_npz_rank_and_world_size_from_torchrun_env(model, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert distributed.rank_and_world() == (1, 3)
    assert npz(model, tmp_path, n=10) is None  # rank 1 of 3: shard 1 only, no merge
    assert [p.name for p in (tmp_path / "shards").glob("*.npz")] == ["shard-000001.npz"]


def test_npz_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        npz(model, tmp_path, n=0)
    with pytest.raises(ValueError, match="batch_size"):
        npz(model, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="classes"):
        npz(model, tmp_path, classes=[10])


# -- images, VAE ------------------------------------------------------------------


def test_to_uint8_and_grid(tmp_path):
    from PIL import Image

    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    assert sampling.to_uint8(x, rgb=False).ravel().tolist() == [0, 128, 255, 255]
    assert sampling.to_uint8(x).shape == (1, 2, 2, 3)
    grey = sampling.save_grid(torch.rand(5, 1, 8, 8) * 2 - 1, tmp_path / "g.png", nrow=3, scale=2, pad=1)
    img = Image.open(grey)
    assert img.mode == "L" and img.size == (3 * 17 + 1, 2 * 17 + 1)
    rgb = Image.open(sampling.save_grid(torch.rand(2, 3, 4, 4) * 2 - 1, tmp_path / "c.png", nrow=2))
    assert rgb.mode == "RGB"
    with pytest.raises(ValueError, match="images"):
        sampling.to_uint8(torch.rand(2, 2, 4, 4))


def test_latent_models_need_the_vae(tmp_path, monkeypatch):
    latent = tiny_model(in_channels=4, input_size=8)
    with pytest.raises(ValueError, match="VAE latents"):
        sampling.sample_to_npz(latent, tmp_path, 2, progress=False)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        vae.load_vae("ema")


def test_vae_download_failure_is_explained(monkeypatch):
    class FailingKL:
        @staticmethod
        def from_pretrained(name):
            raise OSError(f"We couldn't connect to the hub to load {name}")

    fake = types.ModuleType("diffusers.models")
    fake.AutoencoderKL = FailingKL
    monkeypatch.setitem(sys.modules, "diffusers", types.ModuleType("diffusers"))
    monkeypatch.setitem(sys.modules, "diffusers.models", fake)
    with pytest.raises(RuntimeError, match="sd-vae-ft-ema.*local folder"):
        vae.load_vae("ema")


def test_decode_scales_latents_and_clamps():
    class FakeVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def decode(self, z):
            # 8x upsampling to 3 channels, like the SD VAE's shapes.
            return types.SimpleNamespace(sample=z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2))

    z = torch.full((2, 4, 2, 2), 0.1 * vae.SCALE)
    z[1] = 5.0
    out = vae.decode(FakeVAE(), z, batch_size=1)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out[0], torch.full((3, 16, 16), 0.1))
    assert out[1].max() == 1.0  # clamped to the image range


# -- checkpoints ------------------------------------------------------------------


def test_load_model_from_our_training_checkpoint(tiny_checkpoint):
    state = checkpoint.load_checkpoint(tiny_checkpoint)
    loaded, info = checkpoint.load_model(tiny_checkpoint)
    assert info["layout"] == "switch-dit" and info["step"] == state["step"] == 2 and not loaded.training
    assert loaded.state_dict().keys() == state["ema"].keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state["ema"][k]), k  # EMA weights by default
    raw, _ = checkpoint.load_model(tiny_checkpoint.parent, ema=False)  # a run folder: its checkpoint.pt
    for k, v in raw.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    with pytest.raises(ValueError, match="does not match the checkpoint's model"):
        checkpoint.load_model(tiny_checkpoint, model_name="DiT-S/4")


class HydraLikeConfig:
    """Pickles like OmegaConf's DictConfig, which the reference training script saves under
    "config": a class outside torch's weights-only allow list, rebuilt via __setstate__."""

    loaded = 0

    def __init__(self, **content):
        self._content = dict(content)

    def __getstate__(self):
        return {"_content": self._content}

    def __setstate__(self, state):
        HydraLikeConfig.loaded += 1  # never runs: the loader must not execute the class's code
        self.__dict__.update(state)


def test_load_model_from_a_reference_training_checkpoint_with_a_hydra_config(tmp_path):
    src = tiny_model("Switch-DiT-S/4", top_k=1)
    sd = official_state_dict(src)
    torch.save({"model": sd, "ema": sd, "opt": {}, "config": HydraLikeConfig(lr=1e-4)}, tmp_path / "ref.pt")
    loaded, info = checkpoint.load_model(tmp_path / "ref.pt", num_heads=2)
    assert info["layout"] == "reference" and HydraLikeConfig.loaded == 0
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([0, 999]), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(x, t, y), src(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Switch-DiT-S/4", "DTR-S/4", "DiT-S/4"])
def test_load_model_from_the_reference_layout(tmp_path, name):
    src = tiny_model(name, top_k=1) if name.startswith("Switch") else tiny_model(name)
    ema_sd = official_state_dict(src)
    other = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in ema_sd.items()}
    torch.save(
        {"model": other, "ema": ema_sd, "opt": {}, "args": argparse.Namespace(model=name, image_size=16)},
        tmp_path / "ref.pt",
    )
    with pytest.raises(ValueError, match="num_heads"):
        checkpoint.load_model(tmp_path / "ref.pt")  # width 32 is no named size: heads unknown
    loaded, info = checkpoint.load_model(tmp_path / "ref.pt", num_heads=2)
    assert info["layout"] == "reference" and info["config"]["image_size"] == 16
    assert loaded.routing == src.routing and loaded.top_k == src.top_k and loaded.input_size == 16
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 400, 999]), torch.tensor([1, 2, 3])
    torch.testing.assert_close(loaded(x, t, y), src(x, t, y), rtol=0, atol=0)
    # A bare state dict (how released checkpoints ship) loads too.
    torch.save(ema_sd, tmp_path / "bare.pt")
    bare, _ = checkpoint.load_model(tmp_path / "bare.pt", num_heads=2)
    torch.testing.assert_close(bare(x, t, y), src(x, t, y), rtol=0, atol=0)


def test_infer_model_kwargs_of_a_named_size():
    sd = official_state_dict(models.create("Switch-DiT-S/8", input_size=32, num_classes=1000))
    kw = checkpoint.infer_model_kwargs(sd)
    assert kw == {
        "name": "Switch-DiT-S/8",
        "input_size": 32,
        "in_channels": 4,
        "num_classes": 1000,
        "learn_sigma": True,
        "num_timesteps": 1000,
        "num_experts": 3,
        "top_k": 2,
    }


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        checkpoint.load_model(tmp_path / "junk.pt")
    torch.save({"model": {"a": torch.zeros(1)}}, tmp_path / "noema.pt")
    with pytest.raises(ValueError, match="no 'ema' weights"):
        checkpoint.load_model(tmp_path / "noema.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a switch-dit training checkpoint nor a DiT-family"):
        checkpoint.load_model(tmp_path / "foreign.pt")


# -- the command ------------------------------------------------------------------


def cli(*argv):
    from switch_dit.cli import main

    return main([*map(str, argv), "--no-progress", "--device", "cpu"])


def test_sample_command_grid_uses_the_runs_sampler(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    assert (
        cli(
            "sample",
            "--ckpt",
            tiny_checkpoint,
            "--out",
            tmp_path / "g.png",
            "--sample-steps",
            "2",
            "--classes",
            "1,2",
            "--samples-per-class",
            "3",
        )
        == 0
    )
    printed = capsys.readouterr().out
    # The run sampled with DDIM and guidance 4 (TrainConfig), so does the command by default.
    assert "6 images, 2 classes x 3, EMA weights of step 2, ddim 2 steps, guidance 4.0" in printed
    assert '"sample_accuracy"' in printed and '"frechet_distance"' in printed
    with Image.open(tmp_path / "g.png") as img:
        assert img.size == (3 * 34 + 2, 2 * 34 + 2)  # 3 columns, 2 rows of 16 px digits at 2x, 2 px gaps


def test_sample_command_npz_set_resumes(tiny_checkpoint, tmp_path, capsys):
    args = (
        "sample",
        "--ckpt",
        tiny_checkpoint,
        "--npz",
        tmp_path / "set",
        "--num-samples",
        "12",
        "--batch-size",
        "5",
        "--sample-method",
        "ddpm",
        "--sample-steps",
        "2",
        "--cfg-scale",
        "1",
        "--no-eval",
    )
    assert cli(*args) == 0
    images, labels = sampling.read_npz(tmp_path / "set" / "samples_12x16x16x3.npz")
    assert images.shape == (12, 16, 16, 3) and labels.shape == (12,)
    capsys.readouterr()
    (tmp_path / "set" / "shards" / "shard-000001.npz").unlink()
    assert cli(*args) == 0
    assert "2 of its 3 shards already written, kept" in capsys.readouterr().out
    assert np.array_equal(sampling.read_npz(tmp_path / "set" / "samples_12x16x16x3.npz")[0], images)


def test_sample_command_reads_the_reference_layout(tmp_path, capsys):
    torch.save({"ema": official_state_dict(tiny_model())}, tmp_path / "ref.pt")
    assert (
        cli(
            "sample",
            "--ckpt",
            tmp_path / "ref.pt",
            "--num-heads",
            "2",
            "--sample-steps",
            "3",
            "--samples-per-class",
            "1",
            "--out",
            tmp_path / "g.png",
            "--no-eval",
        )
        == 0
    )
    # No run settings in a reference checkpoint: the paper's sampler (DDPM) and guidance 1.5.
    assert "10 images, 10 classes x 1, EMA weights of step ?, ddpm 3 steps, guidance 1.5" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--npz", "x"], "--npz needs --num-samples"),
        (["--num-samples", "5"], "--num-samples needs --npz"),
        (["--classes", "3,10"], "--classes must be in [0, 10)"),
        (["--classes", "a"], "--classes: must be comma-separated integers"),
        (["--sample-method", "rk4"], "--sample-method: invalid choice"),
        (["--sample-method", "euler"], "method must be 'ddpm' or 'ddim'"),  # euler/heun: rectified-flow models
    ],
)
def test_sample_command_bad_arguments(tiny_checkpoint, extra, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli("sample", "--ckpt", tiny_checkpoint, *extra)
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_sample_command_latent_model_without_diffusers(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    torch.save(official_state_dict(tiny_model(in_channels=4, input_size=8)), tmp_path / "latent.pt")
    with pytest.raises(SystemExit) as exc:
        cli("sample", "--ckpt", tmp_path / "latent.pt", "--num-heads", "2")
    assert exc.value.code == 1 and "pip install diffusers" in capsys.readouterr().err


def test_torchrun_two_ranks_write_the_same_set(tiny_checkpoint, tmp_path):
    """Two real processes (gloo, CPU) under torchrun: each writes its shards, rank 0 merges after
    the barrier, and the set equals the one-process set."""
    import os
    import shutil
    import signal
    import subprocess

    import torch.distributed as dist

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None or not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torchrun or the gloo backend is not available")
    common = [
        "--ckpt",
        str(tiny_checkpoint),
        "--num-samples",
        "9",
        "--batch-size",
        "3",
        "--sample-method",
        "ddim",
        "--sample-steps",
        "2",
        "--no-eval",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert cli("sample", "--npz", tmp_path / "one", *common[:-3]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own process group: on a timeout the workers go down with torchrun.
    proc = subprocess.Popen(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "switch_dit.cli",
            "sample",
            "--npz",
            str(tmp_path / "two"),
            *common,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish in 120 s")
    assert proc.returncode == 0, err[-2000:]
    one = sampling.read_npz(tmp_path / "one" / "samples_9x16x16x3.npz")
    two = sampling.read_npz(tmp_path / "two" / "samples_9x16x16x3.npz")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


# -- the captured sampling step ---------------------------------------------------


def _graph_on_the_cpu(calls):
    """A stand-in for sampling._capture_graph that runs on the CPU: "replay" calls the function
    again on the same input buffers and writes into the same output buffer, as a CUDA graph does."""

    def capture(fn, tensors, constants):
        calls.append((fn.__name__, constants))
        inputs = [a.clone() for a in tensors]
        output = fn(*inputs, **constants)

        class Graph:
            def replay(self):
                output.copy_(fn(*inputs, **constants))

        return Graph(), inputs, output

    return capture


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_captured_step_replays_the_models_step(model, cfg_scale, monkeypatch):
    """The step as the sampler calls it (one 0-d timestep, the labels, the guidance scale) is
    captured once and replayed from its buffers; the samples equal the eager ones."""
    from switch_dit import diffusion

    calls = []
    monkeypatch.setattr(sampling, "_capture_graph", _graph_on_the_cpu(calls))
    process = sampling.sampling_diffusion("ddim", 4)
    eager = diffusion.sample(
        model,
        process,
        LABELS,
        cfg_scale=cfg_scale,
        method="ddim",
        clip_denoised=True,
        generator=torch.Generator().manual_seed(1),
    )
    step = sampling.CapturedStep(model)
    assert diffusion.accepts_shared_timestep(step) and diffusion.accepts_shared_timestep(step.forward_with_cfg)
    replayed = diffusion.sample(
        step,
        process,
        LABELS,
        cfg_scale=cfg_scale,
        method="ddim",
        clip_denoised=True,
        generator=torch.Generator().manual_seed(1),
    )
    assert calls == [("forward", {})] if cfg_scale == 1.0 else calls == [("forward_with_cfg", {"cfg_scale": 3.0})]
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)


def test_capture_needs_cuda(model):
    with pytest.raises(ValueError, match="capture needs CUDA"):
        sampling.generate(model, LABELS, steps=2, capture=True)
    # None (the default) is eager on the CPU: the same samples as capture=False.
    torch.testing.assert_close(
        sampling.generate(model, LABELS, method="ddim", steps=2),
        sampling.generate(model, LABELS, method="ddim", steps=2, capture=False),
    )


def test_sample_command_flags_parse():
    from switch_dit.cli import build_parser

    args = build_parser().parse_args(["sample", "--ckpt", "x"])
    assert args.capture is None and args.tf32 is True
    args = build_parser().parse_args(["sample", "--ckpt", "x", "--no-capture", "--no-tf32"])
    assert args.capture is False and args.tf32 is False
    assert build_parser().parse_args(["eval", "s.npz", "--no-tf32"]).tf32 is False


def test_tf32_follows_the_flag(monkeypatch):
    """set_tf32 flips the two process-wide flags on CUDA devices and leaves the CPU alone; the
    conftest fixture restores them after the test."""
    cuda = torch.device("cuda", 0)  # the flags are plain settings: no GPU needed to set them
    distributed.set_tf32(cuda, True)
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    distributed.set_tf32(cuda, False)
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    distributed.set_tf32(torch.device("cpu"), True)
    assert torch.get_float32_matmul_precision() == "highest"


def test_sample_command_sets_tf32_as_asked(tiny_checkpoint, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(distributed, "set_tf32", lambda device, enabled=True: seen.append((device.type, enabled)))
    assert (
        cli(
            "sample",
            "--ckpt",
            tiny_checkpoint,
            "--out",
            tmp_path / "g.png",
            "--sample-steps",
            "2",
            "--samples-per-class",
            "1",
            "--no-eval",
            "--no-tf32",
        )
        == 0
    )
    assert (
        cli(
            "sample",
            "--ckpt",
            tiny_checkpoint,
            "--out",
            tmp_path / "h.png",
            "--sample-steps",
            "2",
            "--samples-per-class",
            "1",
            "--no-eval",
        )
        == 0
    )
    assert seen == [("cpu", False), ("cpu", True)]


def test_capture_by_default_only_for_models_built_for_it(model):
    """On CUDA, None captures models with accepts_shared_timestep (fixed shapes, sync-free step);
    a model without it (DiffMoE's data-dependent expert choice) runs eagerly unless asked."""

    class Plain(torch.nn.Module):
        pass

    assert sampling.capture_by_default(model, torch.device("cuda", 0))
    assert not sampling.capture_by_default(Plain(), torch.device("cuda", 0))
    assert not sampling.capture_by_default(model, torch.device("cpu"))
