"""switch_dit.routing: the routing-plan op (C++/CUDA extension and PyTorch fallback) against
the argsort reference, bad input, fake tensors / torch.compile, autograd, CUDA (skipped
without a GPU)."""

import os
import subprocess
import sys

import pytest
import torch

from switch_dit import _extension, routing
from switch_dit.routing import RoutingPlan, block_routing, num_tiles, plan, reference_plan

requires_ext = pytest.mark.skipif(
    not _extension.available(), reason=f"switch_dit._C not built: {_extension.load_error}"
)
requires_cuda = pytest.mark.gpu

EXT_OP = getattr(torch.ops.switch_dit, "routing_plan", None) if _extension.available() else None
TORCH_OP = torch.ops.switch_dit.routing_plan_torch


def gate_table(N, T, M, dtype=torch.float32, device="cpu", gen=None):
    """Random softmax gate table (N, T, M)."""
    logits = torch.randn(N, T, M, generator=gen, dtype=torch.float64) * 2
    return logits.softmax(-1).to(dtype).to(device)


def assert_plan_equal(a: RoutingPlan, b: RoutingPlan):
    for name in RoutingPlan._fields:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        torch.testing.assert_close(x.cpu(), y.cpu(), rtol=0, atol=0, equal_nan=True, msg=name)


def assert_consistent(p: RoutingPlan, gate_probs, timesteps, k, seq_len, block_l):
    """Invariants every plan with valid timesteps satisfies, independent of the reference."""
    N, T, M = gate_probs.shape
    B, P = timesteps.shape[0], timesteps.shape[0] * k
    nlt = -(-seq_len // block_l)
    assert p.tiles.shape == (num_tiles(N, B, k, seq_len, block_l), 4)
    assert torch.equal(p.counts.sum(1), torch.full((N,), P))
    assert torch.equal(p.offsets[:, 1:] - p.offsets[:, :-1], p.counts)
    ranks = torch.arange(P).expand(N, P)
    assert torch.equal(p.position.gather(1, p.order), ranks)
    flat = p.topk_idx.reshape(N, P)
    experts = flat.gather(1, p.order)
    assert (experts[:, 1:] >= experts[:, :-1]).all()  # grouped by expert
    same = experts[:, 1:] == experts[:, :-1]
    assert (p.order[:, 1:] > p.order[:, :-1])[same].all()  # stable
    w = gate_probs[:, timesteps].gather(-1, p.topk_idx)
    assert torch.equal(w, p.topk_w)
    tiles = p.tiles.reshape(N, P, nlt, 4).long()
    assert torch.equal(tiles[..., routing.TILE_BLOCK], torch.arange(N)[:, None, None].expand(N, P, nlt))
    assert torch.equal(tiles[..., routing.TILE_EXPERT], experts[:, :, None].expand(N, P, nlt))
    assert torch.equal(tiles[..., routing.TILE_SAMPLE], (p.order // k)[:, :, None].expand(N, P, nlt))
    assert torch.equal(tiles[..., routing.TILE_TOKEN], (torch.arange(nlt) * block_l).expand(N, P, nlt))


def poison_allocator(like: RoutingPlan, device):
    """Free garbage-filled tensors of the plan's sizes, so that an allocator that reuses
    blocks hands them to the op: an element it forgets to write then shows."""
    junk = [
        torch.full(x.shape, float("nan") if x.is_floating_point() else -77, dtype=x.dtype, device=device) for x in like
    ]
    del junk


CASES = [  # N, T, M, B, k, seq_len, block_l
    (2, 10, 3, 7, 2, 10, 4),  # seq_len not a multiple of block_l
    (3, 50, 5, 1, 2, 16, 16),  # B = 1
    (2, 20, 4, 33, 4, 5, 8),  # k = M, one token block
    (1, 8, 8, 300, 3, 0, 64),  # no tile schedule
    (28, 1000, 3, 1024, 2, 64, 32),  # XL depth, big batch
]


@pytest.mark.parametrize("N,T,M,B,k,seq_len,block_l", CASES)
@pytest.mark.parametrize("op", ["ext", "torch"])
def test_matches_reference(op, N, T, M, B, k, seq_len, block_l):
    if op == "ext" and EXT_OP is None:
        pytest.skip("switch_dit._C not built")
    gen = torch.Generator().manual_seed(N * 1000 + B)
    g = gate_table(N, T, M, gen=gen)
    t = torch.randint(0, T, (B,), generator=gen)
    fn = EXT_OP if op == "ext" else TORCH_OP
    want = reference_plan(g, t, k, seq_len, block_l)
    poison_allocator(want, "cpu")
    got = RoutingPlan(*fn(g, t, k, seq_len, block_l, False))
    assert_plan_equal(got, want)
    assert_consistent(got, g, t, k, seq_len, block_l)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    g = gate_table(4, 30, 6, dtype=dtype)
    t = torch.randint(0, 30, (50,))
    p = plan(g, t, 3, seq_len=9, block_l=4)
    assert p.topk_w.dtype == dtype
    assert_plan_equal(p, reference_plan(g, t, 3, 9, 4))
    assert_consistent(p, g, t, 3, 9, 4)


def test_exact_ties_go_to_lower_index():
    # Values from {0, 1/4, 1/2}: most rows hold exact ties, in every dtype.
    gen = torch.Generator().manual_seed(1)
    g = torch.randint(0, 3, (5, 40, 6), generator=gen).float() / 4
    g[0, :] = 0.25  # a block where every expert ties
    t = torch.randint(0, 40, (64,), generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        p = plan(g.to(dtype), t, 4, seq_len=3, block_l=2)
        assert_plan_equal(p, reference_plan(g.to(dtype), t, 4, 3, 2))
        assert_consistent(p, g.to(dtype), t, 4, 3, 2)
    assert torch.equal(p.topk_idx[0], torch.arange(4).expand(64, 4))
    # Hand-checked row: [1/2, 1/4, 1/2, 1/2] -> 0, 2, 3 then 1.
    row = torch.tensor([[[0.5, 0.25, 0.5, 0.5]]])
    assert plan(row, torch.zeros(1, dtype=torch.long), 4).topk_idx.flatten().tolist() == [0, 2, 3, 1]


def test_nan_ranks_first_like_torch_sort():
    g = gate_table(2, 6, 5)
    g[0, 1, 3] = float("nan")
    g[1, 2, [1, 4]] = float("nan")
    t = torch.arange(6)
    assert_plan_equal(plan(g, t, 3), reference_plan(g, t, 3))
    assert plan(g, t, 1).topk_idx[0, 1, 0] == 3


def test_expert_without_sample_and_all_on_one_expert():
    g = gate_table(3, 12, 4)
    g[0, :, 3] = 0.0  # block 0: expert 3 never chosen with k = 2 (others > 0)
    g[1, :, 2] = 2.0  # block 1: expert 2 always first
    t = torch.randint(0, 12, (17,))
    p = plan(g, t, 2, seq_len=4, block_l=4)
    assert_plan_equal(p, reference_plan(g, t, 2, 4, 4))
    assert p.counts[0, 3] == 0 and p.offsets[0, 3] == p.offsets[0, 4]
    assert p.counts[1, 2] == 17
    q = plan(g, t, 1)  # k = 1: every sample of block 1 on expert 2, the others empty
    assert q.counts[1].tolist() == [0, 0, 17, 0]
    assert q.order[1].tolist() == list(range(17))


def test_block_routing_views():
    g = gate_table(4, 10, 3)
    t = torch.randint(0, 10, (6,))
    p = plan(g, t, 2)
    idx, w = block_routing(p, 2)
    assert idx.shape == (6, 2) and w.shape == (6, 2)
    assert idx.data_ptr() == p.topk_idx[2].data_ptr()  # a view, no copy
    assert torch.equal(w, g[2, t].gather(-1, idx))
    with pytest.raises(IndexError, match="block must be in"):
        block_routing(p, 4)


def test_dropped_samples_in_reference():
    # What CUDA gives for out-of-range timesteps when the check is off.
    g = gate_table(2, 10, 3)
    t = torch.tensor([3, 10, 0, -1, 9])
    p = reference_plan(g, t, 2, 5, 4)
    assert (p.topk_idx[:, [1, 3]] == -1).all() and (p.topk_w[:, [1, 3]] == 0).all()
    assert (p.position.reshape(2, 5, 2)[:, [1, 3]] == -1).all()
    assert torch.equal(p.counts.sum(1), torch.tensor([6, 6]))
    assert (p.order[:, 6:] == -1).all() and (p.order[:, :6] >= 0).all()
    tiles = p.tiles.reshape(2, 10, 2, 4)
    assert (tiles[:, 6:] == -1).all() and (tiles[:, :6] >= 0).all()
    valid = torch.tensor([0, 2, 4])
    q = reference_plan(g, t[valid], 2)
    assert torch.equal(p.topk_idx[:, valid], q.topk_idx)


def _bad_inputs():
    g = gate_table(2, 10, 3)
    t = torch.randint(0, 10, (4,))
    ok = dict(gate_probs=g, timesteps=t, top_k=2, seq_len=8, block_l=4)
    cases = [
        (dict(gate_probs=g[0]), ValueError, "gate_probs must have shape"),
        (dict(gate_probs=g.to(torch.int32)), TypeError, "gate_probs must be float32"),
        (dict(gate_probs=g.transpose(0, 1)), ValueError, "gate_probs must be contiguous"),
        (dict(gate_probs=g[:, :0]), ValueError, "at least one timestep"),
        (dict(timesteps=t[None]), ValueError, "timesteps must have shape"),
        (dict(timesteps=t.int()), TypeError, "timesteps must be int64"),
        (dict(timesteps=torch.arange(8)[::2]), ValueError, "timesteps must be contiguous"),
        (dict(timesteps=torch.tensor([0, 10])), ValueError, r"timesteps must lie in \[0, T\)"),
        (dict(timesteps=torch.tensor([-1, 3])), ValueError, r"timesteps must lie in \[0, T\)"),
        (dict(top_k=0), ValueError, "top_k must be in"),
        (dict(top_k=4), ValueError, "top_k must be in"),
        (dict(seq_len=-1), ValueError, "seq_len must be"),
        (dict(block_l=0), ValueError, "block_l must be"),
    ]
    return [({**ok, **change}, exc, msg) for change, exc, msg in cases]


@pytest.mark.filterwarnings("ignore::switch_dit._extension.ExtensionFallbackWarning")
@pytest.mark.parametrize("path", ["ext", "torch"])
def test_bad_input_raises_naming_the_argument(path, monkeypatch):
    if path == "ext" and EXT_OP is None:
        pytest.skip("switch_dit._C not built")
    if path == "torch":
        monkeypatch.setattr(routing, "_EXT_DEVICES", frozenset())
    for kwargs, exc, msg in _bad_inputs():
        args = [kwargs[n] for n in ("gate_probs", "timesteps", "top_k")]
        with pytest.raises(exc, match=msg):
            plan(*args, seq_len=kwargs["seq_len"], block_l=kwargs["block_l"])
    with pytest.raises(TypeError, match="gate_probs must be a torch.Tensor"):
        plan([[0.5, 0.5]], torch.zeros(1, dtype=torch.long), 1)


def test_fallback_warning_names_the_reason(monkeypatch):
    if not _extension.available():
        pytest.skip("the extension-missing warning was given at import")
    monkeypatch.setattr(routing, "_EXT_DEVICES", frozenset({"cuda"}))
    monkeypatch.setattr(_extension, "_warned", False)
    g, t = gate_table(1, 4, 2), torch.tensor([1, 3])
    with pytest.warns(_extension.ExtensionFallbackWarning, match="no kernel for device 'cpu'"):
        p = plan(g, t, 1)
    assert_plan_equal(p, reference_plan(g, t, 1))


def test_check_default_follows_the_project_switch(monkeypatch):
    from switch_dit import _checks

    monkeypatch.setattr(_checks, "_value_checks_on_device", True)
    assert routing._default_check() is True
    monkeypatch.setattr(_checks, "_value_checks_on_device", False)
    assert routing._default_check() is False


def test_device_mismatch_raises():
    g, t = gate_table(1, 4, 2), torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="timesteps must be on the device of gate_probs"):
        routing._check_args(g, t, 1, 0, 1)


@pytest.mark.parametrize("op", ["ext", "torch"])
def test_opcheck(op):
    if op == "ext" and EXT_OP is None:
        pytest.skip("switch_dit._C not built")
    fn = EXT_OP if op == "ext" else TORCH_OP
    g = gate_table(3, 10, 4, dtype=torch.float64)
    t = torch.randint(0, 10, (5,))
    torch.library.opcheck(fn, (g, t, 2, 7, 4, False))
    # opcheck's aot-dispatch test sums all outputs into the first (int64) one, which fails
    # for float outputs after integer ones; the other checks still run with gradients.
    torch.library.opcheck(
        fn,
        (g.requires_grad_(), t, 2, 7, 4, False),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        g = torch.empty(28, 1000, 3, dtype=torch.bfloat16)
        t = torch.empty(256, dtype=torch.long)
        p = plan(g, t, 2, seq_len=256, block_l=64)
    assert p.topk_idx.shape == (28, 256, 2) and p.topk_w.dtype == torch.bfloat16
    assert p.counts.shape == (28, 3) and p.offsets.shape == (28, 4)
    assert p.order.shape == p.position.shape == (28, 512)
    assert p.tiles.shape == (num_tiles(28, 256, 2, 256, 64), 4) and p.tiles.dtype == torch.int32


@pytest.mark.parametrize("force_torch", [False, True])
def test_compile_fullgraph(force_torch, monkeypatch):
    if force_torch:
        monkeypatch.setattr(routing, "_EXT_DEVICES", frozenset())
    torch._dynamo.reset()

    def step(g, t):
        p = plan(g, t, 2, seq_len=6, block_l=4)
        idx, w = block_routing(p, 1)
        return p.tiles, p.order, idx, w * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    g, t = gate_table(3, 10, 3), torch.randint(0, 10, (5,))
    for a, b in zip(compiled(g, t), step(g, t)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["ext", "torch"])
def test_topk_w_gradient(op):
    if op == "ext" and EXT_OP is None:
        pytest.skip("switch_dit._C not built")
    fn = EXT_OP if op == "ext" else TORCH_OP
    gen = torch.Generator().manual_seed(3)
    g = gate_table(2, 6, 4, dtype=torch.float64, gen=gen).requires_grad_()
    t = torch.tensor([1, 4, 1, 0, 5, 1, 4])  # repeated timesteps add into one row
    assert torch.autograd.gradcheck(lambda x: fn(x, t, 2, 0, 1, False)[1], (g,))
    # Against autograd through a gather with the same indices.
    weights = torch.randn(2, 7, 2, dtype=torch.float64, generator=gen)
    p = RoutingPlan(*fn(g, t, 2, 0, 1, False))
    (grad,) = torch.autograd.grad((p.topk_w * weights).sum(), g)
    (want,) = torch.autograd.grad((g[:, t].gather(-1, p.topk_idx) * weights).sum(), g)
    assert torch.allclose(grad, want, rtol=0, atol=1e-15)


def test_fallback_warns_once_when_extension_disabled():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    from switch_dit import routing, _extension\n"
        "    g = torch.rand(2, 5, 3); t = torch.tensor([0, 4])\n"
        "    for _ in range(3): p = routing.plan(g, t, 2, seq_len=4, block_l=2)\n"
        "n = sum(issubclass(w.category, _extension.ExtensionFallbackWarning) for w in seen)\n"
        "assert not _extension.available() and routing._EXT_DEVICES == frozenset()\n"
        "q = routing.reference_plan(g, t, 2, 4, 2)\n"
        "assert all(torch.equal(a, b) for a, b in zip(p, q))\n"
        "print('warnings', n)\n"
    )
    env = {**os.environ, _extension.DISABLE_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "warnings 1" in out.stdout


# ---- CUDA (the GPU machine); skipped cleanly elsewhere -----------------------------------------


@requires_cuda
def test_cuda_kernel_is_registered():
    if not _extension.available():
        pytest.skip("switch_dit._C not built")
    assert "cuda" in routing._EXT_DEVICES, "switch_dit._C was built without its CUDA kernel"


@requires_cuda
@pytest.mark.parametrize("N,T,M,B,k,seq_len,block_l", CASES + [(28, 1000, 8, 4099, 2, 256, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(N, T, M, B, k, seq_len, block_l, dtype):
    gen = torch.Generator().manual_seed(B)
    g = gate_table(N, T, M, dtype=dtype, gen=gen)
    g[:, ::3, 1] = g[:, ::3, 0]  # exact ties in a third of the rows
    t = torch.randint(0, T, (B,), generator=gen)
    want = reference_plan(g, t, k, seq_len, block_l)
    g, t = g.cuda(), t.cuda()
    poison_allocator(want, "cuda")
    got = plan(g, t, k, seq_len=seq_len, block_l=block_l)
    assert got.tiles.is_cuda
    assert_plan_equal(got, want)


@requires_cuda
def test_cuda_opcheck():
    if EXT_OP is None:
        pytest.skip("switch_dit._C not built")
    g = gate_table(3, 10, 4, device="cuda")
    t = torch.randint(0, 10, (5,), device="cuda")
    torch.library.opcheck(EXT_OP, (g, t, 2, 7, 4, False))


@requires_cuda
def test_cuda_timestep_check_and_dropped_samples():
    g = gate_table(3, 10, 4, device="cuda")
    t = torch.tensor([2, 10, 5, -3, 9], device="cuda")
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, T\)"):
        plan(g, t, 2, check=True)
    p = plan(g, t, 2, seq_len=5, block_l=2, check=False)  # no read out of bounds, samples dropped
    assert_plan_equal(p, reference_plan(g.cpu(), t.cpu(), 2, 5, 2))


@requires_cuda
def test_cuda_no_host_sync_and_graph_capture():
    g = gate_table(28, 1000, 3, device="cuda")
    t = torch.randint(0, 1000, (256,), device="cuda")
    plan(g, t, 2, seq_len=256, block_l=64)  # warm-up (allocator, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = plan(g, t, 2, seq_len=256, block_l=64, check=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        plan(g, t, 2, seq_len=256, block_l=64, check=False)
        with torch.cuda.graph(graph, stream=stream):
            q = plan(g, t, 2, seq_len=256, block_l=64, check=False)
    t.copy_(torch.randint(0, 1000, (256,), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert_plan_equal(q, reference_plan(g.cpu(), t.cpu(), 2, 256, 64))
    assert not torch.equal(p.topk_idx, q.topk_idx)


@requires_cuda
def test_cuda_compile_fullgraph_inductor():
    torch._dynamo.reset()

    def step(g, t):
        p = plan(g, t, 2, seq_len=16, block_l=8)
        return p.topk_w.float().sum(-1), p.tiles

    g, t = gate_table(4, 20, 3, device="cuda"), torch.randint(0, 20, (9,), device="cuda")
    got = torch.compile(step, fullgraph=True)(g, t)
    for a, b in zip(got, step(g, t)):
        assert torch.equal(a, b)


def _toolkit_matches_torch():
    import re
    import shutil

    nvcc = shutil.which("nvcc")
    if not nvcc or torch.version.cuda is None or os.environ.get("SWITCH_DIT_BUILD_CUDA", "1") == "0":
        return False
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.", out)
    return bool(found) and found.group(1) == torch.version.cuda.split(".")[0]


@pytest.mark.skipif(not _toolkit_matches_torch(), reason="no CUDA toolkit matching torch's CUDA here")
def test_extension_was_compiled_with_its_cuda_kernel():
    """CI's compile check: with nvcc and a CUDA build of torch, the install built the CUDA kernel
    (sm_80 and sm_90) too, even on a machine without a GPU."""
    assert _extension.available(), "switch_dit._C did not build"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("switch_dit::routing_plan", "CUDA")
    if os.environ.get("TORCH_CUDA_ARCH_LIST") is None:  # the default architectures are embedded
        import importlib.util

        binary = open(importlib.util.find_spec("switch_dit._C").origin, "rb").read()
        assert b"sm_80" in binary and b"sm_90" in binary
