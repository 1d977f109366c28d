"""cuBLAS compositions of the routed linear (switch_dit.ops.composed_linear, mixed_bmm, expert_grouped).

Every strategy against the float64 reference path, forward and backward, on seeded random inputs
(docs/design.md §4 tolerances: float32 relative error under 1e-5 with TF32 off, float64 ~1e-12).
They are plain PyTorch, so they run natively on the CPU.
"""

import pytest
import torch

from switch_dit import routing
from switch_dit.ops import composed_linear as C
from switch_dit.ops import expert_grouped, mixed_bmm
from switch_dit.ops.composed_linear import composed_expert_mask_and_apply, composed_mixed_linear
from switch_dit.ops.routed_linear import mixed_linear_reference

STRATEGIES = C.COMPOSED_STRATEGIES
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def routing_idx(B, M, k, mode, gen):
    if mode == "random":  # distinct experts per sample
        return torch.stack([torch.randperm(M, generator=gen)[:k] for _ in range(B)])
    if mode == "duplicate":  # a repeated expert in sample 0, whatever else happens
        idx = torch.randint(0, M, (B, k), generator=gen)
        idx[0, 1] = idx[0, 0]
        return idx
    if mode == "one_expert":  # every sample on the same k experts (the others get nothing)
        return torch.arange(M - k, M).expand(B, k).clone()
    raise ValueError(mode)


def make(B, L, D, M, k, mode="random", Dout=None, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Dout = D if Dout is None else Dout
    x = torch.randn(B, L, D, generator=gen, dtype=torch.float64)
    w = torch.randn(M, D, Dout, generator=gen, dtype=torch.float64) / D**0.5
    b = torch.randn(M, Dout, generator=gen, dtype=torch.float64) if bias else None
    idx = routing_idx(B, M, k, mode, gen)
    g = torch.rand(B, k, generator=gen, dtype=torch.float64) + 0.05
    if mode == "duplicate":
        assert (idx[:, :, None] == idx[:, None, :]).sum() > B * k, "the case must really hold a duplicate"
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    # gate probabilities stay float32 under low-precision x (as in the models); float64 with x
    g_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return cast(x), cast(w), cast(b), idx, g.to(g_dtype).requires_grad_()


def grads(out, inputs, grad_out):
    ins = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, ins, grad_out))
    return [None if t is None else next(got) for t in inputs]


def reference64(x, w, b, idx, g, add_one=False):
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    x, w, b, g = d(x), d(w), d(b), d(g)
    return mixed_linear_reference(x, w, b, idx, g, add_one=add_one), (x, w, b, g)


CASES = [  # B, L, D, Dout, M, k, mode
    (3, 7, 20, 20, 4, 2, "random"),  # D not a tile multiple; grouped GEMM aligned in fp32
    (2, 5, 18, 18, 3, 2, "random"),  # rows of 72 bytes: grouped takes its fallback
    (4, 6, 16, 24, 3, 1, "random"),  # k = 1, rectangular
    (3, 4, 12, 12, 3, 3, "random"),  # k = M
    (5, 3, 16, 16, 4, 3, "duplicate"),  # repeated experts within a sample
    (4, 5, 12, 12, 10, 2, "random"),  # M > 8
    (1, 9, 16, 16, 3, 2, "random"),  # B = 1
    (4, 4, 8, 8, 5, 2, "one_expert"),  # experts without samples
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,L,D,Dout,M,k,mode", CASES)
def test_mixed_linear_matches_float64_reference(strategy, dtype, B, L, D, Dout, M, k, mode):
    x, w, b, idx, g = make(B, L, D, M, k, mode, Dout=Dout, dtype=dtype, seed=B * 100 + D)
    y = composed_mixed_linear(x, w, b, idx, g, strategy=strategy)
    assert y.dtype == dtype and y.shape == (B, L, Dout)
    y_ref, leaves = reference64(x, w, b, idx, g)
    assert rel(y, y_ref) < TOL[dtype]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = grads(y, (x, w, b, g), gy.to(dtype))
    want = grads(y_ref, leaves, gy)
    for name, a, r, t in zip("x w b coef".split(), got, want, (x, w, b, g)):
        assert a.dtype == t.dtype, name
        assert rel(a, r) < TOL[dtype], name


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("bias", [True, False])
def test_expert_mask_and_apply(strategy, bias):
    x, w, b, idx, g = make(3, 6, 20, 4, 2, "duplicate", bias=bias, seed=7)
    m, r0 = composed_expert_mask_and_apply(x, w, b, idx, g, strategy=strategy)
    m_ref, (x6, w6, b6, g6) = reference64(x, w, b, idx, g, add_one=True)
    r_ref = x6 * m_ref
    assert rel(m, m_ref) < 1e-5 and rel(r0, r_ref) < 1e-5
    gen = torch.Generator().manual_seed(3)
    gm, gr = (torch.randn(m.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    present = lambda *ts: [t for t in ts if t is not None]  # noqa: E731
    got = torch.autograd.grad((m * gm.float()).sum() + (r0 * gr.float()).sum(), present(x, w, b, g))
    want = torch.autograd.grad((m_ref * gm).sum() + (r_ref * gr).sum(), present(x6, w6, b6, g6))
    for a, r in zip(got, want):
        assert rel(a, r) < 1e-5
    m1 = composed_mixed_linear(x, w, b, idx, g, strategy=strategy, add_one=True)
    assert rel(m1, m_ref) < 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck_float64(strategy):
    x, w, b, idx, g = make(2, 3, 4, 3, 2, "duplicate", dtype=torch.float64, seed=5)
    g = g.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: composed_mixed_linear(*a, strategy=strategy), (x, w, b, idx, g))

    def mask_apply(x, w, b, g):
        return composed_expert_mask_and_apply(x, w, b, idx, g, strategy=strategy)

    assert torch.autograd.gradcheck(mask_apply, (x, w, b, g))
    # a second-order pass is not provided: the backward op has no autograd of its own


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_contiguous_inputs_and_stride0_grads(strategy):
    x, w, b, idx, g = make(3, 5, 16, 3, 2, seed=11)
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # non-contiguous
    wt = w.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    idx_nc = torch.stack([idx[:, 1], idx[:, 0]], 1)[:, [1, 0]]  # same values, new strides
    y = composed_mixed_linear(xt, wt, b, idx_nc, g, strategy=strategy)
    y_ref, leaves = reference64(x, w, b, idx, g)
    assert rel(y, y_ref) < 1e-5
    got = torch.autograd.grad(y.sum(), (xt, wt, b, g))  # the gradient of .sum() has stride 0
    want = torch.autograd.grad(y_ref.sum(), leaves)
    for a, r in zip(got, want):
        assert rel(a, r) < 1e-5
    m, r0 = composed_expert_mask_and_apply(xt, wt, b, idx, g, strategy=strategy)
    got = torch.autograd.grad(r0.sum(), (xt, wt, b, g))
    m_ref = mixed_linear_reference(*leaves[:3], idx, leaves[3], add_one=True)
    want = torch.autograd.grad((leaves[0] * m_ref).sum(), leaves)
    for a, r in zip(got, want):
        assert rel(a, r) < 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_some_gradients(strategy):
    x, w, b, idx, g = make(3, 4, 12, 4, 2, seed=13)
    g = g.detach()  # frozen coefficients: "bmm" takes its row-scaled weight gradient
    y = composed_mixed_linear(x, w, b, idx, g, strategy=strategy)
    y_ref, (x6, w6, b6, _) = reference64(x, w, b, idx, g)
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    (gw_ref,) = torch.autograd.grad(y_ref.sum(), (w6,))
    assert rel(gw, gw_ref) < 1e-5
    y = composed_mixed_linear(x.detach(), w.detach(), None, idx, g.requires_grad_(), strategy=strategy)
    (gg,) = torch.autograd.grad(y.sum(), (g,))
    g6 = g.detach().double().requires_grad_()
    y_ref = mixed_linear_reference(x.detach().double(), w.detach().double(), None, idx, g6)
    assert rel(gg, torch.autograd.grad(y_ref.sum(), (g6,))[0]) < 1e-4


def test_bmm_chunked_p_and_per_expert_row_scaled_gemm(monkeypatch):
    """The memory-bounded paths of "bmm": P in chunks of samples, the row-scaled GEMM per expert."""
    x, w, b, idx, g = make(5, 4, 8, 3, 2, "duplicate", seed=17)
    y_ref, leaves = reference64(x, w, b, idx, g)
    want = grads(y_ref, leaves, torch.ones_like(y_ref))
    monkeypatch.setattr(mixed_bmm, "P_BUDGET", 2 * 8 * 8)  # two samples per chunk: 3 chunks
    monkeypatch.setattr(mixed_bmm, "ROW_SCALED_BUDGET", 1)
    y = composed_mixed_linear(x, w, b, idx, g, strategy="bmm")
    for a, r in zip(grads(y, (x, w, b, g), torch.ones_like(y)), want):
        assert rel(a, r) < 1e-5
    y = composed_mixed_linear(x, w, b, idx, g.detach(), strategy="bmm")
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    assert rel(gw, want[1]) < 1e-5


def test_grouped_mm_native_and_fallback_agree():
    ok, why = expert_grouped.native_grouped_mm(torch.float32, torch.device("cpu"), 16, 24)
    assert ok == hasattr(torch, "_grouped_mm"), why
    for args in ((torch.float64, 16, 16), (torch.float32, 18, 18), (torch.float16, 16, 16)):
        ok, why = expert_grouped.native_grouped_mm(args[0], torch.device("cpu"), *args[1:])
        assert not ok and why
    if not hasattr(torch, "_grouped_mm"):
        return
    x, w, b, idx, g = make(4, 6, 16, 5, 2, "one_expert", seed=19)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    outs = []
    for native in (True, False):
        gr = expert_grouped._Groups(idx, 5, 6, native)
        xs, gs = gr.gather(x.detach()), gr.gather(dy)
        outs.append(
            (
                expert_grouped._mm(xs, w.detach(), gr.experts, gr.rows, native),
                expert_grouped._wgrad(xs, gs, gr.experts, gr.rows, 5, native),
            )
        )
    for a, r in zip(*outs):
        assert rel(a, r) < 1e-6
    assert outs[0][1][:3].abs().max() == 0  # experts without rows get a zero weight gradient


def test_expert_groups_equal_routing_plan():
    gen = torch.Generator().manual_seed(23)
    probs = torch.softmax(torch.randn(1, 50, 6, generator=gen), -1)
    t = torch.randint(0, 50, (9,), generator=gen)
    plan = routing.reference_plan(probs, t, 3)
    order, position, offsets = expert_grouped.expert_groups(plan.topk_idx[0], 6)
    assert torch.equal(order, plan.order[0]) and torch.equal(offsets, plan.offsets[0])
    assert torch.equal(position, plan.position[0])


def test_opcheck():
    x, w, b, idx, g = make(2, 3, 8, 3, 2, "duplicate", seed=29)
    for strategy in STRATEGIES:
        for apply in (False, True):
            torch.library.opcheck(C._forward_op, (x, w, b, idx, g, apply, apply, strategy))
        gy = torch.randn(2, 3, 8)
        torch.library.opcheck(
            C._backward_op,
            (gy, gy, x.detach(), gy + 1, w.detach(), b.detach(), idx, g.detach(), True, True, True, True, strategy),
        )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, idx, g = make(2, 4, 16, 3, 2, seed=31)

    def step(x, w, b, g):
        m, r0 = composed_expert_mask_and_apply(x, w, b, idx, g, strategy="grouped")
        y = composed_mixed_linear(r0, w, None, idx, g, strategy="bmm")
        return m.sum() + y.square().sum()

    loss = torch.compile(step, fullgraph=True)(x, w, b, g)
    got = torch.autograd.grad(loss, (x, w, b, g))
    want = torch.autograd.grad(step(x, w, b, g), (x, w, b, g))
    for a, r in zip(got, want):
        assert rel(a, r) < 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_autocast_dtypes(strategy):
    x, w, b, idx, g = make(2, 4, 16, 3, 2, seed=37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = composed_mixed_linear(x, w, b, idx, g, strategy=strategy)
    assert y.dtype == torch.bfloat16
    y_ref, leaves = reference64(x, w, b, idx, g)
    assert rel(y, y_ref) < 2e-2
    got = torch.autograd.grad(y.float().sum(), (x, w, b, g))
    want = torch.autograd.grad(y_ref.sum(), leaves)
    for a, r, t in zip(got, want, (x, w, b, g)):
        assert a.dtype == t.dtype == torch.float32
        assert rel(a, r) < 2e-2


def test_bad_input():
    x, w, b, idx, g = make(2, 3, 8, 3, 2, seed=41)
    with pytest.raises(ValueError, match="strategy must be one of"):
        composed_mixed_linear(x, w, b, idx, g, strategy="fused")
    with pytest.raises(ValueError, match=r"topk_idx values must be in \[0, 3\)"):
        composed_mixed_linear(x, w, b, idx + 1, g, strategy="bmm")


def test_selectable_by_name_through_the_public_ops():
    from switch_dit import ops

    for op in ("mixed_linear", "expert_mask", "expert_mask_and_apply"):
        assert set(STRATEGIES) <= set(ops.strategies(op))
    x, w, b, idx, g = make(3, 4, 12, 4, 2, "duplicate", seed=43)
    m_ref, (x6, w6, b6, g6) = reference64(x, w, b, idx, g, add_one=True)
    for strategy in STRATEGIES:
        assert rel(ops.mixed_linear(x, w, b, idx, g, backend=strategy), m_ref - 1) < 1e-5
        m = ops.expert_mask(x, w, b, idx, g, backend=strategy)
        m2, r0 = ops.expert_mask_and_apply(x, w, b, idx, g, backend=strategy)
        assert rel(m, m_ref) < 1e-5 and rel(m2, m_ref) < 1e-5 and rel(r0, x6 * m_ref) < 1e-5
        got = torch.autograd.grad(r0.sum(), (x, w, b, g))
        want = torch.autograd.grad((x6 * m_ref).sum(), (x6, w6, b6, g6), retain_graph=True)
        for a, r in zip(got, want):
            assert rel(a, r) < 1e-5
        assert f"'{strategy}' (named by backend)" in ops.explain("expert_mask", x, w, b, idx, g, backend=strategy)


# --------------------------------------------------------------------------------- GPU only

gpu = pytest.mark.gpu


def _cuda_case(dtype, B=8, L=256, D=384, M=3, k=2, seed=47):
    x, w, b, idx, g = make(B, L, D, M, k, dtype=torch.float64, seed=seed)
    cuda = lambda t: t.detach().to("cuda", dtype if t.dtype == torch.float64 else t.dtype)  # noqa: E731
    return [cuda(t).requires_grad_() for t in (x, w, b)] + [idx.cuda(), g.detach().cuda().requires_grad_()]


@gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_accuracy_no_sync_and_cuda_graph(strategy, dtype):
    x, w, b, idx, g = _cuda_case(dtype)
    if strategy == "grouped" and dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] in (9, 10):
        assert expert_grouped.native_grouped_mm(dtype, x.device, 384, 384)[0]  # the CUTLASS path runs
    m_ref, leaves = reference64(x.cpu(), w.cpu(), b.cpu(), idx.cpu(), g.cpu(), add_one=True)
    want = torch.autograd.grad((leaves[0] * m_ref).sum(), leaves)
    # The same-dtype PyTorch computation sets the bar (docs/design.md §4): at most twice its error.
    m_same = mixed_linear_reference(x, w, b, idx, g, add_one=True)
    bar = 2 * rel(m_same, m_ref) + (1e-3 if dtype == torch.bfloat16 else 1e-6)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in forward or backward raises
    try:
        m, r0 = composed_expert_mask_and_apply(x, w, b, idx, g, strategy=strategy)
        got = torch.autograd.grad(r0.sum(), (x, w, b, g))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rel(m, m_ref) < bar
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for a, r in zip(got, want):
        assert rel(a, r) < tol
    # CUDA graph: capture forward + backward once, replay on new inputs.
    static = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w, b)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            torch.autograd.grad(composed_expert_mask_and_apply(*static, idx, g, strategy=strategy)[1].sum(), static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = composed_expert_mask_and_apply(*static, idx, g, strategy=strategy)[1]
        grads = torch.autograd.grad(out.sum(), static)
    with torch.no_grad():
        static[0].copy_(torch.randn_like(static[0]))
    graph.replay()
    fresh = composed_expert_mask_and_apply(*static, idx, g, strategy=strategy)[1]
    assert rel(out, fresh) < 1e-6
    assert rel(grads[1], torch.autograd.grad(fresh.sum(), static)[1]) < 1e-6


def test_grouped_takes_experts_at_any_address():
    """A weight viewed at an odd offset (not 16-byte aligned) still runs the grouped GEMMs."""
    x, w, b, idx, g = make(3, 4, 16, 3, 2, seed=53)
    storage = torch.randn(w.numel() + 1, dtype=w.dtype)
    w_odd = storage[1:].view(w.shape)
    with torch.no_grad():
        w_odd.copy_(w)
    w_odd.requires_grad_()
    assert w_odd.data_ptr() % 16
    y = composed_mixed_linear(x, w_odd, b, idx, g, strategy="grouped")
    y_ref, leaves = reference64(x, w, b, idx, g)
    assert rel(y, y_ref) < 1e-5
    assert rel(torch.autograd.grad(y.sum(), (w_odd,))[0], torch.autograd.grad(y_ref.sum(), (leaves[1],))[0]) < 1e-5


def _plan_of(B, M, k, seed):
    """A routing plan of one block for B samples (each its own row of a random gate table)."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(1, B, M, generator=gen, dtype=torch.float64), -1)
    return routing.plan(probs, torch.arange(B), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_reads_the_routing_plans_grouping(dtype, monkeypatch):
    """With groups= (the plan's), "grouped" does not group by itself (expert_groups unused, forward
    and backward) and gives what it gives without them, forward and backward; the other
    strategies take groups= and ignore it."""
    from switch_dit.ops import expert_mask, expert_mask_and_apply, mixed_linear

    B, L, D, M, k = 5, 4, 16, 4, 2
    x, w, b, _, g = make(B, L, D, M, k, dtype=dtype, seed=41)
    plan = _plan_of(B, M, k, seed=42)
    idx, groups = plan.topk_idx[0], routing.block_groups(plan, 0)
    gy = torch.randn(B, L, D, generator=torch.Generator().manual_seed(43), dtype=dtype)
    for op in (mixed_linear, expert_mask, expert_mask_and_apply):
        for strategy in ("grouped", "bmm", "reference"):
            outs = []
            for given in (None, groups):
                with monkeypatch.context() as patch:
                    if given is not None:  # the op must not sort idx itself now

                        def no_sorting(*_):
                            raise AssertionError("expert_groups ran although groups were given")

                        patch.setattr(expert_grouped, "expert_groups", no_sorting)
                    out = op(x, w, b, idx, g, backend=strategy, groups=given)
                    out = out[1] if isinstance(out, tuple) else out
                    outs.append([out, *grads(out, (x, w, b, g), gy)])
            for got, want in zip(*outs):
                assert rel(got, want) <= TOL[dtype], (op.__name__, strategy)


def test_groups_that_do_not_describe_topk_idx_are_refused():
    from switch_dit.ops import expert_mask

    x, w, b, _, g = make(5, 3, 8, 4, 2, seed=47)
    plan, other = _plan_of(5, 4, 2, seed=48), _plan_of(5, 4, 2, seed=49)
    idx, groups = plan.topk_idx[0], routing.block_groups(plan, 0)
    assert not torch.equal(plan.order, other.order), "the two plans must differ for the stale case"
    with pytest.raises(ValueError, match="does not describe topk_idx"):
        expert_mask(x, w, b, idx, g, backend="grouped", groups=routing.block_groups(other, 0))
    with pytest.raises(ValueError, match=r"groups.offsets must be an int64 tensor of shape \(5,\)"):
        expert_mask(x, w, b, idx, g, backend="grouped", groups=groups._replace(offsets=groups.offsets[:-1]))
    with pytest.raises(ValueError, match=r"groups.order must be an int64 tensor"):
        expert_mask(x, w, b, idx, g, backend="grouped", groups=groups._replace(order=groups.order.int()))
    with pytest.raises(TypeError, match="groups must be None or a switch_dit.routing.ExpertGroups"):
        expert_mask(x, w, b, idx, g, backend="grouped", groups=groups.order)
