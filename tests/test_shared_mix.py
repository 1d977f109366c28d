"""One timestep for the whole batch (switch_dit.ops.shared_mix, models.DiT, the diffusion samplers).

The shared path (one mix of k experts, one dense GEMM) against the per-sample path with every row
of idx/coef equal, at the op level (float64, forward and backward) and at the model level (all
three families, plain and with classifier-free guidance), and the samplers handing the model one
0-d timestep per step.
"""

import pytest
import torch

from switch_dit import diffusion as diffusion_lib
from switch_dit import models
from switch_dit.models import create
from switch_dit.ops.routed_linear import mixed_linear_reference
from switch_dit.ops.shared_mix import mix_experts, shared_expert_mask, shared_mixed_linear
from tests.test_models import randomize


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(B, L, D, Dout, M, idx, seed, bias=True, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=gen, dtype=dtype).requires_grad_()
    w = (torch.randn(M, D, Dout, generator=gen, dtype=dtype) / D**0.5).requires_grad_()
    b = torch.randn(M, Dout, generator=gen, dtype=dtype).requires_grad_() if bias else None
    coef = (torch.rand(len(idx), generator=gen, dtype=dtype) + 0.05).requires_grad_()
    return x, w, b, torch.tensor(idx), coef


@pytest.mark.parametrize(
    "B,L,D,Dout,M,idx",
    [
        (3, 5, 20, 20, 3, [2, 0]),  # dense coefficients (2k >= M), D not a tile multiple
        (2, 4, 12, 16, 10, [7, 2]),  # M > 8, gathered experts (2k < M), rectangular
        (1, 6, 8, 8, 4, [1]),  # B = 1, k = 1
        (3, 3, 8, 8, 3, [2, 1, 0]),  # k = M
        (4, 2, 8, 8, 5, [3, 3]),  # a repeated expert
    ],
)
@pytest.mark.parametrize("add_one", [False, True])
def test_shared_equals_per_sample_float64(B, L, D, Dout, M, idx, add_one):
    x, w, b, idx, coef = make(B, L, D, Dout, M, idx, seed=B + M)
    y = shared_mixed_linear(x, w, b, idx, coef, add_one=add_one)
    y_ref = mixed_linear_reference(x, w, b, idx.expand(B, -1), coef.expand(B, -1), add_one=add_one)
    assert rel(y, y_ref) < 1e-12
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    leaves = (x, w, b, coef)
    for a, r in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, leaves, gy)):
        assert rel(a, r) < 1e-12
    if add_one:
        assert rel(shared_expert_mask(x, w, b, idx, coef), y_ref) < 1e-12


def test_mix_experts_any_layout_and_no_bias():
    """Remix-DiT's bases are (K, out, in): the mix does not care about the layout."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
    idx, coef = torch.tensor([3, 1]), torch.tensor([0.25, 0.5], dtype=torch.float64)
    w_mix, b_mix = mix_experts(w, None, idx, coef)
    assert b_mix is None and torch.allclose(w_mix, 0.25 * w[3] + 0.5 * w[1])


def test_gradcheck_float64():
    x, w, b, idx, coef = make(2, 3, 4, 4, 3, [0, 2], seed=9)
    assert torch.autograd.gradcheck(lambda *a: shared_mixed_linear(*a[:3], idx, a[3], add_one=True), (x, w, b, coef))


def test_autocast_and_dtypes():
    x, w, b, idx, coef = make(2, 3, 16, 16, 3, [1, 2], seed=11, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = shared_mixed_linear(x, w, b, idx, coef)
    assert y.dtype == torch.bfloat16
    y_ref = mixed_linear_reference(
        *(t.detach().double() for t in (x, w, b)), idx.expand(2, -1), coef.detach().double().expand(2, -1)
    )
    assert rel(y, y_ref) < 2e-2
    gx, gw = torch.autograd.grad(y.float().sum(), (x, w))
    assert gx.dtype == gw.dtype == torch.float32


def test_bad_input():
    x, w, b, idx, coef = make(2, 3, 8, 8, 3, [0, 1], seed=13)
    with pytest.raises(ValueError, match="idx must be a"):
        shared_mixed_linear(x, w, b, idx.expand(2, -1), coef)
    with pytest.raises(ValueError, match=r"idx values must be in \[0, 3\)"):
        shared_mixed_linear(x, w, b, idx + 2, coef)
    with pytest.raises(ValueError, match="coef must be"):
        shared_mixed_linear(x, w, b, idx, coef[:1])
    with pytest.raises(ValueError, match=r"weight must have shape \(M, D_in=4, D_out\)"):
        shared_mixed_linear(x[..., :4], w, b, idx, coef)


# ------------------------------------------------------------------------------------- models

TINY = dict(input_size=8, in_channels=3, num_classes=5, hidden_size=24, depth=2, num_heads=2, num_timesteps=50)


def tiny_model(name, seed=0):
    """A float64 model with every parameter random (zero-initialised experts would make m = 1)."""
    return randomize(create(name, **TINY, backend="reference").double().eval(), seed=seed)


def inputs(model, B, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=gen, dtype=torch.float64)
    y = torch.randint(0, model.num_classes, (B,), generator=gen)
    return x, y


@pytest.fixture
def count_shared(monkeypatch):
    calls = []

    def counting(*args):
        calls.append(args[3].shape)
        return shared_expert_mask(*args)

    monkeypatch.setattr(models, "shared_expert_mask", counting)
    return calls


@pytest.mark.parametrize("name", ["Switch-DiT-S/4", "DTR-S/4", "DiT-S/4"])
def test_model_shared_timestep_equals_per_sample(name, count_shared):
    model = tiny_model(name)
    x, y = inputs(model, 4)
    t = 37
    want = model(x, torch.full((4,), t), y)
    for shared_t in (t, torch.tensor(t)):
        assert rel(model(x, shared_t, y), want) < 1e-12
    if name.startswith("Switch"):  # the shared path ran: one (k,) routing per block and call
        assert count_shared == [torch.Size([model.top_k])] * (2 * model.depth)
    half = x[:2]
    xc, yc = torch.cat([half, half]), torch.tensor([1, 3, 5, 5])
    want = model.forward_with_cfg(xc, torch.full((4,), t), yc, 4.0)
    assert rel(model.forward_with_cfg(xc, torch.tensor(t), yc, 4.0), want) < 1e-12


def test_model_shared_timestep_backward():
    model = tiny_model("Switch-DiT-S/4", seed=2)
    x, y = inputs(model, 3)
    loss_shared = model(x, 11, y).square().sum()
    g_shared = torch.autograd.grad(loss_shared, list(model.parameters()), allow_unused=True)
    loss = model(x, torch.full((3,), 11), y).square().sum()
    g = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for a, r in zip(g_shared, g):
        assert (a is None) == (r is None)
        if a is not None:
            assert rel(a, r) < 1e-10


def test_model_bad_shared_timestep():
    model = tiny_model("Switch-DiT-S/4")
    x, y = inputs(model, 2)
    for bad in (50, -1, True):
        with pytest.raises(ValueError, match="t \\(timesteps\\)"):
            model(x, bad, y)
    with pytest.raises(ValueError, match="t \\(timesteps\\)"):
        model(x, torch.tensor(50), y)


# ------------------------------------------------------------------------------------ samplers


def test_samplers_pass_one_timestep_to_models_that_accept_it():
    seen = []

    class Stub(torch.nn.Module):
        accepts_shared_timestep = True

        def forward(self, x, t, y):
            seen.append(tuple(t.shape))
            return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)

    diff = diffusion_lib.create_diffusion("4")
    diff.p_sample_loop(Stub(), (2, 1, 2, 2), {"y": None})
    diff.ddim_sample_loop(Stub(), (2, 1, 2, 2), {"y": None})
    assert seen == [()] * 8
    assert not diffusion_lib.accepts_shared_timestep(lambda x, t, y: x)
    seen.clear()
    plain = Stub()
    plain.accepts_shared_timestep = False
    diff.p_sample_loop(plain, (2, 1, 2, 2), {"y": None})
    assert seen == [(2,)] * 4


def record_timestep_shapes(monkeypatch, cls):
    """Patches ``cls.forward`` (for this test) to record the shape of every call's ``t`` in the
    list it returns: ``()`` for one timestep shared by the batch, ``(B,)`` for one a sample."""
    shapes = []
    forward = cls.forward

    def spy(self, x, t, y):
        shapes.append(tuple(t.shape))
        return forward(self, x, t, y)

    monkeypatch.setattr(cls, "forward", spy)
    return shapes


@pytest.mark.parametrize("method,cfg", [("ddpm", 1.0), ("ddim", 3.0)])
def test_sampling_shared_equals_per_sample(method, cfg, monkeypatch):
    model = tiny_model("Switch-DiT-S/4", seed=4)
    diff = diffusion_lib.create_diffusion("5", diffusion_steps=50)
    y = torch.tensor([0, 4])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    shapes = record_timestep_shapes(monkeypatch, models.DiT)
    gen = torch.Generator().manual_seed(7)
    shared = diffusion_lib.sample(model, diff, y, cfg_scale=cfg, method=method, noise=noise, generator=gen)
    assert shapes == [()] * 5
    monkeypatch.setattr(model, "accepts_shared_timestep", False, raising=False)
    gen = torch.Generator().manual_seed(7)
    per_sample = diffusion_lib.sample(model, diff, y, cfg_scale=cfg, method=method, noise=noise, generator=gen)
    assert shapes[5:] == [(2 if cfg == 1.0 else 4,)] * 5
    assert rel(shared, per_sample) < 1e-10


@pytest.mark.gpu
def test_gpu_model_shared_timestep_no_sync_and_graph():
    model = randomize(create("Switch-DiT-S/4", **TINY, backend="auto").cuda().eval(), seed=8)
    x, y = (t.cuda() for t in inputs(model, 4))
    x = x.float()
    t = torch.tensor(37, device="cuda")
    with torch.no_grad():
        want = model(x, t.expand(4).contiguous(), y)
        model(x, t, y)  # warm-up: auto's choices are made (and timed) outside the checks below
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = model(x, t, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert rel(got, want) < 1e-4
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x, t, y)
        t.fill_(12)
        graph.replay()
        assert rel(out, model(x, torch.full((4,), 12, device="cuda"), y)) < 1e-4
