"""Checkpoints: atomic files, the newest complete one, RNG states, the reference layout,
exact resume after SIGKILL and SIGTERM, and non-finite losses."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from switch_dit import checkpoint
from switch_dit.config import TrainConfig
from tests.tiny_run import TINY_TRAIN, TINY_TRAIN_ARGS, quiet, records

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]


# -- files ---------------------------------------------------------------------------


def test_atomic_save_and_newest_complete(tmp_path):
    for step in (3, 6, 9):
        checkpoint.atomic_save(
            {"format": checkpoint.FORMAT, "model_kwargs": {}, "model": {}, "ema": {}, "step": step},
            checkpoint.checkpoint_path(tmp_path, step),
        )
    assert not list(tmp_path.glob("*.tmp"))
    # What a crash in the middle of a save leaves: a temporary file, never a final name.
    (tmp_path / "ckpt-00000012.pt.tmp").write_bytes(b"half a checkpoint")
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [9, 6, 3]
    # A final name holding a damaged file (copied by hand, a full disk): skipped, said.
    (tmp_path / "ckpt-00000015.pt").write_bytes(checkpoint.checkpoint_path(tmp_path, 9).read_bytes()[:100])
    said = []
    path, state = checkpoint.latest_checkpoint(tmp_path, said.append)
    assert path.name == "ckpt-00000009.pt" and state["step"] == 9
    assert "skipping unreadable checkpoint" in said[0] and "ckpt-00000015.pt" in said[0]
    assert [p.name for p in checkpoint.prune_checkpoints(tmp_path, 2)] == ["ckpt-00000006.pt", "ckpt-00000003.pt"]
    assert checkpoint.latest_checkpoint(tmp_path / "none") is None
    with pytest.raises(ValueError, match="not a switch-dit training checkpoint"):
        torch.save({"weights": 1}, tmp_path / "x.pt")
        checkpoint.load_checkpoint(tmp_path / "x.pt")


def test_rng_states_round_trip():
    g = torch.Generator().manual_seed(5)
    state = checkpoint.capture_rng({"g": g})
    draws = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    buf = __import__("io").BytesIO()
    torch.save(state, buf)  # what a checkpoint holds must load with weights_only
    buf.seek(0)
    checkpoint.restore_rng(torch.load(buf, weights_only=True), {"g": g})
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1] and draws[2] == again[2]
    assert torch.equal(draws[3], again[3])
    with pytest.raises(ValueError, match="no state for the 'other' generator"):
        checkpoint.restore_rng(state, {"other": torch.Generator()})


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from switch_dit.train import train

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(**TINY_TRAIN, steps=4, ckpt_every=2, keep_checkpoints=1, out=str(out)), log=quiet)
    return out


def test_run_folder_checkpoints(short_run):
    assert [p.name for _, p in checkpoint.list_checkpoints(short_run / "checkpoints")] == ["ckpt-00000004.pt"]
    state = checkpoint.load_checkpoint(short_run / "checkpoint.pt")
    assert state["step"] == 4 and state["format"] == checkpoint.FORMAT
    assert {"model", "ema", "opt", "scaler", "rng", "data", "config", "train_state"} <= set(state)
    assert len(state["rng"]["ranks"]) == 1 and state["data"]["position"] == 4
    assert json.loads((short_run / "config.json").read_text()) == state["config"]
    header = (short_run / "log.csv").read_text().splitlines()[0]
    assert header.startswith("step,loss,mse,vb,prior,lr,grad_norm,steps_per_sec,images_per_sec")


def test_reference_layout(short_run, tmp_path):
    from switch_dit.interop import load_official

    state = checkpoint.load_checkpoint(short_run / "checkpoint.pt")
    ref = checkpoint.export_reference(state, tmp_path / "ref.pt")
    assert set(ref) == {"model", "ema", "opt", "args"} and "prior._unit_mapping" in ref["model"]
    loaded = torch.load(tmp_path / "ref.pt", weights_only=True)
    for source in (loaded, state):  # the exported file, and our own checkpoint as it is
        model = checkpoint.model_from_checkpoint(state)  # the right architecture, then overwritten
        for p in model.parameters():
            p.data.zero_()
        load_official(model, source, ema=True)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state["ema"][k]), k


# -- non-finite losses ---------------------------------------------------------------------------------


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import switch_dit.train as train_mod

    real = train_mod.forward_backward
    calls = {"n": 0}
    poisoned = {2, 3}  # 0-based calls: steps 3 and 4

    def flaky(net, diffusion, x, y, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] - 1 in poisoned:
            x = torch.full_like(x, float("nan"))
        return real(net, diffusion, x, y, *args, **kwargs)

    monkeypatch.setattr(train_mod, "forward_backward", flaky)
    said = []
    summary = train_mod.train(TrainConfig(**TINY_TRAIN, steps=6, out=str(tmp_path / "a")), log=said.append)
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    assert sum("step skipped" in m for m in said) == 2
    logged = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in logged] == [False, False, True, True, False, False]
    assert logged[-1]["skipped"] == 2
    state = checkpoint.load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())

    # From step 5 on every loss is NaN: 3 in a row stop the run, with the weights of step 4.
    calls["n"] = 0
    poisoned.clear()
    poisoned.update(range(4, 100))
    with pytest.raises(train_mod.NonFiniteLossError, match="3 steps in a row .* stopped at step 7") as e:
        train_mod.train(
            TrainConfig(**TINY_TRAIN, steps=20, max_bad_steps=3, ckpt_every=4, out=str(tmp_path / "b")), log=quiet
        )
    assert "ckpt-00000007.pt" in str(e.value)
    good = checkpoint.load_checkpoint(tmp_path / "b" / "checkpoints" / "ckpt-00000004.pt")
    last = checkpoint.load_checkpoint(tmp_path / "b" / "checkpoints" / "ckpt-00000007.pt")
    for key in ("model", "ema"):
        for k in good[key]:
            assert torch.equal(good[key][k], last[key][k]), (key, k)


# -- resume ------------------------------------------------------------------------------------------


def test_resume_errors(short_run, tmp_path):
    from switch_dit.train import train

    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.resume_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.resume_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="needs --out"):
        checkpoint.resume_checkpoint("auto", None)
    assert checkpoint.resume_checkpoint("auto", str(tmp_path / "fresh")) is None  # nothing yet: a fresh start
    assert checkpoint.resume_checkpoint(None) is None
    state = checkpoint.load_checkpoint(short_run / "checkpoint.pt")
    changed = TrainConfig(**{**state["config"], "lr": 0.5, "out": str(tmp_path / "c")})
    with pytest.raises(ValueError, match="lr cannot change when resuming"):
        train(changed, log=quiet, resume=str(short_run))
    # Weights without the training state (what `sample` needs, not what a resume needs).
    weights = {k: v for k, v in state.items() if k not in ("rng", "data", "train_state")}
    checkpoint.atomic_save(weights, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="no training state"):
        train(
            TrainConfig(**{**state["config"], "out": str(tmp_path / "w")}),
            log=quiet,
            resume=str(tmp_path / "weights.pt"),
        )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_from_a_copied_run_writes_only_into_the_copy(tmp_path, capsys):
    """A run folder copied, its newest checkpoint truncated, then `switch-dit train --resume
    <copy>`: the bad file is skipped, the run resumes from the one before and continues in the
    copy; the original (named in the checkpoint's config) is not touched, byte for byte."""
    from switch_dit.cli import main
    from switch_dit.train import train

    original, copy = tmp_path / "original", tmp_path / "copy"
    train(TrainConfig(**TINY_TRAIN, steps=4, ckpt_every=2, keep_checkpoints=2, out=str(original)), log=quiet)
    shutil.copytree(original, copy)
    newest = copy / "checkpoints" / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    before = _files(original)
    assert "checkpoints/ckpt-00000002.pt" in before and "checkpoints/ckpt-00000004.pt" in before

    assert main(["train", "--resume", str(copy), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"skipping unreadable checkpoint {newest}" in printed
    assert f"resumed from {copy / 'checkpoints' / 'ckpt-00000002.pt'} at step 2" in printed
    assert _files(original) == before  # not one byte of the original run changed
    rewritten = checkpoint.load_checkpoint(newest)  # whole again, written by the resumed run
    assert rewritten["step"] == 4 and rewritten["config"]["out"] == str(copy)
    assert json.loads((copy / "config.json").read_text())["out"] == str(copy)
    assert checkpoint.load_checkpoint(copy / "checkpoint.pt")["step"] == 4
    # The resumed run repeats steps 3-4 of the original exactly.
    assert records(copy) == records(original)


def test_runs_never_write_over_another_runs_checkpoints(short_run, tmp_path):
    from switch_dit.train import train

    other = tmp_path / "other"
    shutil.copytree(short_run, other)
    before = _files(other)
    with pytest.raises(ValueError, match="holds checkpoints of another run"):
        train(TrainConfig(**TINY_TRAIN, steps=2, out=str(other)), log=quiet)  # a fresh run
    with pytest.raises(ValueError, match="holds checkpoints of another run"):  # a resume into another run's folder
        train(
            TrainConfig(**TINY_TRAIN, steps=4, out=str(other)),
            log=quiet,
            resume=str(short_run / "checkpoints" / "ckpt-00000004.pt"),
        )
    assert _files(other) == before
    checkpoint.check_run_folder(short_run, resumed_from=short_run / "checkpoint.pt")  # its own folder: fine
    checkpoint.check_run_folder(tmp_path / "new")  # a new folder: fine


def test_run_folder_and_find_checkpoint(tmp_path):
    assert checkpoint.run_folder(tmp_path / "run" / "checkpoints" / "ckpt-00000002.pt") == tmp_path / "run"
    assert checkpoint.run_folder(tmp_path / "run" / "checkpoint.pt") == tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt or ckpt-<step>.pt"):
        checkpoint.find_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()  # a run in progress: the trainer's layout
    for step in (5, 7):
        (tmp_path / "checkpoints" / f"ckpt-{step:08d}.pt").write_bytes(b"")
    assert checkpoint.find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "ckpt-00000007.pt"
    for step in (10, 200, 30):
        (tmp_path / f"ckpt-{step:08d}.pt").write_bytes(b"")
    (tmp_path / "ckpt-00000300.pt.tmp").write_bytes(b"")  # an unfinished write is no checkpoint
    assert checkpoint.find_checkpoint(tmp_path).name == "ckpt-00000200.pt"
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert checkpoint.find_checkpoint(tmp_path).name == "checkpoint.pt"
    assert checkpoint.find_checkpoint(tmp_path / "ckpt-00000010.pt").name == "ckpt-00000010.pt"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.find_checkpoint(tmp_path / "missing.pt")


def _start(out: Path, steps: int, *extra) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "switch_dit.train",
        *TINY_TRAIN_ARGS,
        "--steps",
        str(steps),
        "--ckpt-every",
        "3",
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps_logged(out: Path) -> int:
    try:
        return len((out / "log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_killed_and_resumed_runs_match_an_uninterrupted_one(tmp_path):
    """SIGKILL at a random step, or SIGTERM (checkpoint, exit 143), then --resume: the
    same losses, step for step, as a run that never stopped."""
    # ~10 ms a step here: 96 steps leave the polling loop below about a second after the
    # latest kill step (14) before a run could end unkilled, even with the three runs
    # sharing two cores.
    steps = 96
    rng = random.Random()
    # SIGKILL after step 5 is logged: the step-3 checkpoint exists by then (a kill before
    # it would rightly start afresh, which the "new" run below covers).
    kill_at, term_at = rng.randint(5, 14), rng.randint(2, 14)
    ref = _start(tmp_path / "ref", steps)
    killed = _start(tmp_path / "killed", steps)
    termed = _start(tmp_path / "termed", steps)
    pending = {
        killed: (kill_at, signal.SIGKILL, tmp_path / "killed"),
        termed: (term_at, signal.SIGTERM, tmp_path / "termed"),
    }
    deadline = time.time() + 120
    while pending and time.time() < deadline:
        for proc, (at, sig, out) in list(pending.items()):
            if _steps_logged(out) >= at or proc.poll() is not None:
                proc.send_signal(sig)
                del pending[proc]
        time.sleep(0.005)
    outs = {name: p.communicate(timeout=120) for name, p in (("ref", ref), ("killed", killed), ("termed", termed))}
    assert ref.returncode == 0, outs["ref"][1][-2000:]
    assert killed.returncode == -signal.SIGKILL, f"the run ended before the kill at step {kill_at}"
    assert termed.returncode == 143, outs["termed"][1][-2000:]
    assert "SIGTERM: checkpoint of step" in outs["termed"][0]
    stopped = int(outs["termed"][0].split("SIGTERM: checkpoint of step ")[1].split()[0])
    assert (tmp_path / "termed" / "checkpoints" / f"ckpt-{stopped:08d}.pt").is_file()

    resumed = [_start(tmp_path / name, steps, "--resume") for name in ("killed", "termed")]
    fresh = _start(tmp_path / "new", 2, "--resume")  # nothing to resume yet: a fresh start
    for p in resumed:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert "resumed from" in out
    want = records(tmp_path / "ref")
    assert [r["step"] for r in want] == list(range(1, steps + 1))
    for name, at in (("killed", kill_at), ("termed", term_at)):
        got = records(tmp_path / name)
        assert got == want, f"{name} at step {at}: first difference at step " + str(
            next((a["step"] for a, b in zip(want, got) if a != b), None)
        )
    # The same command line serves the first start and every restart after a crash.
    out, err = fresh.communicate(timeout=120)
    assert fresh.returncode == 0 and "starting afresh" in out, err[-2000:]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_clipping_resume_exactly(precision, tmp_path):
    """Autocast (and fp16's grad scaler, whose state is checkpointed) with clipping: a
    resume from step 2 repeats steps 3-4 exactly."""
    from switch_dit.train import train

    cfg = dict(TINY_TRAIN, precision=precision, grad_clip=0.5, steps=4, ckpt_every=2)
    train(TrainConfig(**cfg, out=str(tmp_path / "a")), log=quiet)
    train(
        TrainConfig(**cfg, out=str(tmp_path / "b")),
        log=quiet,
        resume=str(tmp_path / "a" / "checkpoints" / "ckpt-00000002.pt"),
    )
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert b == a[2:] and all(r["loss"] is not None for r in a)
    state = checkpoint.load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0 and all("scale" in r for r in a)
    else:
        assert state["scaler"] is None


def test_fast_path_resume_keeps_the_prior_matching(tmp_path):
    """backend "triton" (the interpreter here): the prior loss's one-step-lagged matching
    is checkpointed with the run, so a resume from step 2 repeats steps 3-4 exactly."""
    from switch_dit.train import train

    cfg = dict(TINY_TRAIN, backend="triton", steps=4, ckpt_every=2)
    train(TrainConfig(**cfg, out=str(tmp_path / "a")), log=quiet)
    step2 = tmp_path / "a" / "checkpoints" / "ckpt-00000002.pt"
    train(TrainConfig(**cfg, out=str(tmp_path / "b")), log=quiet, resume=str(step2))
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert b == a[2:] and len(a) == 4
    state = checkpoint.load_checkpoint(step2)["prior_matcher"]
    U = 2 * 3  # depth x experts
    assert state["perm"].shape == (U,) and state["cost"].shape == (U, U)
    assert sorted(state["perm"].tolist()) == list(range(U))
