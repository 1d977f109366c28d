"""The denoising-path figure (data and PNG), the loss curves and the optional matplotlib."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from switch_dit import figures, models, prior
from tests.tiny_run import TINY_TRAIN

TINY = dict(input_size=16, in_channels=1, num_classes=10, hidden_size=32, depth=3, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def switch_model(top_k=2, seed=0):
    torch.manual_seed(seed)
    model = models.create("Switch-DiT-S/4", top_k=top_k, **TINY)
    with torch.no_grad():  # gates that vary with t (at init every gate is one linear of t_emb)
        for router in model.routers:
            router.f_gate[1].weight.normal_(0, 1.0)
            router.f_gate[1].bias.zero_()
    return model.eval()


@pytest.mark.parametrize("top_k", [1, 2])
def test_path_data_equals_the_models_topk_sets(top_k):
    model = switch_model(top_k)
    paths = figures.denoising_paths(model)
    T, N, M = paths.shape
    assert (T, N, M) == (1000, 3, 3)
    # What the model routes a batch of every timestep to, block by block.
    with torch.no_grad():
        idx, weights = model.route(model.t_embedder(torch.arange(T)))  # (N, T, k)
    for n in range(N):
        used = torch.zeros(T, M).scatter_(1, idx[n], 1.0)
        assert torch.equal(paths.w_gate[:, n], used)
    assert paths.experts(500, 1) == sorted(idx[1, 500].tolist())
    assert (paths.w_gate.sum(-1) == top_k).all()
    torch.testing.assert_close(paths.gate_probs.gather(-1, idx.permute(1, 0, 2)), weights.permute(1, 0, 2))
    assert all(len({tuple(paths.experts(t, n)) for t in range(T)}) > 1 for n in range(N))  # gates switch over t


def test_matched_prior_is_the_optimal_column_permutation():
    model = switch_model()
    paths = figures.denoising_paths(model)
    T, N, M = paths.shape
    w_prior = model.w_prior
    assert sorted(paths.match.tolist()) == list(range(N * M))
    assert torch.equal(paths.w_prior.reshape(T, N * M), w_prior[:, paths.match])
    cost = prior.matching_cost(paths.w_gate.reshape(T, N * M), w_prior)
    assert paths.mismatch == pytest.approx(float(cost[torch.arange(N * M), paths.match].sum()))
    assert paths.mismatch <= float(cost.trace())  # no worse than the identity pairing
    # Every row of the prior keeps k*N ones after the permutation.
    assert (paths.w_prior.sum((1, 2)) == model.top_k * N).all()


def test_paths_need_a_switch_model():
    with pytest.raises(ValueError, match="Switch-DiT"):
        figures.denoising_paths(models.create("DiT-S/4", **TINY))


def test_paths_png_and_recorder(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    model = switch_model()
    png = figures.plot_denoising_paths(figures.denoising_paths(model), tmp_path / "paths.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 600
    with pytest.raises(TypeError, match="PathData"):
        figures.plot_denoising_paths({"w_gate": 1}, tmp_path / "x.png")
    recorder = figures.PathRecorder(every=2, out_dir=tmp_path / "live")
    written = [recorder(model, step) for step in range(1, 6)]
    assert [w is not None for w in written] == [False, True, False, True, False]
    assert sorted(p.name for p in (tmp_path / "live").iterdir()) == ["paths-0000002.png", "paths-0000004.png"]
    with pytest.raises(ValueError, match="every"):
        figures.PathRecorder(every=0, out_dir=tmp_path)


def test_training_draws_the_emas_paths_every_k_steps(tmp_path):
    """`figure_every` K: figures/paths-<step>.png at steps K, 2K, ... of the run."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from switch_dit.config import TrainConfig
    from switch_dit.train import train

    out = tmp_path / "run"
    cfg = TrainConfig(**dict(TINY_TRAIN, log_every=2), steps=4, figure_every=2, out=str(out))
    train(cfg, log=lambda *a: None)
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["paths-0000002.png", "paths-0000004.png"]
    with Image.open(out / "figures" / "paths-0000004.png") as img:
        assert img.format == "PNG" and img.size[0] > 600
    with pytest.raises(ValueError, match="figure_every must be 0 for DiT-S/4"):
        TrainConfig(model="DiT-S/4", figure_every=10)
    with pytest.raises(ValueError, match="figure_every must be a non-negative integer"):
        TrainConfig(figure_every=-1)


def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return path


def test_read_log_columns_and_errors(tmp_path):
    log = write_log(
        tmp_path / "log.jsonl",
        [
            {"step": 25, "loss": 0.9, "mse": 0.8, "vb": 0.05, "prior": 0.05, "lr": 1e-3},
            {"step": 50, "loss": 0.5, "mse": 0.45, "vb": 0.04},
        ],
    )
    cols = figures.read_log(log)
    assert cols["step"] == [25.0, 50.0] and cols["mse"] == [0.8, 0.45]
    assert cols["prior"][0] == 0.05 and cols["prior"][1] != cols["prior"][1]  # missing -> NaN
    with pytest.raises(FileNotFoundError, match="does not exist"):
        figures.read_log(tmp_path / "none.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        figures.read_log(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        figures.read_log(tmp_path / "empty.jsonl")


def test_loss_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    log = write_log(
        tmp_path / "log.jsonl",
        [{"step": s, "loss": 1 / s, "mse": 0.9 / s, "vb": 0.1, "prior": 0.0} for s in range(1, 20)],
    )
    with Image.open(figures.plot_loss_curves(log, tmp_path / "loss.png")) as img:
        assert img.format == "PNG"
    with pytest.raises(ValueError, match="loss columns"):
        figures.plot_loss_curves({"step": [1.0], "lr": [0.1]}, tmp_path / "x.png")


def test_missing_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    paths = figures.denoising_paths(switch_model())  # the data needs no matplotlib
    with pytest.raises(ImportError, match="pip install matplotlib"):
        figures.plot_denoising_paths(paths, tmp_path / "p.png")
    with pytest.raises(ImportError, match="pip install matplotlib"):
        figures.plot_loss_curves({"step": [1.0], "loss": [1.0]}, tmp_path / "l.png")
    with pytest.raises(ImportError, match="pip install matplotlib"):
        figures.PathRecorder(every=1, out_dir=tmp_path)


# -- the command ------------------------------------------------------------------


def test_figure_command_draws_a_runs_paths_and_losses(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import shutil

    from switch_dit.cli import main

    shutil.copyfile(tiny_checkpoint, tmp_path / "checkpoint.pt")  # a Switch-DiT of depth 2 with 3 experts
    write_log(
        tmp_path / "log.jsonl", [{"step": s, "loss": 1 / s, "mse": 1 / s, "vb": 0.1, "prior": 0.01} for s in (1, 2, 3)]
    )
    assert main(["figure", "--run", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "paths.png (2 blocks x 3 experts over 1000 timesteps" in printed and "loss.png" in printed
    assert (tmp_path / "paths.png").is_file() and (tmp_path / "loss.png").is_file()
    # A DiT has no experts: said, not drawn.
    dit = models.create("DiT-S/4", **TINY)
    from switch_dit.interop import official_state_dict

    torch.save(official_state_dict(dit), tmp_path / "dit.pt")
    assert main(["figure", "--ckpt", str(tmp_path / "dit.pt"), "--num-heads", "2", "--out", str(tmp_path / "d")]) == 0
    assert "no denoising paths" in capsys.readouterr().out


def test_figure_command_errors(tmp_path, capsys, monkeypatch):
    from switch_dit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["figure"])
    assert exc.value.code == 2 and "nothing to draw" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["figure", "--run", str(tmp_path / "missing")])
    assert exc.value.code == 2 and "is not a folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exc:
        main(["figure", "--log", str(tmp_path / "log.jsonl")])
    assert exc.value.code == 1 and "pip install matplotlib" in capsys.readouterr().err
