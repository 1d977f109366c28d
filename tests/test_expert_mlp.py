"""switch_dit.ops.expert_mlp: every strategy against the reference, forward and backward."""

import pytest
import torch

from switch_dit.ops import dispatch
from switch_dit.ops.expert_mlp import STRATEGIES, expert_mlp
from tests.tolerances import fp32_gradient_ok

FAST = [s for s in STRATEGIES if s not in ("reference", "fused")]  # any dtype; "fused" (Triton) tested in float32


def _weights(E, D, H, dtype, g):
    return [
        (torch.randn(*shape, dtype=dtype, generator=g) * scale).requires_grad_()
        for shape, scale in (((E, H, D), D**-0.5), ((E, H), 1.0), ((E, D, H), H**-0.5), ((E, D), 1.0))
    ]


def _inputs(kind, S=20, D=16, H=32, E=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, D, dtype=dtype, generator=g).requires_grad_()
    scores = torch.rand(E, S, dtype=dtype, generator=g)
    if kind == "fixed":  # training: every expert its top C
        C = S // E + 3
        gating, index = torch.topk(scores, C, dim=1)
        valid = None
    else:  # evaluation: a ranking of all S, expert e keeps its first k_e
        gating, index = torch.sort(scores, dim=1, descending=True)
        k = torch.randint(1, S, (E,), generator=g)
        k[0], k[-1] = 0, S  # an expert with no token, one with all of them
        valid = torch.arange(S)[None] < k[:, None]
    gating = gating.detach().requires_grad_()
    return x, index, gating, _weights(E, D, H, dtype, g), valid


def _run(backend, x, index, gating, ws, valid, seed=1):
    y = expert_mlp(x, index, gating, *ws, valid, backend=backend)
    # drawn in float64 whatever y's dtype: the float32 runs see the float64 run's dy, rounded
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    dy = dy.to(device=y.device, dtype=y.dtype)
    grads = torch.autograd.grad((y * dy).sum(), [x, gating, *ws])
    return [y.detach(), *grads]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strategy_matches_reference(backend, kind, dtype):
    x, index, gating, ws, valid = _inputs(kind, dtype=dtype)
    if kind == "fixed":  # the duplicate choices the combine must sum
        assert torch.bincount(index.flatten()).max() > 1
    want = _run("reference", x, index, gating, ws, valid)
    got = _run(backend, x, index, gating, ws, valid)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for name, a, b in zip(["y", "x", "gating", "w1", "b1", "w2", "b2"], got, want):
        torch.testing.assert_close(a, b, **tol, msg=name)
    # Unchosen tokens get zero output, and an expert with no token gets zero gradient.
    if valid is not None:
        torch.testing.assert_close(got[3][0], torch.zeros_like(got[3][0]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_gradcheck(backend):
    x, index, gating, ws, valid = _inputs("dynamic", S=6, D=4, H=4, E=3)
    assert torch.autograd.gradcheck(lambda *a: expert_mlp(*a, valid, backend=backend), (x, index, gating, *ws))


@pytest.mark.parametrize("backend", FAST)
def test_stride0_gradient(backend):
    x, index, gating, ws, valid = _inputs("fixed")
    want = torch.autograd.grad(expert_mlp(x, index, gating, *ws, backend="reference").sum(), x)[0]
    got = torch.autograd.grad(expert_mlp(x, index, gating, *ws, backend=backend).sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
@pytest.mark.parametrize("shape", [(20, 16, 32, 4), (37, 24, 40, 5)])  # D, H not multiples of the tiles
def test_fused_forward_matches_reference(kind, shape):
    """The Triton kernels (interpreter on CPU, float32) on the evaluation path: no autograd."""
    S, D, H, E = shape
    x, index, gating, ws, valid = _inputs(kind, S=S, D=D, H=H, E=E, dtype=torch.float32, seed=3)
    with torch.no_grad():
        want = expert_mlp(x, index, gating, *ws, valid, backend="reference")
        got = expert_mlp(x, index, gating, *ws, valid, backend="fused")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
@pytest.mark.parametrize("shape", [(20, 16, 32, 4), (37, 24, 40, 5)])  # D, H not multiples of the tiles
def test_fused_training_matches_reference(kind, shape):
    """The Triton kernels forward and backward (interpreter on CPU, float32) against the float64
    reference, every gradient by the float32 rule of tests/tolerances.py (within 2x of PyTorch's
    own float32 error, or under 1e-5). "fixed" holds tokens chosen by several experts (their dx
    rows summed), "dynamic" an expert with no token (zero weight gradients) and one with all."""
    S, D, H, E = shape
    x, index, gating, ws, valid = _inputs(kind, S=S, D=D, H=H, E=E, dtype=torch.float64, seed=5)
    want = _run("reference", x, index, gating, ws, valid)

    def f32(t):
        return t.detach().float().requires_grad_()

    x32, g32, ws32 = f32(x), f32(gating), [f32(w) for w in ws]
    base = _run("reference", x32, index, g32, ws32, valid)
    got = _run("fused", x32, index, g32, ws32, valid)
    for name, a, b, w in zip(["y", "x", "gating", "w1", "b1", "w2", "b2"], got, base, want):
        err, ref_err = _rel(a, w), _rel(b, w)
        assert fp32_gradient_ok(err, ref_err), (name, err, ref_err)
    if valid is not None:  # expert 0 chose nothing: exact zeros, not garbage from unwritten rows
        for grad in got[3:]:
            assert torch.count_nonzero(grad[0]) == 0


def test_registered_with_dispatch():
    assert dispatch.strategies("expert_mlp") == ("reference", "bmm", "fused", "grouped")
    x, index, gating, ws, valid = _inputs("fixed")
    assert "reference" in dispatch.explain("expert_mlp", x, index, gating, *ws, valid)  # CPU: auto -> reference


def test_bad_input():
    x, index, gating, ws, valid = _inputs("fixed")
    with pytest.raises(ValueError, match="not a strategy of expert_mlp"):
        expert_mlp(x, index, gating, *ws, backend="magic")
    with pytest.raises(ValueError, match="index must be int64"):
        expert_mlp(x, index.int(), gating, *ws)
    with pytest.raises(ValueError, match="gating must have the shape"):
        expert_mlp(x, index, gating[:, 1:], *ws)
    with pytest.raises(ValueError, match="w2 must have shape"):
        expert_mlp(x, index, gating, ws[0], ws[1], ws[2][:, 1:], ws[3])
    with pytest.raises(ValueError, match="valid must be None or bool"):
        expert_mlp(x, index, gating, *ws, valid=torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("backend", FAST)
def test_x_gradient_has_no_scatter_add(backend):
    """The gather of the chosen tokens must not differentiate as an accumulating index_put (whose
    order of summation, for a token chosen by several experts, is the backend's); its backward is
    the combine's expert-order sum (_GatherRows). Read from the autograd graph: every node that
    hands x its gradient is a _GatherRows backward."""
    x, index, gating, ws, valid = _inputs("fixed")
    assert torch.bincount(index.flatten()).max() > 1  # tokens chosen by several experts
    y = expert_mlp(x, index, gating, *ws, backend=backend)
    seen, stack, into_x = set(), [y.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for next_fn, _ in node.next_functions:
            if getattr(next_fn, "variable", None) is x:
                into_x.append(type(node).__name__)
            stack.append(next_fn)
    assert into_x and set(into_x) == {"_GatherRowsBackward"}, into_x


@pytest.mark.parametrize("backend", FAST + ["fused"])
def test_autocast_casts_like_linear(backend):
    """Under autocast (CPU float16) the op casts x and the weights to float16 like F.linear, whatever
    the strategy (grouped GEMMs and the kernels need one dtype): y comes back in float16, each
    gradient in its input's dtype, and every result is within 2x of the reference strategy's own
    float16 error against float64 (docs/design.md §4)."""
    x, index, gating, ws, valid = _inputs("fixed", dtype=torch.float64, seed=7)
    want = _run("reference", x, index, gating, ws, valid)

    def f32(t):
        return t.detach().float().requires_grad_()

    outs = {}
    for strategy in ("reference", backend):
        args = (f32(x), index, f32(gating), [f32(w) for w in ws], valid)
        with torch.autocast("cpu", dtype=torch.float16):
            outs[strategy] = _run(strategy, *args)
    got, base = outs[backend], outs["reference"]
    assert got[0].dtype == torch.float16 and all(g.dtype == torch.float32 for g in got[1:])
    for name, a, b, w in zip(["y", "x", "gating", "w1", "b1", "w2", "b2"], got, base, want):
        err, ref_err = _rel(a, w), _rel(b, w)
        assert err <= 2 * ref_err, (name, err, ref_err)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
@pytest.mark.parametrize("shape", [(512, 64, 256, 8), (300, 72, 200, 5)])  # D, H not multiples of the tiles
def test_cuda_fused_matches_reference_in_bf16(kind, shape):
    """The Triton kernels on the GPU (their tiles, wgmma/mma; the CPU tests run the interpreter's),
    bf16, forward and backward: every result within 2x of the reference strategy's own bf16 error
    against float64 (docs/design.md §4), and the training step without a host sync."""
    S, D, H, E = shape
    x, index, gating, ws, valid = _inputs(kind, S=S, D=D, H=H, E=E, dtype=torch.float64, seed=11)
    want = _run("reference", x, index, gating, ws, valid)

    def cuda(t, dtype=torch.bfloat16):
        return t.detach().to("cuda", dtype).requires_grad_()

    def args(gating_dtype, dtype=torch.bfloat16):
        v = None if valid is None else valid.cuda()
        return cuda(x, dtype), index.cuda(), cuda(gating, gating_dtype), [cuda(w, dtype) for w in ws], v

    base = _run("reference", *args(torch.float32))
    got = _run("fused", *args(torch.float32))
    for name, a, b, w in zip(["y", "x", "gating", "w1", "b1", "w2", "b2"], got, base, want):
        err, ref_err = _rel(a.cpu(), w), _rel(b.cpu(), w)
        assert err <= 2 * ref_err, (name, err, ref_err)
    # As the trainer runs it: float32 parameters and input under bf16 autocast; the gradients
    # reach them in float32.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        base = _run("reference", *args(torch.float32, torch.float32))
        got = _run("fused", *args(torch.float32, torch.float32))
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    for name, a, b, w in zip(["y", "x", "gating", "w1", "b1", "w2", "b2"], got, base, want):
        err, ref_err = _rel(a.cpu(), w), _rel(b.cpu(), w)
        assert err <= 2 * ref_err, ("autocast", name, err, ref_err)
    if valid is None:  # training: no host sync in the fused forward and backward
        xs, idx, g, w, _ = args(torch.float32)
        expert_mlp(xs, idx, g, *w, backend="fused").float().sum().backward()  # warm-up: compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            expert_mlp(xs, idx, g, *w, backend="fused").float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_fused_bf16_is_refused_under_the_interpreter():
    """On the CPU the kernels run in Triton's interpreter, whose bf16 dot is wrong: a clear error
    naming the dtype, not garbage (float16 and float32 run, see above)."""
    x, index, gating, ws, valid = _inputs("fixed", dtype=torch.float32)
    bf = [w.detach().bfloat16() for w in ws]
    with pytest.raises(ValueError, match="bfloat16 under the Triton interpreter"):
        expert_mlp(x.detach().bfloat16(), index, gating.detach(), *bf, backend="fused")


def test_fused_ops_pass_opcheck_and_compile():
    """The two custom ops: schema, fake kernels and autograd registration (torch.library.opcheck),
    and the strategy under torch.compile(fullgraph=True): one graph, the eager result."""
    import importlib

    M = importlib.import_module("switch_dit.ops.expert_mlp")  # (the package re-exports the function)

    for kind in ("fixed", "dynamic"):
        x, index, gating, ws, valid = _inputs(kind, dtype=torch.float32, seed=9)
        detached = [t.detach() for t in (x, gating, *ws)]  # keep=False: the no-grad path
        torch.library.opcheck(M._fused_op, (detached[0], index, *detached[1:2], *detached[2:], valid, False))
        torch.library.opcheck(M._fused_op, (x, index, gating, *ws, valid, True))
        kept = M._fused_op(x, index, gating, *ws, valid, True)
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(10))
        args = (dy, x.detach(), gating.detach(), ws[0].detach(), ws[2].detach(), *kept[1:])
        torch.library.opcheck(M._fused_backward_op, args)

    for kind in ("fixed", "dynamic"):  # training (every pair valid) and evaluation (valid given)
        torch._dynamo.reset()
        x, index, gating, ws, valid = _inputs(kind, dtype=torch.float32, seed=12)

        def step(x, gating, *ws, index=index, valid=valid):
            return expert_mlp(x, index, gating, *ws, valid, backend="fused")

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        want = _run("fused", x, index, gating, ws, valid)
        y = compiled(x, gating, *ws)
        dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).float()
        got = [y.detach(), *torch.autograd.grad((y * dy).sum(), [x, gating, *ws])]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        with torch.no_grad():  # the evaluation kernels (nothing kept, the score in fc2's epilogue)
            torch.testing.assert_close(compiled(x, gating, *ws), want[0], rtol=1e-6, atol=1e-6)
