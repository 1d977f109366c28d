"""Several processes on the CPU (gloo): DDP and FSDP2 gradients equal one process's over
the same global batch (the prior loss included), torchrun training, and checkpoints
that move between world sizes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from switch_dit import distributed
from switch_dit.distributed import ShardedBatchSampler
from tests.gloo import cpu_rank, free_port
from tests.tiny_run import TINY_TRAIN, TINY_TRAIN_ARGS

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(input_size=8, in_channels=2, num_classes=5, hidden_size=16, depth=2, num_heads=2, backend="reference")
GLOBAL_BATCH = 6


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)
    t = torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, y, t, noise


def _model(lambda_dp=1.0):
    from switch_dit.models import create

    torch.manual_seed(0)
    model = create("Switch-DiT-S/4", **TINY).double()
    model.y_embedder.dropout_prob = 0.0  # label dropout would draw different masks on each rank
    with torch.no_grad():  # experts start at zero: give them weights so that every path carries gradient
        for r in model.routers:
            r.experts.w.normal_(0, 0.05)
            r.experts.b.normal_(0, 0.05)
    return model


def _grads(net, lambda_dp, x, y, t, noise):
    from switch_dit.diffusion import create_diffusion
    from switch_dit.train import forward_backward

    diffusion = create_diffusion(learn_sigma=True, lambda_dp=lambda_dp)
    prior_gen = torch.Generator().manual_seed(7)  # the same on every rank: the same tie-breaking
    parts = forward_backward(net, diffusion, x, y, None, prior_gen, t=t, noise=noise)
    model = distributed.unwrap(net)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads, float(parts["loss"])


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    """Rank ``rank`` of 2: gradients under DDP and FSDP, then for each a 4-step run and a
    resume of its step-2 checkpoint (one process group for all of it: start-up is slow)."""
    from switch_dit.config import TrainConfig
    from switch_dit.train import train

    tmp = Path(tmp)
    with cpu_rank(rank, world, port) as ctx:
        x, y, t, noise = _batch()
        b = GLOBAL_BATCH // world
        sl = slice(rank * b, (rank + 1) * b)
        for parallel in ("ddp", "fsdp"):
            net = distributed.wrap(_model(), ctx, parallel)
            grads, _ = _grads(net, 1.0, x[sl], y[sl], t[sl], noise[sl])
            if rank == 0:
                torch.save(grads, tmp / f"grads-{parallel}.pt")
            full = tmp / f"{parallel}-full"
            # Clipping at 0.2 (gradient norms here are ~0.4): FSDP's clip must act on the global norm.
            # Under FSDP the path figure gathers the sharded EMA (a collective on every rank).
            figure_every = 2 if parallel == "fsdp" and importlib.util.find_spec("matplotlib") else 0
            train(
                TrainConfig(
                    **TINY_TRAIN,
                    parallel=parallel,
                    steps=4,
                    ckpt_every=2,
                    grad_clip=0.2,
                    out=str(full),
                    figure_every=figure_every,
                ),
                log=lambda *a: None,
            )
            train(
                TrainConfig(
                    **TINY_TRAIN, parallel=parallel, steps=4, grad_clip=0.2, out=str(tmp / f"{parallel}-again")
                ),
                log=lambda *a: None,
                resume=str(full / "checkpoints" / "ckpt-00000002.pt"),
            )


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, free_port(), str(tmp)), nprocs=2, join=True)
    return tmp


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_gradients(parallel, two_ranks):
    got = torch.load(two_ranks / f"grads-{parallel}.pt", weights_only=True)
    x, y, t, noise = _batch()
    want, _ = _grads(distributed.TrainingModule(_model()), 1.0, x, y, t, noise)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-13, msg=name)
    # The comparison sees the prior: without it, the gate weights' gradients differ.
    no_prior, _ = _grads(distributed.TrainingModule(_model(), with_prior=False), 0.0, x, y, t, noise)
    gate = "routers.0.f_gate.1.weight"
    assert not torch.allclose(no_prior[gate], want[gate], rtol=1e-6)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_resume_exactly_and_in_one_process(parallel, two_ranks, tmp_path):
    """2 ranks resumed from step 2 repeat steps 3-4 exactly; one process continues the run."""
    from switch_dit.checkpoint import load_checkpoint
    from switch_dit.config import TrainConfig
    from switch_dit.train import train

    full, again = two_ranks / f"{parallel}-full", two_ranks / f"{parallel}-again"
    a, b = _losses(full), _losses(again)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    assert all(a[s] == b[s] for s in (3, 4)), (a, b)
    ck = load_checkpoint(full / "checkpoints" / "ckpt-00000002.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]["ranks"]) == 2 and ck["parallel"] == parallel
    assert not any(k.startswith(("module.", "model.", "_orig_mod.")) for k in ck["model"])
    assert not any(k.startswith(("module.", "model.")) for k in ck["ema"])

    if parallel == "fsdp" and importlib.util.find_spec("matplotlib"):
        assert sorted(p.name for p in (full / "figures").iterdir()) == ["paths-0000002.png", "paths-0000004.png"]
    if parallel == "fsdp":  # FSDP2 computes what DDP computes (up to the order of sums)
        d, f = load_checkpoint(two_ranks / "ddp-full" / "checkpoint.pt"), load_checkpoint(full / "checkpoint.pt")
        for key in d["ema"]:
            torch.testing.assert_close(f["ema"][key], d["ema"][key], rtol=1e-4, atol=1e-6, msg=key)
        records = {
            p: [json.loads(line) for line in (two_ranks / f"{p}-full" / "log.jsonl").read_text().splitlines()]
            for p in ("ddp", "fsdp")
        }
        for rd, rf in zip(records["ddp"], records["fsdp"]):
            assert rf["loss"] == pytest.approx(rd["loss"], rel=1e-4)
            assert rf["grad_norm"] == pytest.approx(rd["grad_norm"], rel=1e-4)

    # One process continues the 2-rank run: same weights, same data position, fresh noise.
    messages = []
    four = load_checkpoint(full / "checkpoint.pt")
    cfg = TrainConfig(**{**four["config"], "steps": 5, "out": str(tmp_path / "single"), "parallel": "ddp"})
    train(cfg, log=messages.append, resume=str(full))
    assert any("resumed from" in m and "ckpt-00000004.pt" in m for m in messages), messages
    assert any("written by 2 process(es), this run has 1" in m for m in messages), messages
    one = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    assert one["step"] == 5 and one["data"]["position"] == four["data"]["position"] + 1
    assert one["data"]["epoch"] == four["data"]["epoch"]


def test_training_module_computes_the_prior_in_forward():
    model = _model()
    net = distributed.TrainingModule(model)
    x, y, t, _ = _batch()
    out, prior = net(x, t, y, torch.Generator().manual_seed(7))
    assert out.shape == (GLOBAL_BATCH, 4, 8, 8)
    torch.testing.assert_close(prior, model.prior_loss(t, generator=torch.Generator().manual_seed(7)))
    _, zero = distributed.TrainingModule(model, with_prior=False)(x, t, y)
    assert zero.item() == 0.0


def test_sampler_is_sharded_resumable_and_world_size_free():
    one = ShardedBatchSampler(20, 6, seed=3)
    ranks = [ShardedBatchSampler(20, 6, rank=r, world_size=2, seed=3) for r in range(2)]
    seen = []
    for _ in range(7):  # past two epoch boundaries (3 batches per epoch, tail of 2 dropped)
        whole = next(one)
        parts = [next(s) for s in ranks]
        assert torch.equal(torch.cat(parts), whole)
        seen.append(whole)
    assert len(set(torch.cat(seen[:3]).tolist())) == 18  # no repeats within an epoch
    assert not torch.equal(torch.cat(seen[:3]), torch.cat(seen[3:6]))  # a new order each epoch
    state = one.state_dict()
    resumed = ShardedBatchSampler(20, 6, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed), next(one))
    with pytest.raises(ValueError, match="batch_size changed|data or batch size changed"):
        ShardedBatchSampler(20, 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be divisible by the number of processes \(4\)"):
        ShardedBatchSampler(20, 6, world_size=4)
    with pytest.raises(ValueError, match="batch_size must be <= 20"):
        ShardedBatchSampler(20, 21)


def _torchrun(args, nproc=2, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        "-m",
        "switch_dit.train",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}


def test_torchrun_entry_point(tmp_path):
    """`torchrun -m switch_dit.train` (DDP by default); its checkpoint reads in one process."""
    from switch_dit.checkpoint import load_checkpoint, model_from_checkpoint

    r = _torchrun([*TINY_TRAIN_ARGS, "--steps", "2", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) on cpu (ddp)" in r.stdout
    assert r.stdout.count("run folder") == 1  # rank 0 alone speaks
    assert "Warning" not in r.stderr, r.stderr[-3000:]  # e.g. DDP's broadcast_buffers FutureWarning of torch 2.14
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["world_size"] == 2 and ck["step"] == 2
    model_from_checkpoint(ck)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
