"""Without a GPU, run the Triton kernels under the interpreter on CPU tensors.

This must happen before anything imports triton (the kernels read the flag at import),
so it lives here, ahead of every test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _full_fp32():
    """fp32 matmuls and convolutions in full fp32 on a GPU for every test (the float32
    tolerances assume it; cuDNN allows TF32 by default), restored afterwards: the
    trainer turns TF32 on for its runs."""
    matmul, conv = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = conv


@pytest.fixture
def one_thread():
    """One torch thread for the test. Tiny models on a shared 2-core machine: one thread is
    ~50x faster than two fighting other processes for the cores (OpenMP spin-waits)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


TINY_RUN_STEPS = 2


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The final checkpoint.pt of a finished `switch-dit train` run (a tiny Switch-DiT-S/4, width
    32, depth 2, on the 16x16 digits, ``TINY_RUN_STEPS`` steps), whose EMA weights are then
    replaced by random ones: a trained-for-two-steps model (zero-initialised experts and final
    layer) would make every sample the same function of the noise. Treat it as read-only."""
    pytest.importorskip("sklearn")
    from switch_dit import checkpoint
    from switch_dit.config import TrainConfig
    from switch_dit.train import train

    out = tmp_path_factory.mktemp("tiny-run")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            train(
                TrainConfig(
                    model="Switch-DiT-S/4",
                    hidden_size=32,
                    depth=2,
                    num_heads=2,
                    steps=TINY_RUN_STEPS,
                    batch_size=8,
                    device="cpu",
                    out=str(out),
                    sample=False,
                    progress=False,
                    compile="none",
                ),
                log=lambda *a, **k: None,
            )
            path = out / "checkpoint.pt"
            state = checkpoint.load_checkpoint(path)
            ema = checkpoint.model_from_checkpoint(state)
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in ema.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            state["ema"] = ema.state_dict()
            checkpoint.atomic_save(state, path)  # replaces the link to checkpoints/ckpt-*.pt, not that file
    finally:
        torch.set_num_threads(saved)
    return path


# ------------------------------------------------------------------ the gpu marker and the test extra

HAS_CUDA = torch.cuda.is_available()
# The `test` extra of pyproject.toml: the trainer, checkpoint, resume, metrics and figure tests
# need them. In CI (CI=true) a missing one fails the run instead of skipping those tests.
TEST_EXTRA = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "yaml": "pyyaml", "PIL": "pillow"}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip without a CUDA device (``make gpu`` selects them with -m gpu)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu; run by make gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def pytest_sessionstart(session):
    import importlib.util

    missing = [pkg for mod, pkg in TEST_EXTRA.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    message = (
        f"the test extra is incomplete: {', '.join(missing)} missing (pip install -e '.[test]'); "
        "the tests that need them are skipped"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.exit(
            f"CI: {message.split(';')[0]}: refusing to skip the trainer, checkpoint and resume tests", returncode=1
        )
    session.config.issue_config_time_warning(pytest.PytestWarning(message), stacklevel=2)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Every test starts from its own seed, a hash of its id: random inputs that a test draws
    without a generator of its own reproduce when it runs alone, in any order, or with -k."""
    import random
    import zlib

    import numpy as np

    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    yield
