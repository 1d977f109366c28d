"""switch_dit.accelerate (switch_dit/dropin.py) on a stand-in of the public reference implementation.

The stand-in (benchmarks/reference_code.py) is a minimal model written to the reference
code's module names and semantics; it does not import switch_dit. The reference
repository is not a dependency.

Prior loss: the reference DiffusionPrior shuffles the columns of both binary maps with
torch.rand before the Hungarian solve. Two comparisons cover it:
  - accelerate(prior="exact") calls the model's own prior, and draws the same random
    numbers in the same order as the unpatched model, so under one seed the aux losses
    are equal (float64 test);
  - accelerate(prior="matched"), the default, solves the unshuffled cost: it is compared
    with the stand-in whose prior has ``shuffle = False`` (a deterministic prior that
    is otherwise the reference's), where both must pick the same assignment (same cost
    matrix, same scipy solver).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import switch_dit
from benchmarks.reference_code import DiTBlock, RefDiT
from switch_dit.models import create
from tests.test_models import randomize
from tests.tolerances import fp32_gradient_ok

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


ROUTINGS = ["DMoE", "DTR", "none"]


def build(routing, seed=0, std=0.15, **kw):
    """A stand-in with every parameter (and the frozen pos_embed) random."""
    return randomize(RefDiT(routing, **kw), seed=seed, std=std)


def inputs(model, B=3, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 6, 6, generator=g, dtype=dtype)
    t = torch.randint(0, 50, (B,), generator=g)
    y = torch.randint(0, 5, (B,), generator=g)
    return x, t, y


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(model, x, t, y, g, seed=11):
    """One training forward + backward under a fixed seed: (output, aux loss as a float)."""
    torch.manual_seed(seed)  # label dropout and the reference prior's shuffle draw from it
    out, aux = model(x, t, y)
    loss = (out * g).sum() + aux
    loss.backward()
    return out.detach(), float(aux.detach()) if torch.is_tensor(aux) else float(aux)


@pytest.mark.parametrize("backend", ["reference", "bmm", "grouped"])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_float64_equals_unpatched(routing, backend):
    """float64, prior "exact": outputs, aux loss (same random shuffle) and every gradient equal the
    unpatched model's to rounding, on the model as written ("reference") and through the routing
    plan and the cuBLAS compositions ("bmm", "grouped": the plan's grouping)."""
    ref = build(routing).double().train()
    fast = switch_dit.accelerate(copy.deepcopy(ref), backend=backend, prior="exact")
    x, t, y = inputs(ref, dtype=torch.float64)
    g = torch.randn(3, 6, 6, 6, dtype=torch.float64)
    out_r, aux_r = run(ref, x, t, y, g)
    out_f, aux_f = run(fast, x, t, y, g)
    torch.testing.assert_close(out_f, out_r, rtol=1e-10, atol=1e-12)
    assert aux_f == pytest.approx(aux_r, rel=1e-10, abs=1e-14)
    if routing == "DMoE":
        assert aux_r > 0
    for (name, pr), (_, pf) in zip(ref.named_parameters(), fast.named_parameters()):
        if pr.grad is None:
            assert pf.grad is None, name
            continue
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_triton_float32_matches_unpatched(routing):
    """backend "triton" (interpreter on CPU), float32, prior "matched" against the stand-in
    with a deterministic prior: the patched model's float32 error against the float64
    stand-in is at most twice the float32 stand-in's, or under the float32 target
    (docs/design.md §4, tests/tolerances.py)."""
    # Seeded like the inputs: label dropout and g draw from the global generator, which made the
    # result depend on the tests run before. The gate-weight gradients' errors are float32 ulp noise
    # after the softmax backward's cancellation (tests/tolerances.py).
    torch.manual_seed(4)
    ref64 = build(routing, seed=3).double().train()
    if routing == "DMoE":
        ref64.prior.shuffle = False
    if HAS_CUDA:  # CPU and CUDA generators would drop different labels
        ref64.y_embedder.dropout_prob = 0.0
    ref32 = copy.deepcopy(ref64).float()
    fast = switch_dit.accelerate(copy.deepcopy(ref32).to(DEV), backend="triton")
    x, t, y = inputs(ref64, seed=4, dtype=torch.float64)
    g = torch.randn(3, 6, 6, 6, dtype=torch.float64)
    out64, aux64 = run(ref64, x, t, y, g)
    out32, aux32 = run(ref32, x.float(), t, y, g.float())
    outf, auxf = run(fast, x.float().to(DEV), t.to(DEV), y.to(DEV), g.float().to(DEV))
    assert torch.isfinite(outf).all()
    assert rel(outf.cpu(), out64) <= 2 * rel(out32, out64) + 1e-6 and rel(outf.cpu(), out64) < 1e-5
    assert abs(auxf - aux64) <= 2 * abs(aux32 - aux64) + 1e-6
    for (name, p64), (_, p32), (_, pf) in zip(
        ref64.named_parameters(), ref32.named_parameters(), fast.named_parameters()
    ):
        if p64.grad is None:
            assert pf.grad is None, name
            continue
        err, base = rel(pf.grad.cpu(), p64.grad), rel(p32.grad, p64.grad)
        assert fp32_gradient_ok(err, base), (name, err, base)


def test_eval_returns_the_output_only_and_cfg_works():
    ref = build("DMoE", seed=5).double().eval()
    fast = switch_dit.accelerate(copy.deepcopy(ref), backend="reference")
    x, t, y = inputs(ref, B=2, dtype=torch.float64)
    with torch.no_grad():
        out = fast(x, t, y)
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, ref(x, t, y), rtol=1e-10, atol=1e-12)
        y_cfg = torch.tensor([1, 5])  # second half: the null class
        torch.testing.assert_close(
            fast.forward_with_cfg(x, t, y_cfg, 1.5), ref.forward_with_cfg(x, t, y_cfg, 1.5), rtol=1e-10, atol=1e-12
        )


def test_state_dict_parameters_and_an_earlier_optimizer_survive_the_patch():
    model = build("DMoE", seed=6).to(DEV)  # backend "triton" needs CUDA tensors where there is a GPU
    twin = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # created before the patch
    opt_twin = torch.optim.SGD(twin.parameters(), lr=1e-3)
    assert switch_dit.accelerate(model, backend="triton") is model
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert isinstance(model, RefDiT) and isinstance(model.blocks[0], DiTBlock)
    twin.load_state_dict(model.state_dict())  # checkpoints stay loadable by the reference code
    x, t, y = (v.to(DEV) for v in inputs(model))
    g = torch.randn(3, 6, 6, 6, device=DEV)
    twin.prior.shuffle = False
    for m, o in ((model, opt), (twin, opt_twin)):
        o.zero_grad()
        run(m, x, t, y, g)
        o.step()
    changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before) if p.requires_grad]
    assert all(changed)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert rel(p, q) < 1e-6, name


def test_ddp_wrapping_after_and_before_the_patch(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ref = build("DMoE", seed=7)
        ref.prior.shuffle = False
        after = DDP(switch_dit.accelerate(copy.deepcopy(ref), backend="reference"))
        before = switch_dit.accelerate(DDP(copy.deepcopy(ref)), backend="reference")  # patches .module
        assert isinstance(before, DDP) and type(before.module).__name__ == "AcceleratedRefDiT"
        x, t, y = inputs(ref)
        g = torch.randn(3, 6, 6, 6)
        out_r, aux_r = run(ref, x, t, y, g)
        for wrapped in (after, before):
            out, aux = run(wrapped, x, t, y, g)
            assert rel(out, out_r) < 1e-6
            assert aux == pytest.approx(aux_r, rel=1e-5)
            for (name, p), (_, q) in zip(wrapped.module.named_parameters(), ref.named_parameters()):
                if q.grad is not None:
                    assert rel(p.grad, q.grad) < 1e-5, name
    finally:
        dist.destroy_process_group()


def test_copies_and_pickles_stay_accelerated():
    model = switch_dit.accelerate(build("DTR", seed=8).eval(), backend="reference")
    model._switch_dit_matcher = lambda cost: None  # transient state: neither copied nor pickled
    x, t, y = inputs(model)
    want = model(x, t, y)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for copy_ in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert type(copy_) is type(model) and type(copy_.blocks[1]) is type(model.blocks[1])
        assert "_switch_dit_matcher" not in copy_.__dict__
        torch.testing.assert_close(copy_(x, t, y), want, rtol=0, atol=0)


def test_patched_model_compiles_fullgraph():
    ref = build("DMoE", seed=10).to(DEV).eval()
    fast = switch_dit.accelerate(copy.deepcopy(ref), backend="triton")
    x, t, y = (v.to(DEV) for v in inputs(ref))
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel(compiled(x, t, y), ref(x, t, y)) < 1e-5


def test_patching_again_changes_the_settings():
    model = switch_dit.accelerate(build("DMoE"), backend="triton")
    cls = type(model.blocks[0])
    switch_dit.accelerate(model, backend="reference", prior="exact")
    assert type(model.blocks[0]) is cls
    assert model._switch_dit_backend == "reference" and model.blocks[0]._switch_dit_backend == "reference"
    assert model._switch_dit_prior == "exact"


def test_bad_input_says_what_was_expected():
    with pytest.raises(TypeError, match="reference code"):
        switch_dit.accelerate(42)
    with pytest.raises(ValueError, match="(?s)reference code.*no attribute 'x_embedder'"):
        switch_dit.accelerate(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="set_backend"):
        switch_dit.accelerate(create("DiT-S/2", input_size=8, hidden_size=24, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="backend"):
        switch_dit.accelerate(build("DMoE"), backend="cuda")
    with pytest.raises(ValueError, match="prior must be"):
        switch_dit.accelerate(build("DMoE"), prior="shuffled")
    with pytest.raises(TypeError, match="before torch.compile"):
        switch_dit.accelerate(torch.compile(build("none")))
    no_prior = build("DMoE")
    del no_prior.prior
    with pytest.raises(ValueError, match="DiffusionPrior"):
        switch_dit.accelerate(no_prior)
    affine = build("none")
    affine.blocks[1].norm2 = nn.LayerNorm(40, eps=1e-6)
    with pytest.raises(ValueError, match=r"blocks\[1\].norm2 must be nn.LayerNorm\(40, elementwise_affine=False\)"):
        switch_dit.accelerate(affine)
    uneven = build("DMoE")
    uneven.routers[1].k = 3
    with pytest.raises(ValueError, match="same num_experts and k"):
        switch_dit.accelerate(uneven)
    # a failed check leaves the model untouched
    assert type(uneven) is RefDiT and type(uneven.blocks[0]) is DiTBlock
    fast = switch_dit.accelerate(build("DMoE"), backend="reference")
    x, t, y = inputs(fast)
    with pytest.raises(ValueError, match=r"t \(timesteps\) values must be in \[0, 50\)"):
        fast(x, torch.tensor([0, 1, 50]), y)


@pytest.mark.gpu
@pytest.mark.parametrize("routing", ROUTINGS)
def test_gpu_bf16_patched_vs_unpatched(routing):
    """bf16 autocast on the GPU: the patched model's error against the float32 unpatched model
    is at most twice the unpatched bf16 model's, plus a small atol; same for the gradients."""
    ref = build(routing, seed=9, hidden_size=384, num_heads=6, input_size=16, depth=3, std=0.05).cuda().train()
    if routing == "DMoE":
        ref.prior.shuffle = False
    fast = switch_dit.accelerate(copy.deepcopy(ref), backend="auto")
    base = copy.deepcopy(ref)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    t = torch.randint(0, 50, (4,), device="cuda")
    y = torch.randint(0, 5, (4,), device="cuda")
    g = torch.randn(4, 6, 16, 16, device="cuda")
    want, _ = run(ref, x, t, y, g)
    with torch.autocast("cuda", torch.bfloat16):
        got, _ = run(fast, x, t, y, g)
        low, _ = run(base, x, t, y, g)
    assert rel(got, want) <= 2 * rel(low, want) + 1e-3
    for (name, p), (_, q), (_, b) in zip(fast.named_parameters(), ref.named_parameters(), base.named_parameters()):
        if q.grad is not None and q.grad.norm() > 0:
            assert rel(p.grad, q.grad) <= 2 * rel(b.grad, q.grad) + 1e-2, name
