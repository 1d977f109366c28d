"""DiffMoE in the trainer: flow objective, capacity loss, thresholds in checkpoints and resume,
and the thresholds' all-reduce over two gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from switch_dit import checkpoint as ck
from switch_dit import distributed
from switch_dit.config import TrainConfig
from tests.gloo import cpu_rank, free_port
from tests.tiny_run import TINY_TRAIN, quiet, records

# The shared tiny run as a DiffMoE flow model.
TINY = dict(TINY_TRAIN, model="DiffMoE-S/4", objective="flow", num_experts=4)


def test_config_objective():
    assert TrainConfig(**TINY).sample_method == "euler"
    assert TrainConfig(model="DiffMoE-S/4").num_experts == 16  # the published E
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(**{**TINY, "objective": "magic"})
    for name in ("DiT-S/4", "DTR-S/4", "Switch-DiT-S/4", "Remix-DiT-S/4"):  # every family (tests/test_flow.py)
        assert TrainConfig(**{**TINY, "model": name}).objective == "flow"
    with pytest.raises(ValueError, match="'euler' or 'heun'"):
        TrainConfig(**{**TINY, "sample_method": "ddim"})
    assert TrainConfig(**{**TINY, "objective": "diffusion"}).sample_method == "ddim"


def test_flow_loss_carries_the_capacity_loss():
    from switch_dit.flow import RectifiedFlow
    from switch_dit.models import create
    from switch_dit.train import forward_backward

    torch.manual_seed(0)
    model = create(
        "DiffMoE-S/4", input_size=8, in_channels=1, num_classes=10, hidden_size=16, depth=2, num_heads=2, num_experts=4
    ).double()
    net = distributed.TrainingModule(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=g), torch.randint(0, 10, (4,), generator=g)
    t = torch.rand(4, dtype=torch.float64, generator=g)
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=g)
    parts = forward_backward(net, RectifiedFlow(lambda_dp=1.0), x, y, None, t=t, noise=noise)
    aux = model.aux_loss()
    torch.testing.assert_close(parts["prior"], aux.float())
    torch.testing.assert_close(parts["loss"], parts["mse"] + aux.float())
    assert model.blocks[1].mlp.capacity_predictor[0].weight.grad.abs().sum() > 0  # the predictor learns
    assert all((layer.expert_threshold > 0).all() for layer in model.moe_layers())


def test_train_checkpoint_resume_with_thresholds(tmp_path):
    pytest.importorskip("sklearn")
    from switch_dit.train import train

    cfg = dict(TINY, steps=4, ckpt_every=2)
    train(TrainConfig(**cfg, out=str(tmp_path / "a")), log=quiet)
    step2 = tmp_path / "a" / "checkpoints" / "ckpt-00000002.pt"
    train(TrainConfig(**cfg, out=str(tmp_path / "b")), log=quiet, resume=str(step2))
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert len(a) == 4 and b == a[2:]
    assert all(r["prior"] > 0 for r in a)  # the capacity loss is in the step's loss
    s2, s4 = ck.load_checkpoint(step2), ck.load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    t2, t4 = s2["model"]["blocks.1.mlp.expert_threshold"], s4["model"]["blocks.1.mlp.expert_threshold"]
    assert t2.shape == (4,) and (t2 > 0).all() and not torch.equal(t2, t4)
    t4b = ck.load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]["blocks.1.mlp.expert_threshold"]
    assert torch.equal(t4, t4b)  # the resumed run's thresholds continue exactly


def _tiny_model():
    from switch_dit.models import create

    torch.manual_seed(0)
    return create(
        "DiffMoE-S/4",
        input_size=8,
        in_channels=1,
        num_classes=10,
        hidden_size=16,
        depth=2,
        num_heads=2,
        num_experts=4,
        class_dropout_prob=0.0,
    )


def _rank_batch(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g), torch.randint(0, 10, (3,), generator=g)


def _ddp_worker(rank, world, port, tmp):
    with cpu_rank(rank, world, port) as ctx:
        net = distributed.wrap(_tiny_model(), ctx, "ddp")
        for _ in range(2):
            out, aux = net(*_rank_batch(rank))
            (out.square().mean() + aux).backward()
        model = distributed.unwrap(net)
        torch.save([layer.expert_threshold.clone() for layer in model.moe_layers()], os.path.join(tmp, f"thr{rank}.pt"))


def test_two_gloo_ranks_share_thresholds(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    thr0, thr1 = torch.load(tmp_path / "thr0.pt"), torch.load(tmp_path / "thr1.pt")
    for a, b in zip(thr0, thr1):
        assert torch.equal(a, b)
    # Each step averages the ranks' EMA updates, and averaging is linear: with the parameters
    # unchanged (no optimizer step), two steps on two ranks give the mean of the two ranks'
    # thresholds computed alone.
    singles = []
    for rank in range(2):
        model = _tiny_model().train()
        for _ in range(2):
            model(*_rank_batch(rank))
        singles.append([layer.expert_threshold.clone() for layer in model.moe_layers()])
    for i, a in enumerate(thr0):
        assert not torch.equal(singles[0][i], singles[1][i])
        torch.testing.assert_close(a, (singles[0][i] + singles[1][i]) / 2, rtol=1e-6, atol=1e-7)


def test_compare_row_and_activated_params():
    from switch_dit.compare import FAMILIES, CompareConfig, _train_config
    from switch_dit.models import count_params, create

    fam = FAMILIES["DiffMoE"]
    cfg = CompareConfig(families=("DiT", "DiffMoE"), steps=2, eval_every=1)
    tc = _train_config(cfg, fam, 0, __import__("pathlib").Path("/tmp/unused"))
    assert (tc.model, tc.objective, tc.num_experts, tc.sample_method) == ("DiffMoE-S/4", "flow", 16, "euler")
    with torch.device("meta"):
        dense = count_params(create("DiT-S/2", hidden_size=64, depth=2, num_heads=4))
        moe = create("DiffMoE-S/2", hidden_size=64, depth=2, num_heads=4, interleave=False)
        n = count_params(moe)
    # Activated = the dense DiT plus, per MoE layer, the gate and the capacity predictor.
    extra = 2 * (16 * 64 + (64 * 64 + 64) + (64 * 16 + 16))
    assert n["activated"] == dense["total"] + extra and n["total"] > n["activated"]


def test_dit_trains_with_flow(tmp_path):
    """Plain DiT with the flow objective: float t accepted, integer t refused, a run completes."""
    pytest.importorskip("sklearn")
    from switch_dit.models import create
    from switch_dit.train import train

    dit = create(
        "DiT-S/4", input_size=8, in_channels=1, num_classes=10, hidden_size=16, depth=2, num_heads=2, objective="flow"
    )
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    assert dit(x, torch.tensor([0.0, 0.99]), y).shape == (2, 2, 8, 8)
    with pytest.raises(ValueError, match="floating-point"):
        dit(x, torch.tensor([3, 4]), y)
    cfg = dict(TINY, model="DiT-S/4", steps=2, sample=True, samples_per_class=1, sample_steps=2)
    summary = train(TrainConfig(**cfg, out=str(tmp_path / "dit")), log=lambda *a, **k: None)
    assert summary["steps"] == 2 and all(r["loss"] > 0 for r in records(tmp_path / "dit"))


def test_capacity_and_interleave_from_the_command_line(tmp_path):
    """`switch-dit train --capacity --no-interleave` reaches the model, its checkpoint rebuilds it,
    and bad values (or the flags on another family) are refused by name."""
    pytest.importorskip("sklearn")
    from switch_dit.cli import main
    from tests.tiny_run import TINY_TRAIN_ARGS

    with pytest.raises(ValueError, match="capacity"):
        TrainConfig(**{**TINY, "capacity": 0.0})
    with pytest.raises(ValueError, match="capacity and interleave apply to DiffMoE models only"):
        TrainConfig(**{**TINY, "model": "DiT-S/4", "interleave": False})
    out = tmp_path / "run"
    argv = ["train", *TINY_TRAIN_ARGS, "--model", "DiffMoE-S/4", "--objective", "flow", "--num-experts", "4"]
    argv += ["--capacity", "0.5", "--no-interleave", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    model = ck.model_from_checkpoint(ck.load_checkpoint(out / "checkpoint.pt"), device="cpu")
    assert model.capacity == 0.5 and model.moe_blocks == [0, 1]  # depth 2, every block
    assert all(r["prior"] > 0 for r in records(out))
