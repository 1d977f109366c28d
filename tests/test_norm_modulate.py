"""Fused block ops (mask + LN + modulate, residual + LN + modulate, gated residual).

Kernels run under the Triton interpreter on the CPU (float32, float16, float64), each
checked against the float64 reference twin (docs/design.md §4): forward and backward,
shapes that break tiling, non-contiguous and stride-0 inputs, bitwise-reproducible
gradients, gradcheck, opcheck, torch.compile, bad input, and the block identity (b).
GPU tests (bf16, CUDA graphs) skip without CUDA.
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must precede the first import of the kernels (@triton.jit reads it then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from switch_dit.ops import dispatch  # noqa: E402
from switch_dit.ops import norm_modulate as nm  # noqa: E402

K = dispatch.kernels("norm_modulate")
needs_triton = pytest.mark.skipif(K is None, reason="Triton not importable")
needs_gpu = pytest.mark.gpu  # on a GPU, Triton missing is a failure, not a skip
# Kernels take CPU tensors only when they were decorated under the interpreter.
CPU_KERNELS = K is not None and K.INTERPRET
KERNEL_DEV = "cuda" if CUDA else ("cpu" if CPU_KERNELS else None)
needs_kernels = pytest.mark.skipif(KERNEL_DEV is None, reason="needs a GPU or TRITON_INTERPRET=1")

F32_TOL = 1e-5


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer a launcher allocates starts as NaN, so an unwritten element fails."""
    if K is not None:

        def _nan(shape, dtype, device):
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

        monkeypatch.setattr(K, "_new", _nan)


def rel(out, ref):
    assert not torch.isnan(out).any(), "NaN in output"
    out, ref = out.double(), ref.double()
    den = ref.norm()
    return ((out - ref).norm() / (den if den > 0 else 1)).item()


def check_close(outs, refs, tol, names):
    assert len(outs) == len(refs)
    for o, r, n in zip(outs, refs, names):
        assert o.shape == r.shape, f"{n}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        e = rel(o, r)
        assert e < tol, f"{n}: relative error {e:.2e} >= {tol:.0e}"


def run(fn, inputs, seed=0):
    """Outputs of fn(*inputs) and the gradients of all inputs that require grad, under
    fresh random upstream gradients (the same for every call with the same seed)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    gouts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outs]
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, wrt, gouts)
    return [o.detach() for o in outs], list(grads)


def leafs(ts, dtype, device):
    return [None if t is None else t.to(device=device, dtype=dtype).requires_grad_() for t in ts]


def make_mln(B, L, D, mmode, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    m = {"full": lambda: 1 + 0.5 * r(B, L, D), "bcast": lambda: 1 + 0.5 * r(B, 1, D), None: lambda: None}[mmode]()
    return [r(B, L, D), m, 0.5 * r(B, D), 0.5 * r(B, D)]


def make_rlm(B, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return [r(B, L, D), r(B, L, D), r(B, L, D), r(B, D), 0.5 * r(B, D), 0.5 * r(B, D)]


def make_gr(B, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return [r(B, L, D), r(B, L, D), r(B, D)]


def mln(backend, return_r0=True):
    return lambda x, m, s, c: nm.mask_ln_modulate(x, m, s, c, return_r0=return_r0, backend=backend)


def rlm(backend):
    return lambda *a: nm.residual_ln_modulate(*a, backend=backend)


def gr(backend):
    return lambda *a: nm.gated_residual(*a, backend=backend)


def compare(fn, ref_fn, base, dtype, tol, device, seed=0, names=None):
    """fn on `base` cast to dtype vs ref_fn in float64 on the same (rounded) values."""
    ins = leafs(base, dtype, device)
    ref_ins = [None if t is None else t.detach().cpu().double().requires_grad_() for t in ins]
    outs, grads = run(fn, ins, seed)
    routs, rgrads = run(ref_fn, ref_ins, seed)
    for o, ro in zip(outs, routs):
        assert o.dtype == ro.to(dtype).dtype
    for gi, t in zip(grads, [t for t in ins if t is not None]):
        assert gi.dtype == t.dtype and gi.shape == t.shape
    got, want = outs + grads, routs + rgrads
    check_close([t.cpu() for t in got], want, tol, names or [f"#{i}" for i in range(len(got))])


# ----------------------------------------------------------------------------------
# Forward + backward against the float64 reference (float32, interpreter)
# ----------------------------------------------------------------------------------

MLN_CASES = [
    (1, 7, 8, "full", True),
    (2, 33, 40, "bcast", True),
    (1, 1, 72, "bcast", False),  # (B, 1, D) mask with L = 1: per-element dm path
    (2, 7, 384, None, True),
    (1, 33, 72, "full", False),
    (2, 1, 40, None, False),
]


@needs_kernels
@pytest.mark.parametrize("B,L,D,mmode,return_r0", MLN_CASES)
def test_mask_ln_modulate_float32(B, L, D, mmode, return_r0):
    base = make_mln(B, L, D, mmode, seed=B * 1000 + L * 10 + D)
    compare(mln("triton", return_r0), mln("reference", return_r0), base, torch.float32, F32_TOL, KERNEL_DEV)


RLM_CASES = [(1, 7, 8), (2, 33, 40), (1, 1, 72), (2, 7, 384), (1, 33, 72)]


@needs_kernels
@pytest.mark.parametrize("B,L,D", RLM_CASES)
def test_residual_ln_modulate_float32(B, L, D):
    base = make_rlm(B, L, D, seed=B * 1000 + L * 10 + D)
    names = ["zr", "h", "dz", "dr0", "dattn", "dgate", "dshift", "dscale"]
    compare(rlm("triton"), rlm("reference"), base, torch.float32, F32_TOL, KERNEL_DEV, names=names)


@needs_kernels
@pytest.mark.parametrize("B,L,D", RLM_CASES)
def test_gated_residual_float32(B, L, D):
    base = make_gr(B, L, D, seed=B * 1000 + L * 10 + D)
    compare(gr("triton"), gr("reference"), base, torch.float32, F32_TOL, KERNEL_DEV, names=["out", "dz", "dy", "dgate"])


@pytest.mark.parametrize("mmode", ["full", "bcast", None])
def test_emulated_float32(mmode):
    """The "emulated" strategy (the kernels' PyTorch formulas) matches the reference too."""
    compare(mln("emulated"), mln("reference"), make_mln(2, 7, 40, mmode, 1), torch.float32, F32_TOL, "cpu")
    compare(rlm("emulated"), rlm("reference"), make_rlm(2, 7, 40, 2), torch.float32, F32_TOL, "cpu")
    compare(gr("emulated"), gr("reference"), make_gr(2, 7, 40, 3), torch.float32, F32_TOL, "cpu")


@needs_kernels
def test_float16_under_the_interpreter():
    """float16 in and out (float32 inside): only output rounding separates it from float64."""
    # The float64 reference sees the same fp16-rounded inputs, and the kernels compute in fp32, so
    # each output differs from float64 by its own rounding to fp16: at most the unit roundoff
    # u = eps / 2 (measured: <= 0.7 u).
    tol = torch.finfo(torch.float16).eps / 2
    compare(mln("triton"), mln("reference"), make_mln(2, 7, 40, "full", 4), torch.float16, tol, KERNEL_DEV)
    compare(mln("triton"), mln("reference"), make_mln(1, 5, 72, "bcast", 5), torch.float16, tol, KERNEL_DEV)
    compare(rlm("triton"), rlm("reference"), make_rlm(2, 7, 40, 6), torch.float16, tol, KERNEL_DEV)
    compare(gr("triton"), gr("reference"), make_gr(2, 7, 40, 7), torch.float16, tol, KERNEL_DEV)


@needs_kernels
def test_mixed_dtypes_follow_promotion():
    """float16 residual stream with float32 modulation: outputs and grads as PyTorch promotes."""
    x, m, s, c = make_mln(1, 5, 40, "full", 8)
    ins = [x.half().requires_grad_(), m.half().requires_grad_(), s.float().requires_grad_(), c.float().requires_grad_()]
    r0, h = nm.mask_ln_modulate(*ins, return_r0=True, backend="triton")
    r0_ref, h_ref = nm.mask_ln_modulate(*ins, return_r0=True, backend="reference")
    assert (r0.dtype, h.dtype) == (r0_ref.dtype, h_ref.dtype) == (torch.float16, torch.float32)
    grads = torch.autograd.grad(h.sum() + r0.float().sum(), ins)
    assert [g.dtype for g in grads] == [t.dtype for t in ins]
    assert rel(h, h_ref) < 2e-3


# ----------------------------------------------------------------------------------
# Strides: non-contiguous inputs, stride-0 gradients
# ----------------------------------------------------------------------------------


def _strided(B, L, D, seed):
    """(B, L, D) views with stride != contiguous, and (B, D) chunks of a (B, 6D) tensor."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(B, D, L, generator=g).transpose(1, 2) for _ in range(3)]
    ada = torch.randn(B, 6 * D, generator=g).chunk(6, dim=1)
    return rows, ada


@needs_kernels
@pytest.mark.parametrize("backend", ["triton", "emulated"])
def test_non_contiguous_inputs_and_stride0_grads(backend):
    B, L, D = 2, 7, 40
    rows, ada = _strided(B, L, D, 9)
    dev = KERNEL_DEV if backend == "triton" else "cpu"
    rows = [t.to(dev) for t in rows]  # .to() on the same device keeps the strides
    ada = [t.to(dev) for t in ada]
    assert not rows[0].is_contiguous() and not ada[0].is_contiguous()
    mb = (1 + torch.randn(B, 2 * D))[:, ::2].unsqueeze(1).to(dev)  # (B, 1, D), stride 2 in D
    assert mb.stride(-1) == 2
    w = torch.randn(D).to(dev)

    def both(fn_name, args, nout):
        res = []
        for be in (backend, "reference"):
            ins = [a.detach().requires_grad_() if a is not None else None for a in args]
            out = getattr(nm, fn_name)(*ins, backend=be) if nout else None
            outs = out if isinstance(out, tuple) else (out,)
            # gradient of .sum() (stride 0 everywhere) and of (h * w).sum() (stride 0 in B, L)
            gouts = [torch.ones((), device=dev).expand(o.shape) for o in outs]
            gouts[-1] = w.expand(outs[-1].shape)
            wrt = [t for t in ins if t is not None]
            res.append([*outs, *torch.autograd.grad(outs, wrt, gouts)])
        for a, b in zip(*res):
            assert rel(a.cpu(), b.cpu()) < F32_TOL

    both("mask_ln_modulate", [rows[0], rows[1], ada[0], ada[1]], 1)
    both("mask_ln_modulate", [rows[0], mb, ada[0], ada[1]], 1)
    both("mask_ln_modulate", [rows[0], None, ada[0], ada[1]], 1)
    both("residual_ln_modulate", [rows[0], rows[1], rows[2], ada[2], ada[3], ada[4]], 2)
    both("gated_residual", [rows[0], rows[1], ada[5]], 1)


# ----------------------------------------------------------------------------------
# Determinism, gradcheck, opcheck, compile
# ----------------------------------------------------------------------------------


@needs_kernels
def test_gradients_bitwise_identical_run_to_run():
    for fn, base in [
        (mln("triton"), make_mln(2, 33, 40, "bcast", 11)),
        (mln("triton"), make_mln(1, 33, 40, "full", 12)),
        (rlm("triton"), make_rlm(2, 33, 40, 13)),
        (gr("triton"), make_gr(2, 33, 40, 14)),
    ]:
        first = run(fn, leafs(base, torch.float32, KERNEL_DEV), seed=5)
        second = run(fn, leafs(base, torch.float32, KERNEL_DEV), seed=5)
        for a, b in zip(first[0] + first[1], second[0] + second[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "emulated", "triton"])
def test_gradcheck_float64(backend):
    if backend == "triton" and not CPU_KERNELS and not CUDA:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    dev = KERNEL_DEV if backend == "triton" else "cpu"
    B, L, D = 2, 3, 5
    # Kernels under the interpreter are slow to call once per Jacobian entry: use
    # gradcheck's fast mode (random projections) there; full Jacobians elsewhere.
    kw = dict(fast_mode=backend == "triton")
    for mmode in ("full", "bcast", None):
        ins = [t for t in leafs(make_mln(B, L, D, mmode, 20), torch.float64, dev)]
        fn = mln(backend)
        if mmode is None:
            x, _, s, c = ins
            assert torch.autograd.gradcheck(lambda x, s, c, fn=fn: fn(x, None, s, c), (x, s, c), **kw)
        else:
            assert torch.autograd.gradcheck(fn, ins, **kw)
    ins = leafs(make_mln(B, L, D, "full", 21), torch.float64, dev)
    assert torch.autograd.gradcheck(mln(backend, return_r0=False), ins, **kw)
    assert torch.autograd.gradcheck(rlm(backend), leafs(make_rlm(B, L, D, 22), torch.float64, dev), **kw)
    assert torch.autograd.gradcheck(gr(backend), leafs(make_gr(B, L, D, 23), torch.float64, dev), **kw)


def _op_samples(impl, dev):
    B, L, D = 2, 5, 12
    x, m, s, c = leafs(make_mln(B, L, D, "full", 30), torch.float32, dev)
    _, mb, _, _ = leafs(make_mln(B, L, D, "bcast", 31), torch.float32, dev)
    z, r0, a, g, s2, c2 = leafs(make_rlm(B, L, D, 32), torch.float32, dev)
    with torch.no_grad():
        _, _, mean, rstd = nm._mask_ln_modulate_op(x, m, s, c, 1e-6, True, impl)
        _, _, mean2, rstd2 = nm._residual_ln_modulate_op(z, r0, a, g, s2, c2, 1e-6, impl)
    dh = torch.randn(B, L, D, device=dev)
    f32 = torch.float32
    return [
        (nm._mask_ln_modulate_op, (x, m, s, c, 1e-6, True, impl)),
        (nm._mask_ln_modulate_op, (x, mb, s, c, 1e-6, False, impl)),
        (nm._mask_ln_modulate_op, (x, None, s, c, 1e-6, True, impl)),
        (
            nm._mask_ln_modulate_backward_op,
            (x.detach(), m.detach(), c.detach(), mean, rstd, dh, dh.clone(), True, f32, impl),
        ),
        (
            nm._mask_ln_modulate_backward_op,
            (x.detach(), mb.detach(), c.detach(), mean, rstd, dh, None, True, f32, impl),
        ),
        (nm._residual_ln_modulate_op, (z, r0, a, g, s2, c2, 1e-6, impl)),
        (
            nm._residual_ln_modulate_backward_op,
            (r0.detach(), a.detach(), g.detach(), c2.detach(), mean2, rstd2, dh.clone(), dh, f32, impl),
        ),
        (
            nm._residual_ln_modulate_backward_op,
            (r0.detach(), a.detach(), g.detach(), c2.detach(), mean2, rstd2, None, dh, f32, impl),
        ),
        (nm._gated_residual_op, (z, a, g, impl)),
        (nm._gated_residual_backward_op, (a.detach(), g.detach(), dh, impl)),
    ]


@pytest.mark.parametrize("impl", ["emulated", "fused"])
def test_opcheck(impl):
    if impl == "fused" and KERNEL_DEV is None:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    dev = KERNEL_DEV if impl == "fused" else "cpu"
    for op, args in _op_samples(impl, dev):
        torch.library.opcheck(op, args)


class _Attn(torch.nn.Module):
    def __init__(self, D, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, torch.nn.Linear(D, 3 * D), torch.nn.Linear(D, D)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))


class _Mlp(torch.nn.Module):
    def __init__(self, D):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(D, 4 * D), torch.nn.Linear(4 * D, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _block_inputs(B, L, D, mmode, dtype, dev, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    z = r(B, L, D)
    m = {
        "random": lambda: 1 + 0.5 * r(B, L, D),
        "binary": lambda: (torch.rand(B, 1, D, generator=g, dtype=torch.float64) < 0.7).double(),
        None: lambda: None,
    }[mmode]()
    ada = [0.5 * r(B, D) for _ in range(6)]
    torch.manual_seed(seed)
    attn, mlp = _Attn(D, 2).to(dev, dtype), _Mlp(D).to(dev, dtype)
    ins = leafs([z, m, *ada], dtype, dev)
    return ins, attn, mlp


def _block_grads(block, ins, attn, mlp, seed, **kw):
    z, m, *ada = ins
    out = block(z, m, ada, attn, mlp, **kw)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    wrt = [t for t in ins if t is not None] + list(attn.parameters()) + list(mlp.parameters())
    return [out.detach(), *torch.autograd.grad(out, wrt, gout)]


@pytest.mark.parametrize("mmode", ["random", "binary", None])
@pytest.mark.parametrize("backend", ["emulated", "triton"])
def test_fused_block_reproduces_reference_block_float64(mmode, backend):
    """Identity (b): ops 1-3 with plain attention / MLP give r = z*m; r += a; r += f;
    out = r + (1 - m) * z, outputs and every gradient, in float64."""
    if backend == "triton" and KERNEL_DEV is None:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    dev = KERNEL_DEV if backend == "triton" else "cpu"
    ins, attn, mlp = _block_inputs(2, 5, 24, mmode, torch.float64, dev, seed=40)
    got = _block_grads(nm.fused_block, ins, attn, mlp, 41, backend=backend)
    want = _block_grads(nm.reference_block, ins, attn, mlp, 41)
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-12


@needs_kernels
def test_compile_plumbing_fullgraph_matches_eager():
    """Compile plumbing only (the kernels compared with themselves): the fused block (three custom
    ops) compiles without a graph break, forward and backward. Numerics: the reference tests."""
    torch._dynamo.reset()
    ins, attn, mlp = _block_inputs(2, 5, 24, "random", torch.float32, KERNEL_DEV, seed=50)
    compiled = torch.compile(nm.fused_block, fullgraph=True)
    got = _block_grads(compiled, ins, attn, mlp, 51, backend="triton")
    want = _block_grads(nm.fused_block, ins, attn, mlp, 51, backend="triton")
    for a, b in zip(got, want):
        assert rel(a, b) < F32_TOL


@needs_kernels
def test_bf16_autocast_block_matches_reference_block():
    """Under autocast the linears give bf16, the residual stream stays float32; the fused
    ops take the mixed dtypes as they come and agree with the reference block."""
    ins, attn, mlp = _block_inputs(2, 5, 24, "random", torch.float32, KERNEL_DEV, seed=55)
    with torch.autocast(KERNEL_DEV, dtype=torch.bfloat16):
        got = _block_grads(nm.fused_block, ins, attn, mlp, 56, backend="triton")
        want = _block_grads(nm.reference_block, ins, attn, mlp, 56)
    # The two paths round to bf16 at different points: at most one rounding (u = eps / 2) on each
    # path at each of the attention and MLP branch inputs, 4 u = 2 eps in all (measured <= 1.0 eps).
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        assert rel(a.float(), b.float()) < 2 * torch.finfo(torch.bfloat16).eps


@needs_kernels
def test_mask_without_grad():
    """A DTR mask is a constant: no dm is computed, the other gradients are unchanged."""
    x, m, s, c = make_mln(2, 7, 40, "bcast", 57)
    m = (m > 1).double()
    fn = lambda x, s, c, be: mln(be)(x, m.float().to(x.device), s, c)  # noqa: E731
    got = run(lambda *a: fn(*a, "triton"), leafs([x, s, c], torch.float32, KERNEL_DEV))
    want = run(lambda *a: fn(*a, "reference"), leafs([x, s, c], torch.float64, "cpu"))
    check_close([t.cpu() for t in got[0] + got[1]], want[0] + want[1], F32_TOL, ["r0", "h", "dx", "dshift", "dscale"])


# ----------------------------------------------------------------------------------
# Backend choice, edge shapes, bad input
# ----------------------------------------------------------------------------------


def test_auto_backend_on_cpu_is_reference(monkeypatch):
    x, m, s, c = make_mln(1, 3, 8, "full", 60)
    if K is not None:
        monkeypatch.setattr(nm, "_functions", lambda strategy: pytest.fail("auto on CPU must not launch kernels"))
    for backend in (None, "auto"):
        nm.mask_ln_modulate(x, m, s, c, backend=backend)
        nm.residual_ln_modulate(*make_rlm(1, 3, 8, 61), backend=backend)
        nm.gated_residual(*make_gr(1, 3, 8, 62), backend=backend)


@pytest.mark.parametrize("backend", ["emulated", "triton"])
def test_empty_sequence(backend, monkeypatch):
    """L = 0: the right shapes and zero gradients. With backend="triton" nothing is computed and no
    kernel may launch (the dispatch runs the reference on empty input): that is what it checks."""
    if backend == "triton" and KERNEL_DEV is None:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    dev = KERNEL_DEV if backend == "triton" else "cpu"
    if backend == "triton":
        monkeypatch.setattr(nm, "_functions", lambda strategy: pytest.fail("empty input must launch no kernel"))
    x, m, s, c = leafs(make_mln(2, 0, 8, "full", 70), torch.float32, dev)
    r0, h = nm.mask_ln_modulate(x, m, s, c, return_r0=True, backend=backend)
    assert h.shape == (2, 0, 8)
    dx, dm, ds, dc = torch.autograd.grad(h.sum() + r0.sum(), (x, m, s, c))
    assert dx.shape == x.shape and dm.shape == m.shape and torch.equal(ds, torch.zeros(2, 8, device=dev))
    z, y, g = leafs(make_gr(2, 0, 8, 71), torch.float32, dev)
    dg = torch.autograd.grad(nm.gated_residual(z, y, g, backend=backend).sum(), g)[0]
    assert torch.equal(dg, torch.zeros(2, 8, device=dev))


def test_bad_inputs():
    x, m, s, c = make_mln(2, 3, 8, "full", 80)
    with pytest.raises(ValueError, match="x must be 3-D"):
        nm.mask_ln_modulate(x[0], m, s, c)
    with pytest.raises(ValueError, match="m must have shape"):
        nm.mask_ln_modulate(x, m[:, :, :4], s, c)
    with pytest.raises(ValueError, match="m must have shape"):
        nm.mask_ln_modulate(x, m[:, :2], s, c)
    with pytest.raises(ValueError, match="m must be a floating"):
        nm.mask_ln_modulate(x, m > 1, s, c)
    with pytest.raises(ValueError, match="shift must have shape"):
        nm.mask_ln_modulate(x, m, s[:1], c)
    with pytest.raises(ValueError, match="scale must be 2-D"):
        nm.mask_ln_modulate(x, m, s, c[:, None])
    with pytest.raises(TypeError, match="shift must be a torch.Tensor"):
        nm.mask_ln_modulate(x, m, 1.0, c)
    with pytest.raises(ValueError, match="x must be a floating"):
        nm.mask_ln_modulate(x.long(), m, s, c)
    with pytest.raises(ValueError, match="eps must be a positive"):
        nm.mask_ln_modulate(x, m, s, c, eps=0.0)
    with pytest.raises(ValueError, match="not a strategy of mask_ln_modulate.*reference"):
        nm.mask_ln_modulate(x, m, s, c, backend="cuda")
    with pytest.raises(ValueError, match="m is on meta"):
        nm.mask_ln_modulate(x, m.to("meta"), s, c)
    z, r0, a, g, s2, c2 = make_rlm(2, 3, 8, 81)
    with pytest.raises(ValueError, match="attn_out must have the shape of z"):
        nm.residual_ln_modulate(z, r0, a[:, :2], g, s2, c2)
    with pytest.raises(ValueError, match="r0 is on meta"):
        nm.residual_ln_modulate(z, r0.to("meta"), a, g, s2, c2)
    with pytest.raises(ValueError, match="gate must have shape"):
        nm.residual_ln_modulate(z, r0, a, g[:, :3], s2, c2)
    with pytest.raises(ValueError, match="y must have the shape of z"):
        nm.gated_residual(z, a[:1], g)
    with pytest.raises(ValueError, match="gate must be 2-D"):
        nm.gated_residual(z, a, g[0])


@needs_triton
def test_kernels_refuse_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(K, "INTERPRET", False)
    x, m, s, c = make_mln(1, 3, 8, "full", 90)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        K.mask_ln_modulate_fwd(x.float(), m.float(), s.float(), c.float(), 1e-6, True)


# ----------------------------------------------------------------------------------
# GPU only: bf16 numerics and CUDA graphs
# ----------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("B,L,D", [(4, 256, 384), (2, 33, 1152), (1, 7, 72)])
def test_bf16_within_twice_pytorch_error(B, L, D):
    """kernel error vs float64 <= 2 x (error of the same-dtype PyTorch reference) + small atol."""
    torch.manual_seed(B + L + D)
    cases = [
        (mln("triton"), mln("reference"), make_mln(B, L, D, "full", 1)),
        (mln("triton"), mln("reference"), make_mln(B, L, D, "bcast", 2)),
        (rlm("triton"), rlm("reference"), make_rlm(B, L, D, 3)),
        (gr("triton"), gr("reference"), make_gr(B, L, D, 4)),
    ]
    for fn, ref_fn, base in cases:
        k_outs, k_grads = run(fn, leafs(base, torch.bfloat16, "cuda"))
        t_outs, t_grads = run(ref_fn, leafs(base, torch.bfloat16, "cuda"))
        ref_ins = [None if t is None else t.to(torch.bfloat16).double().requires_grad_() for t in base]
        r_outs, r_grads = run(ref_fn, ref_ins)
        for k, t, r in zip(k_outs + k_grads, t_outs + t_grads, r_outs + r_grads):
            k, t, r = k.double().cpu(), t.double().cpu(), r.cpu()
            assert not torch.isnan(k).any()
            err_k = (k - r).norm() / r.norm()
            err_t = (t - r).norm() / r.norm()
            assert err_k <= 2 * err_t + 1e-3, (err_k.item(), err_t.item())


@needs_gpu
def test_cuda_graph_capture_and_replay():
    """Forward and backward of the fused block captured in one CUDA graph replay as eager."""
    ins, attn, mlp = _block_inputs(2, 64, 384, "random", torch.float32, "cuda", seed=100)
    static = [t.detach().clone().requires_grad_() if t is not None else None for t in ins]
    params = list(attn.parameters()) + list(mlp.parameters())

    def step():
        z, m, *ada = static
        out = nm.fused_block(z, m, ada, attn, mlp, backend="triton")
        return [out, *torch.autograd.grad(out, [z, m, *ada, *params], torch.ones_like(out))]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: compiles the kernels outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh = _block_inputs(2, 64, 384, "random", torch.float32, "cuda", seed=101)[0]
    with torch.no_grad():
        for t, f in zip(static, fresh):
            if t is not None:
                t.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(captured, eager):
        assert rel(a, b) < 1e-6
