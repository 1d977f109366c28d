"""The "compiled" strategy of the norm/residual ops (switch_dit.ops.compiled_reference).

torch.compile (Inductor, on the CPU here) of the plain twins against the twins themselves, forward
and backward, float64 and float32, with a stride-0 gradient. Every distinct input signature costs
a compilation of a few seconds, so the cases are few and chosen to cover each op's branches.
"""

import pytest
import torch

from switch_dit.ops import compiled_reference as CR
from switch_dit.ops.norm_modulate import (
    gated_residual_reference,
    mask_ln_modulate_reference,
    residual_ln_modulate_reference,
)

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


def check(got, want, inputs, dtype):
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    assert len(got) == len(want)
    for a, r in zip(got, want):
        assert a.dtype == r.dtype and a.shape == r.shape
        assert rel(a, r) < TOL[dtype]
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    # .sum() hands the backward an expanded (stride-0) gradient
    loss_got = sum(o.sum() * (i + 1) for i, o in enumerate(got))
    loss_want = sum(o.sum() * (i + 1) for i, o in enumerate(want))
    for a, r in zip(torch.autograd.grad(loss_got, leaves), torch.autograd.grad(loss_want, leaves)):
        assert rel(a, r) < TOL[dtype]


@pytest.mark.parametrize("dtype,mask", [(torch.float64, "full"), (torch.float64, None), (torch.float32, "row")])
def test_mask_ln_modulate(dtype, mask):
    B, L, D = 2, 5, 20  # D not a power of two
    x = rand(B, L, D, dtype=dtype, seed=1)
    m = {
        "full": lambda: rand(B, L, D, dtype=dtype, seed=2),
        "row": lambda: rand(B, 1, D, dtype=dtype, seed=2),
        None: lambda: None,
    }[mask]()
    shift, scale = rand(B, D, dtype=dtype, seed=3), rand(B, D, dtype=dtype, seed=4)
    got = CR.mask_ln_modulate_compiled(x, m, shift, scale, eps=1e-5, return_r0=True)
    want = mask_ln_modulate_reference(x, m, shift, scale, 1e-5)
    check(got, want, (x, m, shift, scale), dtype)
    h = CR.mask_ln_modulate_compiled(x, m, shift, scale, eps=1e-5)
    assert torch.equal(h, got[1])


@pytest.mark.parametrize("dtype", [torch.float64])
def test_residual_ln_modulate(dtype):
    B, L, D = 3, 4, 12
    z, r0, attn = (rand(B, L, D, dtype=dtype, seed=s) for s in (1, 2, 3))
    gate, shift, scale = (rand(B, D, dtype=dtype, seed=s) for s in (4, 5, 6))
    got = CR.residual_ln_modulate_compiled(z, r0, attn, gate, shift, scale)
    want = residual_ln_modulate_reference(z, r0, attn, gate, shift, scale)
    check(got, want, (z, r0, attn, gate, shift, scale), dtype)


def test_gated_residual_and_the_cache():
    z, y = rand(2, 3, 8, dtype=torch.float64, seed=1), rand(2, 3, 8, dtype=torch.float64, seed=2)
    gate = rand(2, 8, dtype=torch.float64, seed=3)
    check(CR.gated_residual_compiled(z, y, gate), gated_residual_reference(z, y, gate), (z, y, gate), torch.float64)
    assert CR.compiled("gated_residual") is CR.compiled("gated_residual")  # compiled once per process
    with pytest.raises(ValueError, match="no compiled twin for op 'expert_mask'"):
        CR.compiled("expert_mask")


def test_inside_an_outer_compile_the_twin_is_traced():
    x, shift, scale = (rand(2, 3, 8, dtype=torch.float64, seed=s) for s in (1, 2, 3))
    shift, scale = shift[:, 0].detach(), scale[:, 0].detach()
    calls = []

    def twin(*args):
        calls.append(torch.compiler.is_compiling())
        return mask_ln_modulate_reference(*args)

    outer = torch.compile(
        lambda x: CR.mask_ln_modulate_compiled(x, None, shift, scale), backend="eager", fullgraph=True
    )
    saved = CR._TWINS["mask_ln_modulate"]
    CR._TWINS["mask_ln_modulate"] = twin
    try:
        out = outer(x)
    finally:
        CR._TWINS["mask_ln_modulate"] = saved
    assert calls and all(calls)  # traced by the outer compile, not a nested compiled call
    assert rel(out, mask_ln_modulate_reference(x, None, shift, scale, 1e-6)[1]) < 1e-12


def test_selectable_by_name_through_the_public_ops():
    from switch_dit import ops

    for op in ("mask_ln_modulate", "residual_ln_modulate", "gated_residual"):
        assert "compiled" in ops.strategies(op)
    z, y = rand(2, 3, 8, dtype=torch.float64, seed=1), rand(2, 3, 8, dtype=torch.float64, seed=2)
    gate = rand(2, 8, dtype=torch.float64, seed=3)  # the signature compiled above: no new compilation
    check(
        ops.gated_residual(z, y, gate, backend="compiled"),
        gated_residual_reference(z, y, gate),
        (z, y, gate),
        torch.float64,
    )
    assert "'compiled' (named by backend)" in ops.explain("gated_residual", z, y, gate, backend="compiled")
