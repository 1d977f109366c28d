"""The digits demo: data, the quality classifier, the train/sample commands and their errors."""

from __future__ import annotations

import json

import pytest
import torch

from switch_dit import data as digits
from switch_dit.checkpoint import load_checkpoint, model_from_checkpoint
from switch_dit.cli import main
from switch_dit.config import TrainConfig
from switch_dit.distributed import resolve_device
from switch_dit.evaluate import DigitsClassifier, sample_accuracy
from switch_dit.train import ema_decay_at, lr_at, update_ema
from tests.tiny_run import TINY_TRAIN

pytest.importorskip("sklearn")

# A model small enough that a few steps take about a second on one CPU core.
TINY = ["--model", "Switch-DiT-S/4", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--device", "cpu"]
# The `switch-dit train` run of the tiny_run fixture, less its sampling and output flags.
TINY_RUN = ["train", *TINY, "--steps", "6", "--batch-size", "16", "--log-every", "2", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def splits():
    return digits.load_digits(size=16)


@pytest.fixture(scope="module")
def classifier(splits):
    return DigitsClassifier().fit(splits[0])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny end-to-end `switch-dit train`, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run")
    argv = [*TINY_RUN, "--sample-steps", "3", "--samples-per-class", "2", "--out", str(out)]
    assert main(argv) == 0
    return out


# -- data ----------------------------------------------------------------------


def test_digits_shapes_ranges_and_split(splits):
    train, test = splits
    assert train.images.shape[1:] == (1, 16, 16) and test.images.shape[1:] == (1, 16, 16)
    assert len(train) + len(test) == 1797  # every digit, no overlap by construction
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.images.min() >= -1.0 and train.images.max() <= 1.0
    assert train.images.min() == -1.0 and train.images.max() == 1.0  # the whole range is used
    # Stratified: every class in both splits in about the same proportion.
    assert torch.bincount(test.labels, minlength=10).min() >= 30
    assert set(train.labels.tolist()) == set(range(10))


def test_digits_split_is_fixed_and_sizes_work():
    a, _ = digits.load_digits(size=16)
    b, _ = digits.load_digits(size=16)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    small, _ = digits.load_digits(size=8)
    assert small.images.shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="size"):
        digits.load_digits(size=4)


def test_batches_cover_an_epoch_and_follow_the_generator(splits):
    train = splits[0]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    it1, it2 = digits.batches(train, 100, g1), digits.batches(train, 100, g2)
    seen = []
    for _ in range(len(train) // 100):
        (x1, y1), (x2, y2) = next(it1), next(it2)
        assert x1.shape == (100, 1, 16, 16) and torch.equal(y1, y2) and torch.equal(x1, x2)
        seen.append(y1)
    # One epoch without repeats: the label histogram is that of a subset of the training set.
    counts = torch.bincount(torch.cat(seen), minlength=10)
    assert (counts <= torch.bincount(train.labels, minlength=10)).all()
    with pytest.raises(ValueError, match="batch_size"):
        next(digits.batches(train, len(train) + 1, g1))


# -- the quality classifier ------------------------------------------------------


def test_classifier_recognises_real_held_out_digits(splits, classifier):
    assert classifier.accuracy(splits[1].images, splits[1].labels) > 0.95


def test_classifier_is_at_chance_on_noise(classifier):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2000, 1, 16, 16, generator=g) * 2 - 1
    requested = torch.arange(10).repeat(200)
    acc = sample_accuracy(classifier, noise, requested)
    assert 0.05 < acc["accuracy"] < 0.15
    assert sorted(acc["per_class"]) == list(range(10))


def test_classifier_rejects_wrong_shapes(classifier):
    with pytest.raises(ValueError, match="images"):
        classifier.predict(torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="labels"):
        classifier.accuracy(torch.zeros(3, 1, 16, 16), torch.zeros(4, dtype=torch.int64))


# -- training pieces ---------------------------------------------------------------


def test_lr_warmup_and_ema_decay():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3) and lr_at(500, cfg) == 1e-3
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10**6, 0.999) == 0.999


def test_update_ema_moves_towards_the_model():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    before = a.weight.detach().clone()
    update_ema(a, b, 0.75)
    assert torch.allclose(a.weight, 0.75 * before + 0.25 * b.weight)
    update_ema(a, b, 0.0)
    assert torch.equal(a.weight, b.weight)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="cfg_scale"):
        TrainConfig(cfg_scale=0.5)
    with pytest.raises(ValueError, match="sample_method"):
        TrainConfig(sample_method="euler")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")


# -- the commands ----------------------------------------------------------------------


def test_train_writes_a_well_formed_run(tiny_run):
    for name in ("config.json", "log.jsonl", "checkpoint.pt", "samples.png", "metrics.json"):
        assert (tiny_run / name).is_file(), name
    records = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert {"loss", "mse", "vb", "prior", "lr", "steps_per_sec", "elapsed_s"} <= set(r)
        assert all(isinstance(r[k], float) and r[k] == r[k] for k in ("loss", "mse", "vb", "prior"))
        assert r["loss"] == pytest.approx(r["mse"] + r["vb"] + r["prior"], rel=1e-4)

    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert 0.0 <= metrics["sample_accuracy"] <= 1.0 and metrics["classifier_test_accuracy"] > 0.95
    assert metrics["num_samples"] == 20

    from PIL import Image

    img = Image.open(tiny_run / "samples.png")
    # One row per digit class, --samples-per-class columns; 16 px digits shown at 32 px with 2 px gaps.
    assert img.mode == "L" and img.size == (2 * 34 + 2, 10 * 34 + 2)
    ckpt = load_checkpoint(tiny_run / "checkpoint.pt")
    assert ckpt["step"] == 6 and ckpt["config"]["seed"] == 3
    model = model_from_checkpoint(ckpt)
    assert model.hidden_size == 32 and model.depth == 2 and not model.training


def test_train_is_deterministic_for_a_seed(tiny_run, tmp_path):
    argv = [*TINY_RUN, "--no-sample", "--out", str(tmp_path)]
    assert main(argv) == 0
    a = load_checkpoint(tiny_run / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "checkpoint.pt")
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert not (tmp_path / "samples.png").exists()


def test_sample_command(tiny_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = [
        "sample",
        "--ckpt",
        str(tiny_run / "checkpoint.pt"),
        "--out",
        str(out),
        "--sample-steps",
        "2",
        "--samples-per-class",
        "1",
        "--sample-method",
        "ddpm",
        "--cfg-scale",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert out.is_file()
    printed = capsys.readouterr().out
    assert "EMA weights of step 6" in printed and "sample_accuracy" in printed


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--steps", "0"], "--steps: must be a positive integer"),
        (["train", "--steps", "ten"], "--steps: must be a positive integer"),
        (["train", "--lr", "-1"], "--lr: must be a positive finite number"),
        (["train", "--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["train", "--model", "Switch-DiT-M/2"], "--model: unknown model"),
        (["train", "--cfg-scale", "0.5"], "--cfg-scale: must be a number >= 1"),
        (["train", "--sample-method", "rk4"], "--sample-method: invalid choice"),
        (["train", "--top-k", "4"], "--top-k (4) must not exceed --num-experts (3)"),
        (["train", "--device", "cuda:7" if not torch.cuda.is_available() else "tpu"], "device"),
        (["train", "--batch-size", "5000", "--no-progress"], "batch_size must be <= 1438"),
        (["sample"], "--ckpt"),
        (["sample", "--ckpt", "/nonexistent/checkpoint.pt"], "does not exist"),
        ([], "required: {train,extract-latents,sample,eval,figure,compare}"),
    ],
)
def test_bad_arguments_give_clear_errors(argv, needle, capsys, tmp_path):
    if argv[:1] == ["train"]:
        argv = [*argv, "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_sample_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(bogus)])
    assert "not a switch-dit training checkpoint" in capsys.readouterr().err


# -- compile ---------------------------------------------------------------------------------


def test_compile_mode_by_device():
    from switch_dit.train import compile_mode

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compile_mode("auto", cpu) is None and compile_mode("auto", cuda) == "default"
    assert compile_mode("none", cuda) is None and compile_mode("max-autotune", cpu) == "max-autotune"
    with pytest.raises(ValueError, match="compile must be 'auto' or 'none' or 'default' or 'max-autotune'"):
        TrainConfig(compile="fast")
    args = ["train", "--compile", "max-autotune", "--no-tf32"]
    from switch_dit.cli import build_parser

    parsed = build_parser().parse_args(args)
    assert parsed.compile == "max-autotune" and parsed.tf32 is False


def test_compiled_training_matches_eager(tmp_path, monkeypatch, one_thread):
    """--compile default traces the model's forward (here with dynamo's "eager" backend: the graph
    capture without Inductor's code generation, seconds instead of a minute on a CPU). The losses
    equal the eager run's, the prior stays outside the graph, and the checkpoint's keys are the
    plain model's."""
    import switch_dit.train as train_mod

    compiled = []
    real = train_mod.compile_model

    def traced(model, mode):
        compiled.append(mode)
        return real(model, mode, backend="eager")

    monkeypatch.setattr(train_mod, "compile_model", traced)
    tiny = dict(TINY_TRAIN, steps=3)
    train_mod.train(TrainConfig(**tiny, out=str(tmp_path / "eager"), compile="none"), log=lambda *a, **k: None)
    train_mod.train(TrainConfig(**tiny, out=str(tmp_path / "compiled"), compile="default"), log=lambda *a, **k: None)
    assert compiled == ["default"]

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    assert losses("compiled") == losses("eager")
    a, b = (
        load_checkpoint(tmp_path / "eager" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "compiled" / "checkpoint.pt"),
    )
    assert a["model"].keys() == b["model"].keys()
    assert b["config"]["compile"] == "default"


def test_warm_up_keeps_the_fused_ops_in_one_graph(one_thread, monkeypatch):
    """The fused ops are custom ops: a traced forward is one graph, once their kernel modules
    are imported (warm_up, before compiling; dynamo breaks the graph at an import)."""
    from switch_dit.models import create
    from switch_dit.ops import dispatch
    from switch_dit.train import warm_up

    monkeypatch.setattr(dispatch, "_KERNELS", {})  # as in a fresh process: no kernel module loaded yet
    torch._dynamo.reset()
    model = create(
        "Switch-DiT-S/4",
        input_size=16,
        in_channels=1,
        num_classes=10,
        hidden_size=32,
        depth=2,
        num_heads=2,
        backend="triton",
    ).train()
    warm_up(model, 4)
    assert model.training
    x, t, y = torch.randn(4, 1, 16, 16), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    explained = torch._dynamo.explain(model)(x, t, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
