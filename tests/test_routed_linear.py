"""Routed expert linear (switch_dit.ops.routed_linear): Triton kernels vs the float64 reference.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (float32 and
float16 only: the interpreter's bf16 tl.dot is wrong). GPU-only tests skip cleanly.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first import of triton / the kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from switch_dit.kernels import routed_linear as K  # noqa: E402
from switch_dit.ops.routed_linear import expert_mask, expert_mask_and_apply, mixed_linear, mixed_linear_reference  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and not K.INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET was set to 0 before import", allow_module_level=True)

gpu = pytest.mark.gpu
TOL32 = 1e-5  # docs/design.md §4: float32 well under 1e-5 (TF32 off)


@pytest.fixture(autouse=True)
def _no_tf32_and_poison(monkeypatch):
    # (TF32 is off: tests/conftest.py.)
    # Scratch buffers the kernels must fully write start as NaN.
    monkeypatch.setattr(K, "POISON", True)


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def routing(B, M, k, mode="random", gen=None):
    """(B, k) int64 expert indices, distinct per row unless mode says otherwise."""
    if mode == "random":
        return torch.stack([torch.randperm(M, generator=gen)[:k] for _ in range(B)])
    if mode == "one_expert":  # every sample on expert M-1 (k = 1) or on the same k experts
        row = torch.arange(M - k, M)
        return row.expand(B, k).clone()
    if mode == "unused":  # expert 0 never chosen
        return torch.stack([1 + torch.randperm(M - 1, generator=gen)[:k] for _ in range(B)])
    if mode == "duplicate":  # mixed_linear allows repeated indices; sample 0 always repeats one
        idx = torch.randint(0, M, (B, k), generator=gen)
        if k > 1:
            idx[0, 1] = idx[0, 0]
        return idx
    raise ValueError(mode)


def make(B, L, Din, M, k, Dout=None, mode="random", dtype=torch.float32, bias=True, device=DEV):
    Dout = Din if Dout is None else Dout
    x = torch.randn(B, L, Din, dtype=torch.float64)
    w = torch.randn(M, Din, Dout, dtype=torch.float64) / Din**0.5
    b = torch.randn(M, Dout, dtype=torch.float64) if bias else None
    idx = routing(B, M, k, mode)
    g = torch.rand(B, k, dtype=torch.float64) + 0.05
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), idx.to(device), g.to(device=device, dtype=torch.float32)


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def ref64(fn, x, w, b, idx, g, grads_out):
    """Float64 reference outputs and the gradients of sum(out_i * grad_i)."""
    x, w, b, g = leaves(*(None if t is None else t.double().cpu() for t in (x, w, b, g)))
    outs = fn(x, w, b, idx.cpu(), g, backend="reference")
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum(
        ((o * go.double().cpu()).sum() for o, go in zip(outs, grads_out)), torch.zeros((), dtype=torch.float64)
    ).backward()
    return outs, [None if t is None else t.grad for t in (x, w, b, g)]


def run_triton(fn, x, w, b, idx, g, grads_out):
    x, w, b, g = leaves(x, w, b, g)
    outs = fn(x, w, b, idx, g, backend="triton")
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads_out)
    return outs, [None if t is None else t.grad for t in (x, w, b, g)]


def check_against_reference(fn, x, w, b, idx, g, tol=TOL32):
    n_out = 2 if fn is expert_mask_and_apply else 1
    shape = (x.shape[0], x.shape[1], w.shape[2])
    grads_out = [torch.randn(shape, device=x.device, dtype=x.dtype) for _ in range(n_out)]
    outs, grads = run_triton(fn, x, w, b, idx, g, grads_out)
    routs, rgrads = ref64(fn, x, w, b, idx, g, grads_out)
    for o, r in zip(outs, routs):
        assert o.dtype == x.dtype and o.shape == r.shape
        assert rel(o.cpu(), r) < tol
    for name, gr, rg in zip(("x", "weight", "bias", "topk_w"), grads, rgrads):
        if rg is None:
            assert gr is None
            continue
        assert gr.shape == rg.shape, name
        assert rel(gr.cpu(), rg) < tol, name


# ----------------------------------------------------------------------------- numerics

CASES = [  # B, L, D, M, k, routing
    pytest.param(1, 1, 8, 3, 2, "random", id="B1-L1-D8"),
    pytest.param(3, 7, 40, 3, 3, "random", id="L7-D40-k=M"),
    pytest.param(4, 7, 40, 8, 2, "unused", id="M8-unused-expert"),
    pytest.param(3, 7, 8, 3, 1, "one_expert", id="all-on-one-expert-k1"),
    pytest.param(3, 5, 40, 4, 2, "one_expert", id="all-on-same-pair"),
    pytest.param(2, 257, 8, 3, 2, "random", id="L257"),
]


@pytest.mark.parametrize("B,L,D,M,k,mode", CASES)
def test_expert_mask_and_apply_matches_reference(B, L, D, M, k, mode):
    check_against_reference(expert_mask_and_apply, *make(B, L, D, M, k, mode=mode))


@pytest.mark.parametrize("B,L,D,M,k,mode", CASES[:3])
def test_expert_mask_matches_reference(B, L, D, M, k, mode):
    check_against_reference(expert_mask, *make(B, L, D, M, k, mode=mode))


def test_expert_mask_d384():
    check_against_reference(expert_mask_and_apply, *make(1, 7, 384, 3, 2))


@pytest.mark.parametrize(
    "Din,Dout,bias,mode", [(24, 40, True, "random"), (40, 8, False, "random"), (17, 33, True, "duplicate")]
)
def test_mixed_linear_rectangular(Din, Dout, bias, mode):
    check_against_reference(mixed_linear, *make(3, 7, Din, 4, 3, Dout=Dout, bias=bias, mode=mode))


def test_reference_formula():
    """The reference is the formula, written out sample by sample."""
    x, w, b, idx, g = (t.double().cpu() if t.is_floating_point() else t.cpu() for t in make(3, 4, 6, 3, 2))
    m = mixed_linear_reference(x, w, b, idx, g, add_one=True)
    for s in range(3):
        want = 1 + sum(g[s, j] * (x[s] @ w[idx[s, j]] + b[idx[s, j]]) for j in range(2))
        torch.testing.assert_close(m[s], want)


def test_gradcheck_reference_float64():
    x, w, b, idx, g = make(2, 3, 5, 3, 2, dtype=torch.float64, device="cpu")
    g = g.double()

    def f(x, w, b, g):
        m, r = expert_mask_and_apply(x, w, b, idx, g, backend="reference")
        return m, r, mixed_linear(x, w[:, :, :4], b[:, :4], idx, g, backend="reference")

    assert torch.autograd.gradcheck(f, leaves(x, w, b, g))


# ----------------------------------------------------------------------------- kernels directly


@pytest.mark.parametrize("cfg", [dict(BLOCK_L=16, BLOCK_N=16, BLOCK_K=16), dict(BLOCK_L=32, BLOCK_N=64, BLOCK_K=16)])
def test_forward_kernel_writes_every_element(cfg):
    x, w, b, idx, g = make(3, 19, 40, 4, 2)
    nan = lambda: torch.full((3, 19, 40), float("nan"), device=DEV)  # noqa: E731
    m, r = K.mixed_linear_forward(x, w, b, idx, g, add_one=True, apply=True, out=nan(), out_r=nan(), config=cfg)
    want = mixed_linear_reference(
        *(t.double().cpu() if t.is_floating_point() else t.cpu() for t in (x, w, b, idx, g)), add_one=True
    )
    assert rel(m.cpu(), want) < TOL32
    assert rel(r.cpu(), x.double().cpu() * want) < TOL32


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_backward_kernels_chunks_and_tiles(chunks):
    """Sample chunks (partial buffers summed in order) and small tiles crossing D and L edges."""
    B, L, D, M, k = 5, 9, 40, 4, 2
    x, w, b, idx, g = make(B, L, D, M, k)
    gm, gr = torch.randn(B, L, D, device=DEV), torch.randn(B, L, D, device=DEV)
    m = K.mixed_linear_forward(x, w, b, idx, g, add_one=True)
    dx, dw, db, dc = K.mixed_linear_backward(
        gm,
        gr,
        x,
        m,
        w,
        b,
        idx,
        g,
        chunks=chunks,
        config_dx=dict(BLOCK_L=16, BLOCK_N=16, BLOCK_K=16),
        config_wgrad=dict(BLOCK_I=16, BLOCK_O=32, BLOCK_L=16),
    )
    _, want = ref64(expert_mask_and_apply, x, w, b, idx, g, [gm, gr])
    for got, ref in zip((dx, dw, db, dc), want):
        assert rel(got.cpu(), ref) < TOL32


@pytest.mark.parametrize(
    "M,k,n_acc,mode",
    [
        pytest.param(1, 1, None, "random", id="1-accumulator"),
        pytest.param(2, 2, None, "random", id="2-accumulators-k=M"),
        pytest.param(3, 3, None, "duplicate", id="3-accumulators-repeated-idx"),
        pytest.param(4, 3, None, "unused", id="4-accumulators-unused-expert"),
        pytest.param(5, 2, None, "random", id="5-accumulators"),
        pytest.param(8, 3, None, "unused", id="8-accumulators-unused-expert"),
        pytest.param(3, 2, 0, "random", id="fallback-forced"),
        pytest.param(9, 2, None, "random", id="fallback-M9"),
    ],
)
def test_wgrad_accumulator_variants(M, k, n_acc, mode):
    """Each register-accumulator count (N_ACC = M <= 8) and the read-modify-write fallback
    (N_ACC = 0), over several chunks, rectangular weights and tiles crossing every edge;
    the partial buffers start as NaN, so an expert tile left unwritten fails."""
    B, L, Din, Dout = 7, 9, 40, 24
    x, w, b, idx, g = make(B, L, Din, M, k, Dout=Dout, mode=mode)
    gy = torch.randn(B, L, Dout, device=DEV)
    cfg = dict(BLOCK_I=16, BLOCK_O=32, BLOCK_L=16)  # 40 = 2.5 tiles, 24 < one tile
    if n_acc is not None:
        cfg["N_ACC"] = n_acc
    _, want = ref64(mixed_linear, x, w, b, idx, g, [gy])
    got = K.mixed_linear_backward(gy, None, x, None, w, b, idx, g, need_dx=False, chunks=3, config_wgrad=cfg)
    for name, gt, ref in zip(("weight", "bias", "topk_w"), got[1:], want[1:]):
        assert rel(gt.cpu(), ref) < TOL32, name
    dw_part, _, _ = K.mixed_wgrad(x, gy, w, idx, g, chunks=3, config=cfg)
    assert dw_part.shape == (3, M, Din, Dout)
    # chunk s holds exactly its samples' contributions: samples 0-2, 3-5, 6
    for s, rows in enumerate((slice(0, 3), slice(3, 6), slice(6, 7))):
        _, part = ref64(mixed_linear, x[rows], w, None, idx[rows], g[rows], [gy[rows]])
        assert rel(dw_part[s].cpu(), part[1]) < TOL32


def test_wgrad_accumulator_variants_bitwise_reproducible():
    x, w, b, idx, g = make(5, 9, 40, 3, 2)
    gy = torch.randn(5, 9, 40, device=DEV)
    for n_acc in (3, 0):
        cfg = dict(BLOCK_I=32, BLOCK_O=32, BLOCK_L=16, N_ACC=n_acc)
        a, c = (K.mixed_wgrad(x, gy, w, idx, g, chunks=2, config=cfg) for _ in range(2))
        for t, u in zip(a, c):
            assert torch.equal(t, u)


def test_wgrad_plan_and_chunk_model():
    """Register accumulation for M <= 8 (64x32 tiles from M = 5), fallback above; one chunk
    when the tiles fill the device, a few when they do not, never an empty chunk."""
    assert K._wgrad_plan(3) == (64, 64, 3) and K._wgrad_plan(4) == (64, 64, 4)
    assert K._wgrad_plan(8) == (64, 32, 8) and K._wgrad_plan(9)[2] == 0
    assert K._wgrad_plan(3, "ieee") == (64, 32, 3) and K._wgrad_plan(8, "ieee") == (32, 32, 8)
    x, w, _, idx, g = make(2, 3, 8, 9, 2)
    with pytest.raises(ValueError, match="N_ACC"):
        K.mixed_wgrad(x, torch.randn_like(x), w, idx, g, config=dict(BLOCK_I=16, BLOCK_O=16, BLOCK_L=16, N_ACC=9))

    def chunks(D, M, B, sms=132):
        bi, bo, n_acc = K._wgrad_plan(M)
        n_tiles = -(-D // bi) * -(-D // bo)
        return K._wgrad_chunks(B, 256, n_tiles, bi * bo, 4.0 * M * D * D, 0.0 if n_acc else 16.0 * bi * bo, "lp", sms)

    assert chunks(1152, 3, 32) == 1  # 324 tiles of 64x64
    assert 2 <= chunks(384, 3, 32) <= 4  # 36 tiles
    for B in (1, 2, 5, 31, 33, 200):
        c = chunks(384, 3, B)
        assert 1 <= c <= B and -(-B // -(-B // c)) == c
    for prec in ("lp", "tf32", "ieee"):
        for cfg in K._wgrad_configs(prec):
            assert cfg.num_warps == 8  # 4 warps spill with the accumulators
            assert cfg.kwargs["BLOCK_L"] >= 16  # triton 3.6: tl.dot needs K >= 16


# Compiles the weight-gradient kernel for sm_90 and sm_80 without a GPU (triton.compile with a
# GPUTarget, then ptxas -v on the PTX) and prints one JSON line per config. In a subprocess:
# under TRITON_INTERPRET=1 the kernels are interpreter objects that cannot be compiled.
_PTXAS_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from switch_dit.kernels import routed_linear as K

fn = K._mixed_wgrad_kernel
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for arch, prec, M, cfg in json.loads(sys.argv[1]):
    bi, bo, n_acc = K._wgrad_plan(M, prec)
    dtype = "*fp32" if prec != "lp" else "*bf16"
    consts = dict(s_xi=1, s_go=1, s_wo=1, s_ij=1, s_cj=1, TOPK=2, K_PAD=2, NEED_DW=1, NEED_DG=1,
                  IEEE=int(prec == "ieee"), N_ACC=n_acc, BLOCK_I=bi, BLOCK_O=bo, BLOCK_L=cfg["BLOCK_L"])
    sig = {n: "constexpr" if n in consts else "i32" for n in fn.arg_names}
    sig.update(x_ptr=dtype, g_ptr=dtype, w_ptr=dtype, idx_ptr="*i64", coef_ptr="*fp32", dw_ptr="*fp32",
               dgp_ptr="*fp32")
    div16 = ["x_ptr", "g_ptr", "w_ptr", "idx_ptr", "coef_ptr", "dw_ptr", "dgp_ptr", "L", "DI", "DO",
             "s_xb", "s_xl", "s_gb", "s_gl", "s_we", "s_wi"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options={k: v for k, v in cfg.items() if k != "BLOCK_L"})
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        open(ptx, "w").write(ck.asm["ptx"])
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True).stderr
    print(json.dumps(dict(arch=arch, prec=prec, M=M, n_acc=n_acc, tile=[bi, bo, cfg["BLOCK_L"]],
                          warps=cfg["num_warps"], stages=cfg["num_stages"], maxnreg=cfg.get("maxnreg"),
                          n_regs=int(re.search(r"Used (\d+) registers", log).group(1)),
                          n_spills=int(re.search(r"(\d+) bytes spill stores", log).group(1)),
                          wgmma="wgmma" in ck.asm["ptx"])), flush=True)
"""


@pytest.mark.skipif(
    os.environ.get("SWITCH_DIT_PTXAS_CHECK", "0") in ("", "0"),
    reason="set SWITCH_DIT_PTXAS_CHECK=1 (compiles ~130 kernels for sm_90/sm_80: minutes on CPU)",
)
def test_wgrad_kernel_registers_no_spills():
    """The weight-gradient kernel's default configs, and its autotuning candidates for M = 1, 3,
    8 and the fallback, compile for sm_90 and sm_80 (bf16, fp32 TF32, fp32 IEEE) without
    register spills; the MMA variants use wgmma on sm_90. Run with -s to see the numbers."""
    import json
    import subprocess
    import sys

    def as_dict(c):
        return dict(
            c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, **({"maxnreg": c.maxnreg} if c.maxnreg else {})
        )

    jobs = []
    for arch in (90, 80):
        for prec in ("lp", "tf32", "ieee"):
            for M in (1, 2, 3, 4, 5, 8, 9):
                jobs.append((arch, prec, M, K._wgrad_default(prec)))
                if M in (1, 3, 8, 9):
                    jobs += [(arch, prec, M, as_dict(c)) for c in K._wgrad_configs(prec)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _PTXAS_SCRIPT, json.dumps(jobs)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(jobs)
    for r in rows:
        print(r)
    bad = [
        r
        for r, job in zip(rows, jobs)
        if r["n_spills"]
        and (
            job[3] == K._wgrad_default(job[1])  # a default config: never
            # an autotuning candidate: only a small spill where ptxas itself capped the registers
            # at 128 for two programs per SM (no .maxnreg given); the autotuner times it
            or r["n_regs"] != 128
            or r["maxnreg"]
            or r["n_spills"] > 64
        )
    ]
    assert not bad, bad
    assert all(r["wgmma"] for r in rows if r["arch"] == 90 and r["prec"] != "ieee")


def test_backward_only_some_gradients():
    x, w, b, idx, g = make(2, 5, 8, 3, 2)
    gy = torch.randn(2, 5, 8, device=DEV)
    _, want = ref64(expert_mask, x, w, b, idx, g, [gy])
    for flags in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 0, 1, 1)]:
        got = K.mixed_linear_backward(
            gy, None, x, None, w, b, idx, g, need_dx=flags[0], need_dw=flags[1], need_db=flags[2], need_dc=flags[3]
        )
        for f, gt, ref in zip(flags, got, want):
            assert (gt is None) == (not f)
            if f:
                assert rel(gt.cpu(), ref) < TOL32


def test_only_some_inputs_require_grad():
    x, w, b, idx, g = make(2, 5, 8, 3, 2)
    xl = x.clone().requires_grad_()
    expert_mask(xl, w, b, idx, g, backend="triton").sum().backward()
    _, want = ref64(expert_mask, x, w, b, idx, g, [torch.ones(2, 5, 8)])
    assert rel(xl.grad.cpu(), want[0]) < TOL32
    gl = g.clone().requires_grad_()
    mixed_linear(x, w, None, idx, gl, backend="triton").sum().backward()
    _, want = ref64(mixed_linear, x, w, None, idx, g, [torch.ones(2, 5, 8)])
    assert rel(gl.grad.cpu(), want[3]) < TOL32


# ----------------------------------------------------------------------------- layouts, dtypes


def test_non_contiguous_inputs_and_stride0_grads():
    B, L, D, M, k = 3, 6, 24, 4, 2
    x, w, b, idx, g = make(B, L, D, M, k)
    xs = x.transpose(0, 1).contiguous().transpose(0, 1)  # (B, L, D) with B stride D
    ws = w.transpose(1, 2).contiguous().transpose(1, 2)  # column-major experts
    bs = torch.stack([b, b], -1)[..., 0]  # stride 2 along D
    gs = torch.stack([g, g], 1)[:, 0]  # coef rows strided
    ids = torch.stack([idx, idx], 1)[:, 0]
    assert not any(t.is_contiguous() for t in (xs, ws, bs, gs, ids))
    # .sum() hands the backward an expanded (stride 0) gradient
    x1, w1, b1, g1 = leaves(xs, ws, bs, gs)
    m, r = expert_mask_and_apply(x1, w1, b1, ids, g1, backend="triton")
    (m.sum() + r.sum()).backward()
    ones = torch.ones(B, L, D)
    routs, rgrads = ref64(expert_mask_and_apply, x, w, b, idx, g, [ones, ones])
    assert rel(m.cpu(), routs[0]) < TOL32 and rel(r.cpu(), routs[1]) < TOL32
    for got, ref in zip((x1.grad, w1.grad, b1.grad, g1.grad), rgrads):
        assert rel(got.cpu(), ref) < TOL32
    # a strided (not just expanded) gradient
    x2, w2, b2, g2 = leaves(xs, ws, bs, gs)
    gy = torch.randn(B, D, L, device=DEV).transpose(1, 2)
    expert_mask(x2, w2, b2, ids, g2, backend="triton").backward(gy)
    _, rgrads = ref64(expert_mask, x, w, b, idx, g, [gy])
    for got, ref in zip((x2.grad, w2.grad, b2.grad, g2.grad), rgrads):
        assert rel(got.cpu(), ref) < TOL32


def test_float16_forward_and_backward():
    """fp16 kernels: error vs float64 within 2x the fp16 PyTorch reference's error (docs/design.md §4),
    with no absolute slack: measured at 0.5-0.8x; rounding the gate coefficients to bf16 inside the
    kernels gives 3.5-10x, so this test catches it."""
    x, w, b, idx, g = make(3, 7, 40, 4, 2, dtype=torch.float16)
    gm, gr = (
        torch.randn(3, 7, 40, device=DEV, dtype=torch.float16),
        torch.randn(3, 7, 40, device=DEV, dtype=torch.float16),
    )
    outs, grads = run_triton(expert_mask_and_apply, x, w, b, idx, g, [gm, gr])
    routs, rgrads = ref64(expert_mask_and_apply, x, w, b, idx, g, [gm, gr])
    houts, hgrads = _ref_same_dtype(x.cpu(), w.cpu(), b.cpu(), idx.cpu(), g.cpu(), [gm.cpu(), gr.cpu()])
    for o, ro, ho in zip(outs, routs, houts):
        assert o.dtype == torch.float16
        assert rel(o.cpu(), ro) <= 2 * rel(ho, ro)
    for gt, rg, hg, t in zip(grads, rgrads, hgrads, (x, w, b, g)):
        assert gt.dtype == t.dtype
        assert rel(gt.cpu(), rg) <= 2 * rel(hg, rg)


def _ref_same_dtype(x, w, b, idx, g, grads_out):
    x, w, b, g = leaves(x, w, b, g)
    outs = expert_mask_and_apply(x, w, b, idx, g, backend="reference")
    torch.autograd.backward(outs, grads_out)
    return outs, [t.grad for t in (x, w, b, g)]


def test_gradients_bitwise_reproducible():
    x, w, b, idx, g = make(4, 9, 40, 4, 2)
    go = [torch.randn(4, 9, 40, device=DEV) for _ in range(2)]
    runs = [run_triton(expert_mask_and_apply, x, w, b, idx, g, go) for _ in range(2)]
    for a, c in zip(runs[0][0] + tuple(runs[0][1]), runs[1][0] + tuple(runs[1][1])):
        assert torch.equal(a, c)


def test_empty_batch_and_tokens():
    for B, L in ((0, 4), (2, 0)):
        x, w, b, idx, g = (
            make(B, L, 8, 3, 2)
            if B
            else (
                torch.randn(0, L, 8, device=DEV),
                torch.randn(3, 8, 8, device=DEV),
                torch.randn(3, 8, device=DEV),
                torch.zeros(0, 2, dtype=torch.long, device=DEV),
                torch.rand(0, 2, device=DEV),
            )
        )
        x1, w1, b1, g1 = leaves(x, w, b, g)
        m = expert_mask(x1, w1, b1, idx, g1, backend="triton")
        assert m.shape == (B, L, 8)
        m.sum().backward()
        assert torch.count_nonzero(w1.grad) == 0 and torch.count_nonzero(g1.grad) == 0


def test_autocast_dtypes():
    """Under autocast the op runs in the autocast dtype; gradients return in each input's dtype."""
    dt = torch.bfloat16 if HAS_CUDA else torch.float16  # interpreter: no bf16 tl.dot
    x, w, b, idx, g = make(2, 5, 16, 3, 2)
    x1, w1, b1, g1 = leaves(x, w, b, g)
    with torch.autocast(DEV, dtype=dt):
        m, r = expert_mask_and_apply(x1, w1, b1, idx, g1, backend="triton")
        assert m.dtype == dt and r.dtype == dt
        (m.float().sum() + r.float().square().sum()).backward()
    assert x1.grad.dtype == w1.grad.dtype == b1.grad.dtype == g1.grad.dtype == torch.float32
    _, want = ref64(expert_mask_and_apply, x, w, b, idx, g, [torch.ones(2, 5, 16), 2 * r.detach().float()])
    # Autocast rounds the op's inputs and its outputs to dt: two roundings of at most the unit
    # roundoff u = eps / 2 each, so the float32 gradients are within eps of float64 (fp16: measured
    # <= 0.6 eps; coefficients rounded to bf16 inside the kernels: 1.6-4.7 eps).
    for got, ref in zip((x1.grad, w1.grad, b1.grad, g1.grad), want):
        assert rel(got.cpu(), ref) < torch.finfo(dt).eps
    # inputs already in the autocast dtype next to float32 parameters (as F.linear accepts)
    x2, w2 = leaves(x.to(dt), w)
    with torch.autocast(DEV, dtype=dt):
        expert_mask(x2, w2, None, idx, g, backend="triton").float().sum().backward()
    assert x2.grad.dtype == dt and w2.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- registration


def test_opcheck():
    x, w, b, idx, g = make(2, 3, 8, 3, 2)
    x1, w1, b1, g1 = leaves(x, w, b, g)
    gy = torch.randn(2, 3, 8, device=DEV)
    ops = torch.ops.switch_dit
    for op, args in [
        (ops.mixed_linear.default, (x1, w1, b1, idx, g1, True)),
        (ops.mixed_linear.default, (x1, w1, None, idx, g1, False)),
        (ops.expert_mask_apply.default, (x1, w1, b1, idx, g1)),
        (ops.mixed_linear_backward.default, (gy, gy, x, x, w, b, idx, g, True, True, True, True)),
        (ops.mixed_linear_backward.default, (gy, None, x, None, w, None, idx, g, False, True, False, True)),
    ]:
        torch.library.opcheck(op, args)


def test_compile_plumbing_fullgraph_matches_eager():
    """Compile plumbing only (the kernels compared with themselves): no graph break, and the same
    gradients compiled as eager. Their numerics are tested against the reference above."""
    x, w, b, idx, g = make(2, 5, 16, 3, 2)

    def step(x, w, b, g):
        m, r = expert_mask_and_apply(x, w, b, idx, g, backend="triton")
        y = mixed_linear(r, w, b, idx, g, backend="triton")
        return (m * y).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    x1, w1, b1, g1 = leaves(x, w, b, g)
    compiled(x1, w1, b1, g1).backward()
    x2, w2, b2, g2 = leaves(x, w, b, g)
    step(x2, w2, b2, g2).backward()
    for a, c in zip((x1, w1, b1, g1), (x2, w2, b2, g2)):
        assert rel(a.grad, c.grad) < TOL32


def test_auto_backend():
    x, w, b, idx, g = make(2, 3, 8, 3, 2, device="cpu")
    m_auto = expert_mask(x, w, b, idx, g)
    m_ref = expert_mask(x, w, b, idx, g, backend="reference")
    if not HAS_CUDA:
        assert torch.equal(m_auto, m_ref)  # CPU tensors: auto is the reference
    m64 = expert_mask(x.double(), w.double(), b.double(), idx, g, backend="auto")
    assert m64.dtype == torch.float64


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    x, w, b, idx, g = make(2, 3, 8, 3, 2)

    def err(match, *args, fn=expert_mask, backend="triton"):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(*args, backend=backend)

    err("x must", x[0], w, b, idx, g)
    err("weight must have shape", x, w[:, :4], b, idx, g)
    err("weight must be square", x, w[:, :, :4], b[:, :4], idx, g)
    err("bias must have shape", x, w, b[:2], idx, g)
    err("topk_idx must have shape", x, w, b, idx[:1], g)
    err("topk_idx must be int64", x, w, b, idx.float(), g)
    err("k = 4", x, w, b, torch.zeros(2, 4, dtype=torch.long, device=DEV), torch.rand(2, 4, device=DEV))
    err("topk_w must have shape", x, w, b, idx, g[:, :1])
    err("topk_w must be a floating", x, w, b, idx, idx)
    err("weight dtype", x, w.double(), b, idx, g)
    err("bias dtype", x, w, b.half(), idx, g)
    err("not a strategy of expert_mask.*reference", x, w, b, idx, g, backend="cuda")
    err("x must be a torch.Tensor", x.tolist(), w, b, idx, g)
    for bad in (torch.tensor([[0, 3], [1, 2]]), torch.tensor([[0, -1], [1, 2]])):
        err(r"topk_idx values must be in \[0, 3\)", x.cpu(), w.cpu(), b.cpu(), bad, g.cpu(), backend="reference")
        if not HAS_CUDA:
            err(r"topk_idx values must be in \[0, 3\)", x, w, b, bad, g)
    err(
        "cannot run expert_mask.*supports x of dtype float16",
        x.double().cpu(),
        w.double().cpu(),
        b.double().cpu(),
        idx.cpu(),
        g.cpu(),
    )
    other = "cpu" if HAS_CUDA else "meta"
    err("weight is on", x, w.to(other), b, idx, g)
    err("topk_idx is on", x, w, b, idx.to(other), g)


# ----------------------------------------------------------------------------- GPU only


def _gpu_case(D, dtype, B=8, L=256, M=3, k=2):
    x, w, b, idx, g = make(B, L, D, M, k, dtype=dtype)
    return x, w, b, idx, g  # g stays float32, as gate probabilities do


@gpu
@pytest.mark.parametrize("D", [384, 768, 1152])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_vs_same_dtype_torch(D, dtype):
    x, w, b, idx, g = _gpu_case(D, dtype)
    go = [torch.randn(x.shape, device=DEV, dtype=dtype) for _ in range(2)]
    outs, grads = run_triton(expert_mask_and_apply, x, w, b, idx, g, go)
    routs, rgrads = ref64(expert_mask_and_apply, x, w, b, idx, g, go)
    houts, hgrads = _ref_same_dtype(x, w, b, idx, g, go)
    for o, ro, ho in zip(outs, routs, houts):
        assert rel(o.cpu(), ro) <= 2 * rel(ho.cpu(), ro)
    for gt, rg, hg in zip(grads, rgrads, hgrads):
        assert rel(gt.cpu(), rg) <= 2 * rel(hg.cpu(), rg)


@gpu
@pytest.mark.parametrize(
    "M,k,mode",
    [
        pytest.param(5, 2, "random", id="5-accumulators"),
        pytest.param(6, 3, "duplicate", id="6-accumulators-repeated-idx"),
        pytest.param(7, 2, "unused", id="7-accumulators-unused-expert"),
        pytest.param(8, 3, "duplicate", id="8-accumulators-repeated-idx"),
        pytest.param(9, 3, "duplicate", id="fallback-M9-repeated-idx"),
        pytest.param(12, 2, "duplicate", id="fallback-M12-repeated-idx"),
    ],
)
@pytest.mark.parametrize("D", [200, 1152])  # 200 is no multiple of any tile size
def test_gpu_accumulators_fallback_and_ragged_D_float32(M, k, mode, D):
    """The compiled (not interpreted) kernels with M = 5..8 accumulator tiles and the M > 8
    fallback, repeated indices, and a width that no tile divides, in exact fp32 (TF32 off)."""
    check_against_reference(expert_mask_and_apply, *make(4, 100, D, M, k, mode=mode))


@gpu
def test_gpu_tf32_float32_within_twice_pytorch_tf32_error():
    """fp32 with TF32 allowed: the kernels' error is within 2x the error of PyTorch's own TF32
    reference (docs/design.md §4), and PyTorch's error shows that TF32 was really on."""
    torch.set_float32_matmul_precision("high")  # conftest's fixture restores "highest"
    x, w, b, idx, g = _gpu_case(384, torch.float32)
    go = [torch.randn(x.shape, device=DEV) for _ in range(2)]
    outs, grads = run_triton(expert_mask_and_apply, x, w, b, idx, g, go)
    routs, rgrads = ref64(expert_mask_and_apply, x, w, b, idx, g, go)
    houts, hgrads = _ref_same_dtype(x, w, b, idx, g, go)
    assert rel(houts[0].cpu(), routs[0]) > 1e-5, "PyTorch's reference did not use TF32"
    for got, ref, same in zip([*outs, *grads], [*routs, *rgrads], [*houts, *hgrads]):
        err_torch = rel(same.cpu(), ref)
        # the bias gradient has no product in it: plain fp32 on both sides
        assert rel(got.cpu(), ref) <= (2 * err_torch if err_torch > TOL32 else TOL32)


@gpu
def test_gpu_bitwise_reproducible_and_64bit_offsets():
    x, w, b, idx, g = _gpu_case(384, torch.bfloat16, B=16)
    go = [torch.randn(x.shape, device=DEV, dtype=x.dtype) for _ in range(2)]
    runs = [run_triton(expert_mask_and_apply, x, w, b, idx, g, go) for _ in range(3)]
    for r in runs[1:]:
        for a, c in zip(runs[0][0] + tuple(runs[0][1]), r[0] + tuple(r[1])):
            assert torch.equal(a, c)
    # B * L * D > 2^31: the last sample sits past the 32-bit range.
    free = torch.cuda.mem_get_info()[0]
    B, L, D = 2, (1 << 30) // 1024 + 64, 1024
    if free < 4 * B * L * D * 2 + (1 << 30):
        pytest.skip("not enough GPU memory for the 64-bit offset check")
    x = torch.randn(B, L, D, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(2, D, D, device=DEV, dtype=torch.bfloat16) / 32
    idx = torch.tensor([[0], [1]], device=DEV)
    g = torch.rand(B, 1, device=DEV)
    m = expert_mask(x, w, None, idx, g, backend="triton")
    tail = slice(L - 8, L)
    want = 1 + g[1, 0] * (x[1, tail].float() @ w[1].float())
    assert rel(m[1, tail].float(), want) < 1e-2


@gpu
def test_gpu_cuda_graph_and_no_sync():
    x, w, b, idx, g = _gpu_case(384, torch.bfloat16)
    x1, w1, b1, g1 = leaves(x, w, b, g)

    def step():
        m, r = expert_mask_and_apply(x1, w1, b1, idx, g1, backend="triton")
        (m.float().sum() + r.float().square().sum()).backward()
        return m

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up: autotuning and compilation happen here
            step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in (x1, w1, b1, g1):
            t.grad = None  # (the warm-up accumulated three steps)
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = [t.grad.clone() for t in (x1, w1, b1, g1)]  # one eager step

    for t in (x1, w1, b1, g1):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        m_static = step()
    for t in (x1, w1, b1, g1):
        t.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for t, ref in zip((x1, w1, b1, g1), want):
        assert torch.equal(t.grad, ref)
    assert torch.isfinite(m_static).all()


@gpu
def test_gpu_compile_plumbing_inductor_matches_eager():
    """Compile plumbing only (the kernels compared with themselves), under inductor on the GPU."""
    x, w, b, idx, g = _gpu_case(384, torch.bfloat16, B=4)
    f = torch.compile(lambda x, w, b, g: expert_mask_and_apply(x, w, b, idx, g)[1], fullgraph=True)
    assert rel(f(x, w, b, g).float(), expert_mask_and_apply(x, w, b, idx, g)[1].float()) < 1e-2


def test_tf32_setting_is_read_through_either_api():
    """The kernels' fp32 mode follows PyTorch's TF32 switch whether it was set with the
    legacy flag, set_float32_matmul_precision or the fp32_precision API (reading the legacy
    flag after the new API raises on torch >= 2.9). conftest restores the setting."""
    mm = torch.backends.cuda.matmul
    torch.set_float32_matmul_precision("high")
    assert K.tf32_matmul_allowed()
    torch.set_float32_matmul_precision("highest")
    assert not K.tf32_matmul_allowed()
    mm.allow_tf32 = True
    assert K.tf32_matmul_allowed()
    mm.allow_tf32 = False
    if hasattr(mm, "fp32_precision"):
        mm.fp32_precision = "tf32"
        assert K.tf32_matmul_allowed()
        mm.fp32_precision = "ieee"
        assert not K.tf32_matmul_allowed()
        mm.fp32_precision, saved = "none", torch.backends.fp32_precision
        try:
            torch.backends.fp32_precision = "tf32"  # "none" inherits the global setting
            assert K.tf32_matmul_allowed()
        finally:
            torch.backends.fp32_precision = saved
