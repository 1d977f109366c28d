"""Remix-DiT (switch_dit.remix_dit): the reference path against a float64 re-statement of
the published forward, the prior, the initialisation (from scratch and from a DiT), the
fast paths against the reference (forward and every gradient), gradcheck, bad input.

The Triton kernels run under the interpreter on CPU (tests/conftest.py), in float32.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from switch_dit import interop, remix_dit
from switch_dit.models import MODEL_NAMES, create
from tests.gloo import cpu_rank, free_port
from tests.test_fast_path import forward_backward_three_ways
from tests.test_models import batch, randomize
from tests.test_shared_mix import record_timestep_shapes
from tests.tiny_run import TINY_TRAIN, records
from tests.tolerances import fp32_gradient_ok

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
# D = 40 and L = 9 tokens: not multiples of any tile; N = 8 experts over T = 50 (50 mod 8 = 2).
TINY = dict(
    input_size=6,
    in_channels=3,
    num_classes=5,
    hidden_size=40,
    depth=2,
    num_heads=2,
    num_timesteps=50,
    num_basis=4,
    num_experts=8,
)


def tiny(mixing="batch", backend="reference", seed=7, **kw):
    torch.manual_seed(seed)
    return randomize(create("Remix-DiT-S/2", mixing=mixing, backend=backend, **{**TINY, **kw}), seed=seed, std=0.15)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------
# A float64 re-statement of the published forward (remix_dit.py of VainF/Remix-DiT),
# written from its code over a plain state dict: broadcast-sum mixing, explicit softmax
# attention, t // (T // N) experts and the batch mean of the softmaxes.
# --------------------------------------------------------------------------------------


def _pub_linear(x, sd, key, coeffs):
    w = (coeffs[:, None, None] * sd[key + ".weight"]).sum(0)
    b = (coeffs[:, None] * sd[key + ".bias"]).sum(0)
    return x @ w.T + b


def _pub_timestep(t, dim=256):
    # float32, as published (then cast to the model's dtype)
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()


def _ln(x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6)


def published_forward(sd, x, t, y, *, patch, heads, num_experts, T):
    sd = {k: v.double() for k, v in sd.items()}
    model_id = t // (T // num_experts)
    coeffs = torch.softmax(sd["coefficients.weight"][model_id], -1).mean(0)
    B = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    te = _pub_timestep(t) @ sd["t_embedder.mlp.0.weight"].T + sd["t_embedder.mlp.0.bias"]
    te = F.silu(te) @ sd["t_embedder.mlp.2.weight"].T + sd["t_embedder.mlp.2.bias"]
    c = te + sd["y_embedder.embedding_table.weight"][y]
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(n_blocks):
        p = f"blocks.{i}."
        ada = F.silu(c) @ sd[p + "adaLN_modulation.1.weight"].T + sd[p + "adaLN_modulation.1.bias"]
        sm, scm, gm, sf, scf, gf = ada.chunk(6, dim=1)
        a = _ln(h) * (1 + scm[:, None]) + sm[:, None]
        L, D = a.shape[1], a.shape[2]
        qkv = _pub_linear(a, sd, p + "attn.qkv", coeffs).reshape(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * (D // heads) ** -0.5, -1) @ qkv[2]
        h = h + gm[:, None] * _pub_linear(att.transpose(1, 2).reshape(B, L, D), sd, p + "attn.proj", coeffs)
        f = _ln(h) * (1 + scf[:, None]) + sf[:, None]
        f = F.gelu(_pub_linear(f, sd, p + "mlp.fc1", coeffs), approximate="tanh")
        h = h + gf[:, None] * _pub_linear(f, sd, p + "mlp.fc2", coeffs)
    ada = F.silu(c) @ sd["final_layer.adaLN_modulation.1.weight"].T + sd["final_layer.adaLN_modulation.1.bias"]
    shift, scale = ada.chunk(2, dim=1)
    out = (_ln(h) * (1 + scale[:, None]) + shift[:, None]) @ sd["final_layer.linear.weight"].T
    out = out + sd["final_layer.linear.bias"]
    g = int(round(out.shape[1] ** 0.5))
    C = out.shape[-1] // patch**2
    out = out.reshape(B, g, g, patch, patch, C)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, C, g * patch, g * patch)


def _pub(model, x, t, y):
    return published_forward(
        model.state_dict(),
        x,
        t,
        y,
        patch=model.patch_size,
        heads=model.num_heads,
        num_experts=model.num_experts,
        T=model.num_timesteps,
    )


def test_names_and_sizes():
    assert sum(n.startswith("Remix-DiT-") for n in MODEL_NAMES) == 12
    m = create("Remix-DiT-XL/2", input_size=8, depth=1)
    got = (m.hidden_size, m.num_heads, m.patch_size, m.num_basis, m.num_experts, m.mixing)
    assert got == (1152, 16, 2, 4, 20, "batch")
    assert tuple(m.blocks[0].attn.qkv.weight.shape) == (4, 3 * 1152, 1152)
    assert tuple(m.blocks[0].mlp.fc1.bias.shape) == (4, 4 * 1152)
    assert tuple(m.coefficients.weight.shape) == (20, 4)
    assert isinstance(m.final_layer.linear, torch.nn.Linear)  # the plain final layer, as published


def test_parameter_counts():
    from switch_dit.models import count_params

    with torch.device("meta"):
        remix, dit = create("Remix-DiT-XL/2"), create("DiT-XL/2")
    counts, dense = count_params(remix), count_params(dit)["total"]
    assert counts["activated"] == dense + 4  # one mixed model: a DiT and one coefficient row
    mixed = sum(
        p.numel() for n, p in remix.named_parameters() if n.startswith("blocks.") and (".attn." in n or ".mlp." in n)
    )
    assert counts["total"] == dense + 3 * mixed // 4 + 20 * 4


def test_reference_batch_mixing_matches_published_forward():
    model = tiny("batch").double().eval()
    x, t, y = batch(model, B=4, seed=3, dtype=torch.float64)
    t = torch.tensor([0, 13, 30, 49])  # several experts, and the T mod N remainder
    t[-1] = 47  # the published code cannot index past N - 1: stay inside its range here
    want = _pub(model, x, t, y)
    got = model(x, t, y)
    assert rel(got, want) < 1e-12


def test_reference_sample_mixing_is_the_published_forward_per_sample():
    """mixing="sample" = the published forward run on each sample alone (the batch mean of one)."""
    model = tiny("sample").double().eval()
    x, t, y = batch(model, B=3, seed=5, dtype=torch.float64)
    t = torch.tensor([2, 25, 44])
    got = model(x, t, y)
    for b in range(3):
        want = _pub(model, x[b : b + 1], t[b : b + 1], y[b : b + 1])
        assert rel(got[b : b + 1], want) < 1e-12
    # and not the batch-mixed model
    assert rel(got, _pub(model, x, t, y)) > 1e-3


def test_scalar_timestep_equals_a_batch_of_equal_timesteps():
    for mixing in remix_dit.MIXING:
        model = tiny(mixing).double().eval()
        x, _, y = batch(model, B=3, seed=6, dtype=torch.float64)
        t = torch.tensor(17)
        assert rel(model(x, t, y), model(x, t.expand(3).clone(), y)) < 1e-13
        assert torch.equal(model(x, 17, y), model(x, t, y))


@pytest.mark.parametrize("mixing", remix_dit.MIXING)
def test_sampling_passes_one_timestep_and_equals_per_sample(mixing, monkeypatch):
    from switch_dit import diffusion as diffusion_lib

    model = tiny(mixing).double().eval()
    diff = diffusion_lib.create_diffusion("5", diffusion_steps=50)
    y = torch.tensor([0, 4])
    noise = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    shapes = record_timestep_shapes(monkeypatch, remix_dit.RemixDiT)
    shared = diffusion_lib.sample(
        model, diff, y, cfg_scale=3.0, method="ddim", noise=noise, generator=torch.Generator().manual_seed(7)
    )
    assert shapes == [()] * 5
    monkeypatch.setattr(model, "accepts_shared_timestep", False, raising=False)
    per_sample = diffusion_lib.sample(
        model, diff, y, cfg_scale=3.0, method="ddim", noise=noise, generator=torch.Generator().manual_seed(7)
    )
    assert shapes[5:] == [(4,)] * 5
    assert rel(shared, per_sample) < 1e-10


def test_expert_ids_and_remainder_rule():
    model = tiny()  # T = 50, N = 8: 6 timesteps each, 48 and 49 join expert 7
    t = torch.arange(50)
    ids = model.expert_ids(t)
    assert torch.equal(ids[:48], t[:48] // 6)
    assert torch.equal(ids[48:], torch.tensor([7, 7]))
    big = create("Remix-DiT-S/2", depth=1, input_size=8)
    assert torch.equal(big.expert_ids(torch.arange(1000)), torch.arange(1000) // 50)  # published: 1000 // 20


def test_interval_sampling_stays_in_one_interval_and_covers_the_remainder():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        t = remix_dit.sample_interval_timesteps(16, 50, 8, generator=g)
        ids = torch.clamp(t // 6, max=7)
        assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 50
        assert (ids == ids[0]).all()
        seen.update(t.tolist())
    assert seen == set(range(50))


def test_published_training_recipe_helpers():
    # train_fast.py: gamma = 1e-4 * (1 - (epoch / epochs - 1)) with Python's precedence
    for epoch, epochs in ((0, 100), (37, 100), (99, 100)):
        assert remix_dit.published_prior_weight(epoch / epochs) == pytest.approx(1e-4 * (1 - (epoch / epochs - 1)))
    assert remix_dit.published_prior_weight(0.0) == pytest.approx(2e-4)
    model = tiny()
    groups = remix_dit.coefficient_param_groups(model, 3e-4)
    assert [g["lr"] for g in groups] == [3e-4, 1e-2]
    assert groups[1]["params"] == [model.coefficients.weight]
    assert len(groups[0]["params"]) == len(list(model.parameters())) - 1
    with pytest.raises(ValueError, match="coefficients"):
        remix_dit.coefficient_param_groups(create("DiT-S/2", input_size=8, depth=1), 1e-4)


def test_prior_and_prior_loss():
    model = tiny()
    prior = model.prior
    assert torch.equal(prior, torch.eye(4).repeat_interleave(2, 0))
    logits = model.coefficients.weight
    want = -torch.log_softmax(logits, -1)[torch.arange(8), torch.arange(8) // 2]
    torch.testing.assert_close(model.prior_loss_per_expert(), want)
    torch.testing.assert_close(model.prior_loss(), want.mean())
    model.prior_loss().backward()
    assert model.coefficients.weight.grad.abs().min() > 0
    assert "prior" not in model.state_dict()  # as published: a plain attribute, not saved


def test_initialisation_as_published():
    torch.manual_seed(0)
    m = create("Remix-DiT-S/2", input_size=8, depth=1, num_experts=400)
    # coefficient logits: randn + 3 std * prior, so the prior's basis leads by ~3 std
    logits = m.coefficients.weight.detach()
    on = logits[m.prior.bool()]
    off = logits[~m.prior.bool()]
    assert abs(off.std().item() - 1.0) < 0.1
    assert abs((on.mean() - off.mean()).item() / off.std().item() - 3.0) < 0.3
    assert abs(on.std().item() - off.std().item()) < 0.15  # a shift, not a scale
    # mixed weights: xavier_uniform_ on the (K, out, in) tensor, fans of a 3-D tensor
    w = m.blocks[0].mlp.fc1.weight.detach()
    K, out, inp = w.shape
    bound = math.sqrt(6.0 / (out * inp + K * inp))
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert m.blocks[0].mlp.fc1.bias.abs().sum() == 0
    for z in (m.final_layer.linear.weight, m.blocks[0].adaLN_modulation[-1].weight):
        assert z.abs().sum() == 0


def test_init_from_dit_repeats_the_mixed_layers_and_matches_the_dit():
    dit = (
        randomize(
            create(
                "DiT-S/2",
                **{k: v for k, v in TINY.items() if k not in ("num_basis", "num_experts")},
                backend="reference",
            ),
            seed=3,
            std=0.15,
        )
        .double()
        .eval()
    )
    for mixing in remix_dit.MIXING:
        model = create("Remix-DiT-S/2", mixing=mixing, backend="reference", **TINY).double().eval()
        coef_before = model.coefficients.weight.detach().clone()
        # a reference-code training checkpoint: the EMA is taken when present, prefixes stripped
        ckpt = {
            "model": {"module." + k: torch.zeros_like(v) for k, v in dit.state_dict().items()},
            "ema": dit.state_dict(),
        }
        interop.init_remix_from_dit(model, ckpt)
        sd = model.state_dict()
        for k, v in dit.state_dict().items():
            if any(s in k for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")):
                assert sd[k].shape == (4, *v.shape) and all(torch.equal(sd[k][i], v) for i in range(4)), k
            else:
                assert torch.equal(sd[k], v), k
        assert torch.equal(model.coefficients.weight, coef_before)
        x, t, y = batch(model, B=3, seed=9, dtype=torch.float64)
        assert rel(model(x, t, y), dit(x, t, y)) < 1e-12  # every expert starts as the DiT


def test_init_from_dit_rejects_what_does_not_fit():
    model = create("Remix-DiT-S/2", **TINY)
    sw = create("Switch-DiT-S/2", **{k: v for k, v in TINY.items() if k not in ("num_basis", "num_experts")})
    with pytest.raises(ValueError, match="plain DiT"):
        interop.init_remix_from_dit(model, interop.official_state_dict(sw))
    wide = create(
        "DiT-S/2", **{**{k: v for k, v in TINY.items() if k not in ("num_basis", "num_experts")}, "hidden_size": 48}
    )
    with pytest.raises(ValueError, match="shape mismatch"):
        interop.init_remix_from_dit(model, wide.state_dict())
    with pytest.raises(ValueError, match="load_official"):
        interop.init_remix_from_dit(model, model.state_dict())


def test_official_state_dict_round_trip_and_checks():
    model = tiny("sample")
    sd = interop.official_state_dict(model)
    assert set(sd) == set(model.state_dict())
    other = create("Remix-DiT-S/2", mixing="sample", **TINY)
    interop.load_official(other, {"model": {"module." + k: v for k, v in sd.items()}})
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    fewer = create("Remix-DiT-S/2", **{**TINY, "num_basis": 2})
    with pytest.raises(ValueError, match="K=2"):
        interop.load_official(fewer, sd)


def test_sampling_loads_a_published_checkpoint(tmp_path):
    from switch_dit import checkpoint

    plain = published_standin()
    sd = plain.state_dict()
    path = tmp_path / "0000100.pt"
    torch.save({"model": sd, "ema": {k: v + 1 for k, v in sd.items()}, "train_steps": 100}, path)
    model, info = checkpoint.load_model(path, num_heads=2, backend="reference")
    assert isinstance(model, remix_dit.RemixDiT) and info["layout"] == "reference" and info["step"] == 100
    assert (model.num_experts, model.num_basis, model.hidden_size, model.depth) == (8, 4, 40, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k] + 1), k  # the EMA weights


# --------------------------------------------------------------------------------------
# Fast paths
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixing", remix_dit.MIXING)
@pytest.mark.parametrize("scalar_t", [False, True])
def test_fast_path_matches_reference_forward_and_every_gradient(mixing, scalar_t):
    """As tests/test_fast_path.py: the fast path's float32 error against float64 is at most
    twice that of the float32 reference path (plus a small atol), and small in absolute terms."""
    ref = tiny(mixing).double().eval()
    ref32 = copy.deepcopy(ref).float()
    fast = copy.deepcopy(ref).float().to(DEV).set_backend("triton")
    x, t, y = batch(ref, B=3, seed=2, dtype=torch.float64)
    t = torch.tensor(21) if scalar_t else torch.tensor([3, 21, 49])
    g = torch.randn(3, 6, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    forward_backward_three_ways(ref, ref32, fast, x, t, y, g)
    params = zip(ref.named_parameters(), ref32.named_parameters(), fast.named_parameters())
    for (name, p64), (_, p32), (_, pf) in params:
        assert p64.grad is not None and pf.grad is not None, name
        if p64.grad.abs().sum() == 0:  # label rows this batch did not use
            assert pf.grad.abs().sum() == 0, name
            continue
        err, base = rel(pf.grad.cpu(), p64.grad), rel(p32.grad, p64.grad)
        assert fp32_gradient_ok(err, base), (name, err, base)
    # gradients reach all K bases of every mixed layer and the coefficient rows in use
    for name, p in fast.named_parameters():
        if name.endswith(("qkv.weight", "fc2.weight")):
            assert all(p.grad[k].abs().sum() > 0 for k in range(p.shape[0])), name
    used = fast.expert_ids(t.to(DEV)).reshape(-1).unique()
    assert (fast.coefficients.weight.grad[used].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("mixing", remix_dit.MIXING)
def test_fast_path_traces_as_one_graph(mixing):
    """What `switch-dit train --compile` needs: after one eager call (kernel imports, as
    train.warm_up does) the forward is one graph, per-sample custom op and shared mix included."""
    import torch._dynamo as dynamo

    model = tiny(mixing, backend="triton").eval()
    x, t, y = batch(model, B=3, seed=1)
    model(x, t, y)
    for tt in (t, torch.tensor(7)):
        explained = dynamo.explain(model)(x, tt, y)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("fast", [False, True])
def test_gradcheck_shared_mixing(fast):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(3, dtype=torch.float64, generator=g).softmax(-1).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: remix_dit.mixed_linear_shared(*a, fast), (x, w, b, c))


@pytest.mark.parametrize("backend", ["reference", "bmm", "grouped"])
def test_gradcheck_per_sample_mixing(backend):
    """The plain formula, and ops.mixed_linear's cuBLAS compositions on the transposed weight
    view (float64 runs there; the Triton kernels are checked against float64 below)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(2, 3, dtype=torch.float64, generator=g).softmax(-1).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: remix_dit.mixed_linear_per_sample(*a, backend), (x, w, b, c))


def test_per_sample_fast_equals_formula_with_strided_gradient():
    """The fast per-sample op on the transposed weight view, against the float64 formula,
    with an expanded (stride 0) output gradient."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 7, 10, generator=g)
    w = torch.randn(4, 6, 10, generator=g)
    b = torch.randn(4, 6, generator=g)
    c = torch.randn(3, 4, generator=g).softmax(-1)
    args32 = [a.clone().to(DEV).requires_grad_() for a in (x, w, b, c)]
    args64 = [a.double().requires_grad_() for a in (x, w, b, c)]
    out = remix_dit.mixed_linear_per_sample(*args32, "triton")
    want = remix_dit.mixed_linear_per_sample(*args64, "reference")
    assert rel(out.cpu(), want) < 1e-6
    out.sum().backward()
    want.sum().backward()
    for a32, a64 in zip(args32, args64):
        assert rel(a32.grad.cpu(), a64.grad) < 1e-5


def test_fast_shared_mixing_under_autocast_keeps_the_mix_in_float32():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 5, 8, generator=g)
    w = torch.randn(4, 6, 8, generator=g)
    b = torch.randn(4, 6, generator=g)
    c = torch.randn(4, generator=g).softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = remix_dit.mixed_linear_shared(x, w, b, c, True)
        assert remix_dit.mix_bases(c, w).dtype == torch.float32
    assert out.dtype == torch.bfloat16
    want = remix_dit.mixed_linear_shared(x.double(), w.double(), b.double(), c.double(), False)
    assert 1e-4 < rel(out, want) < 1e-2  # bf16 GEMM


# --------------------------------------------------------------------------------------
# Guidance and bad input
# --------------------------------------------------------------------------------------


def test_forward_with_cfg_published_three_channels_and_all_eps_channels():
    model = tiny("batch", in_channels=4).double().eval()
    x, t, y = batch(model, B=4, seed=8, dtype=torch.float64)
    y = torch.tensor([1, 2, 5, 5])  # second half null
    out = model(torch.cat([x[:2], x[:2]]), t, y)
    for channels, n in ((None, 3), (4, 4)):
        got = model.forward_with_cfg(x, t, y, 2.5, channels=channels)
        guided = out[2:, :n] + 2.5 * (out[:2, :n] - out[2:, :n])
        assert torch.allclose(got[:2, :n], guided) and torch.allclose(got[2:, :n], guided)
        assert torch.equal(got[:, n:], out[:, n:])


def test_forward_with_cfg_default_on_a_one_channel_model_guides_every_channel():
    """As the published slicing out[:, :3] does when C_out = 2 (the digits)."""
    model = tiny("batch", in_channels=1).double().eval()
    x, t, y = batch(model, B=2, seed=8, dtype=torch.float64)
    y = torch.tensor([3, 5])
    out = model(torch.cat([x[:1], x[:1]]), t, y)
    got = model.forward_with_cfg(x, t, y, 2.0)
    assert torch.allclose(got[0], out[1] + 2.0 * (out[0] - out[1]))


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of num_basis"):
        create("Remix-DiT-S/2", **{**TINY, "num_experts": 6})
    with pytest.raises(ValueError, match="mixing"):
        create("Remix-DiT-S/2", mixing="token", **TINY)
    with pytest.raises(ValueError, match="num_timesteps"):
        create("Remix-DiT-S/2", **{**TINY, "num_timesteps": 4})
    model = tiny()
    x, t, y = batch(model, B=2)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([0, 50]), y)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor(50), y)
    for bad in (50, -1, True):
        with pytest.raises(ValueError, match="timesteps"):
            model(x, bad, y)
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.tensor([1, 2, 3]), y)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :2], t, y)
    with pytest.raises(ValueError, match="channels"):
        model.forward_with_cfg(x, t, y, 1.5, channels=7)
    with pytest.raises(ValueError, match="cfg_channels"):
        create("Remix-DiT-S/2", cfg_channels=0, **TINY)
    with pytest.raises(ValueError, match="timestep sampling"):
        remix_dit.check_timestep_sampling("log-normal", "sample")


def test_uniform_sampling_with_batch_mixing_warns_once():
    remix_dit._warned_uniform_batch = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remix_dit.check_timestep_sampling("uniform", "sample")
        remix_dit.check_timestep_sampling("interval", "batch")
        assert not caught
        remix_dit.check_timestep_sampling("uniform", "batch")
        remix_dit.check_timestep_sampling("uniform", "batch")
    assert len(caught) == 1 and "blurs the experts" in str(caught[0].message)


# --------------------------------------------------------------------------------------
# Drop-in: switch_dit.accelerate on a stand-in of the published classes
# --------------------------------------------------------------------------------------


def published_standin(seed=0, **kw):
    from benchmarks.remix_reference_code import PublishedRemixDiT

    torch.manual_seed(seed)
    model = PublishedRemixDiT(
        input_size=6, in_channels=3, hidden_size=40, depth=2, num_heads=2, num_classes=5, n_basis=4, n_experts=8, **kw
    )
    return randomize(model, seed=seed, std=0.15)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_accelerate_published_model_in_place_same_keys_and_outputs(backend):
    import switch_dit

    plain = published_standin().double().eval()
    model = copy.deepcopy(plain).float().to(DEV)
    params = {k: id(v) for k, v in model.named_parameters()}
    keys = list(model.state_dict())
    assert switch_dit.accelerate(model, backend=backend) is model
    assert {k: id(v) for k, v in model.named_parameters()} == params and list(model.state_dict()) == keys
    assert type(model).__name__ == "AcceleratedPublishedRemixDiT" and isinstance(model, type(plain))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=g)
    t = torch.tensor([5, 130, 620, 999])
    y = torch.tensor([0, 4, 2, 5])
    want = plain(x, t, y)
    got = model(x.float().to(DEV), t.to(DEV), y.to(DEV))
    assert rel(got.cpu(), want) < 1e-5
    # gradients of every parameter, the coefficient table included
    dy = torch.randn(want.shape, dtype=torch.float64, generator=g)
    (want * dy).sum().backward()
    (got * dy.float().to(DEV)).sum().backward()
    for (name, p64), (_, pf) in zip(plain.named_parameters(), model.named_parameters()):
        if p64.grad is None:
            assert pf.grad is None, name
            continue
        if p64.grad.abs().sum() == 0:
            assert pf.grad.abs().sum() == 0, name
            continue
        assert rel(pf.grad.cpu(), p64.grad) < 1e-4, name
    # one timestep for the batch = a batch of equal timesteps, as published
    t0 = torch.tensor(404)
    assert rel(model(x.float().to(DEV), t0.to(DEV), y.to(DEV)).cpu(), plain(x, t0.expand(4).clone(), y)) < 1e-5
    # copies stay accelerated
    twin = copy.deepcopy(model)
    assert type(twin) is type(model) and type(twin.blocks[0]) is type(model.blocks[0])


def test_accelerate_matches_our_remix_dit_after_load_official():
    """The published model and ours load the same state dict and agree (batch mixing)."""
    import switch_dit

    plain = published_standin().double().eval()
    ours = (
        create(
            "Remix-DiT-S/2",
            input_size=6,
            in_channels=3,
            num_classes=5,
            hidden_size=40,
            depth=2,
            num_heads=2,
            num_basis=4,
            num_experts=8,
            backend="reference",
        )
        .double()
        .eval()
    )
    interop.load_official(ours, plain.state_dict())
    switch_dit.accelerate(plain, backend="reference")
    x, t, y = batch(ours, B=3, seed=4, dtype=torch.float64)
    t = torch.tensor([10, 500, 980])  # T = 1000 as published
    assert rel(ours(x, t, y), plain(x, t, y)) < 1e-12
    ours_sd = interop.official_state_dict(ours)
    assert set(ours_sd) == set(plain.state_dict())


def test_accelerate_rejects_what_it_cannot_patch():
    import switch_dit

    with pytest.raises(TypeError, match="built in"):
        switch_dit.accelerate(tiny())
    bad = published_standin()
    bad.blocks[1].mlp.fc1.weight = torch.nn.Parameter(torch.zeros(3, 160, 40))
    with pytest.raises(ValueError, match=r"blocks\[1\].mlp.fc1.weight must be \(K=4"):
        switch_dit.accelerate(bad)


# --------------------------------------------------------------------------------------
# Training: config, init from a DiT run, the published recipe, exact resume
# --------------------------------------------------------------------------------------


def test_train_config_family_defaults_and_checks():
    from switch_dit.config import TrainConfig

    c = TrainConfig(model="Remix-DiT-S/4")
    assert (c.num_experts, c.num_basis, c.mixing, c.lambda_dp, c.prior_schedule, c.timestep_sampling, c.coef_lr) == (
        20,
        4,
        "batch",
        1e-4,
        "published",
        "interval",
        1e-2,
    )
    d = TrainConfig(model="DiT-S/4")
    assert (d.num_experts, d.lambda_dp, d.prior_schedule, d.timestep_sampling) == (3, 1.0, "constant", "uniform")
    assert TrainConfig(model="Remix-DiT-S/4", mixing="sample", timestep_sampling="uniform").mixing == "sample"
    for bad, match in (
        (dict(model="Remix-DiT-S/4", num_experts=6), "multiple of num_basis"),
        (dict(model="DiT-S/4", timestep_sampling="interval"), "Remix-DiT models only"),
        (dict(model="Switch-DiT-S/4", prior_schedule="published"), "Remix-DiT models only"),
        (dict(model="DiT-S/4", init_from="runs/x"), "init_from"),
        (dict(model="Remix-DiT-S/4", mixing="token"), "mixing"),
        (dict(model="Remix-DiT-S/4", coef_lr=0.0), "coef_lr"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)


def test_prior_weight_schedule():
    from switch_dit.config import TrainConfig
    from switch_dit.train import prior_weight_at

    c = TrainConfig(model="Remix-DiT-S/4", steps=100)
    assert [prior_weight_at(s, c) for s in (0, 50, 100)] == pytest.approx([2e-4, 1.5e-4, 1e-4])
    assert prior_weight_at(50, TrainConfig(model="DiT-S/4", lambda_dp=0.5)) == 0.5


def test_train_from_a_dit_run_with_the_published_recipe_and_resume_exactly(tmp_path):
    from switch_dit import checkpoint as ck
    from switch_dit.config import TrainConfig
    from switch_dit.train import train

    train(TrainConfig(model="DiT-S/4", steps=2, out=str(tmp_path / "dit"), **TINY_TRAIN), log=lambda *a, **k: None)
    dit_ema = ck.load_checkpoint(tmp_path / "dit" / "checkpoint.pt")["ema"]

    # the file loader: the run's EMA weights, each mixed layer repeated K times
    model = create(
        "Remix-DiT-S/4",
        input_size=8,
        in_channels=1,
        num_classes=10,
        hidden_size=16,
        depth=2,
        num_heads=2,
        num_experts=8,
    )
    interop.init_remix_from_dit_file(model, tmp_path / "dit")
    assert torch.equal(model.blocks[1].mlp.fc2.weight[3], dit_ema["blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.x_embedder.proj.weight, dit_ema["x_embedder.proj.weight"])

    lines = []
    cfg = dict(
        model="Remix-DiT-S/4", num_experts=8, init_from=str(tmp_path / "dit"), steps=4, ckpt_every=2, **TINY_TRAIN
    )
    train(TrainConfig(**cfg, out=str(tmp_path / "a")), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("initialised Remix-DiT-S/4 from the DiT" in line for line in lines)
    step2 = tmp_path / "a" / "checkpoints" / "ckpt-00000002.pt"
    state = ck.load_checkpoint(step2)
    assert state["model_kwargs"]["num_basis"] == 4 and state["model_kwargs"]["mixing"] == "batch"
    groups = state["opt"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr_scale"] == pytest.approx(1e-2 / TrainConfig(**cfg).lr)
    # the K bases, equal at the start, have moved apart (each gets its coefficient's share of the gradient)
    qkv = ck.load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]["blocks.0.attn.qkv.weight"]
    assert not torch.equal(qkv[0], qkv[1])

    # the run's checkpoint samples (what `switch-dit sample --ckpt` does): one 0-d t per step
    from switch_dit.sampling import generate

    trained, info = ck.load_model(tmp_path / "a")
    assert isinstance(trained, remix_dit.RemixDiT) and info["layout"] == "switch-dit" and not trained.training
    images = generate(trained, torch.tensor([1, 7]), method="ddim", steps=3, cfg_scale=2.0, seed=0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()

    # resume from step 2: steps 3-4 repeat exactly (interval draws, prior weight schedule, both lr groups)
    train(TrainConfig(**cfg, out=str(tmp_path / "b")), log=lambda *a, **k: None, resume=str(step2))
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert len(a) == 4 and b == a[2:] and all(r["prior"] > 0 for r in a)


def test_train_per_sample_mixing_uniform_timesteps(tmp_path):
    from switch_dit.config import TrainConfig
    from switch_dit.train import train

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sample mixing with uniform timesteps: no warning
        summary = train(
            TrainConfig(
                model="Remix-DiT-S/4",
                num_experts=4,
                mixing="sample",
                timestep_sampling="uniform",
                steps=2,
                out=str(tmp_path / "s"),
                **TINY_TRAIN,
            ),
            log=lambda *a, **k: None,
        )
    assert summary is not None and len(records(tmp_path / "s")) == 2


def test_init_from_rejects_a_routed_run(tmp_path):
    from switch_dit.config import TrainConfig
    from switch_dit.train import train

    train(TrainConfig(model="DTR-S/4", steps=1, out=str(tmp_path / "dtr"), **TINY_TRAIN), log=lambda *a, **k: None)
    model = create(
        "Remix-DiT-S/4",
        input_size=8,
        in_channels=1,
        num_classes=10,
        hidden_size=16,
        depth=2,
        num_heads=2,
        num_experts=8,
    )
    with pytest.raises(ValueError, match="holds a DTR model"):
        interop.init_remix_from_dit_file(model, tmp_path / "dtr")


def test_compare_has_a_remix_row_started_from_the_dit_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from switch_dit import checkpoint as ck
    from switch_dit.cli import main
    from switch_dit.compare import CompareConfig

    with pytest.raises(ValueError, match="DiT must come before it"):
        CompareConfig(families=("Remix-DiT", "DiT"))
    argv = [
        "compare",
        "--hidden-size",
        "16",
        "--depth",
        "2",
        "--num-heads",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--seeds",
        "0",
        "--samples-per-class",
        "1",
        "--sample-steps",
        "2",
        "--eval-every",
        "2",
        "--families",
        "DiT,Remix-DiT",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("Model") :].splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["DiT", "Remix-DiT"]
    assert "Remix-DiT starts from the final EMA weights of the DiT run of the same seed" in printed
    run = ck.load_checkpoint(tmp_path / "Remix-DiT-seed0" / "checkpoint.pt")
    assert run["config"]["init_from"] == str(tmp_path / "DiT-seed0")
    assert run["model_kwargs"]["num_experts"] == 20 and run["config"]["timestep_sampling"] == "interval"


# --------------------------------------------------------------------------------------
# DDP: two CPU ranks (gloo) match one process over the same global batch
# --------------------------------------------------------------------------------------

DDP_BATCH = 6


def _ddp_model(mixing):
    torch.manual_seed(0)
    model = create(
        "Remix-DiT-S/4",
        input_size=8,
        in_channels=2,
        num_classes=5,
        hidden_size=16,
        depth=2,
        num_heads=2,
        num_experts=8,
        mixing=mixing,
        backend="reference",
    ).double()
    model.y_embedder.dropout_prob = 0.0  # label dropout would draw different masks on each rank
    return randomize(model, seed=1, std=0.1)


def _ddp_batch(mixing):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(DDP_BATCH, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (DDP_BATCH,), generator=g)
    # batch mixing: one interval for the global batch (as published), so every rank's batch
    # mean of the coefficients is the global one; sample mixing: any timesteps
    lo, hi = (250, 375) if mixing == "batch" else (0, 1000)
    t = torch.randint(lo, hi, (DDP_BATCH,), generator=g)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, y, t, noise


def _ddp_grads(net, x, y, t, noise):
    from switch_dit import distributed
    from switch_dit.diffusion import create_diffusion
    from switch_dit.train import forward_backward

    forward_backward(net, create_diffusion(learn_sigma=True, lambda_dp=0.5), x, y, None, None, t=t, noise=noise)
    return {n: p.grad.detach().clone() for n, p in distributed.unwrap(net).named_parameters()}


def _ddp_worker(rank, world, port, tmp):
    from switch_dit import distributed

    with cpu_rank(rank, world, port) as ctx:
        for mixing in remix_dit.MIXING:
            x, y, t, noise = _ddp_batch(mixing)
            sl = slice(rank * DDP_BATCH // world, (rank + 1) * DDP_BATCH // world)
            grads = _ddp_grads(distributed.wrap(_ddp_model(mixing), ctx, "ddp"), x[sl], y[sl], t[sl], noise[sl])
            if rank == 0:
                torch.save(grads, f"{tmp}/grads-{mixing}.pt")


def test_two_ddp_ranks_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    from switch_dit import distributed

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for mixing in remix_dit.MIXING:
        got = torch.load(tmp_path / f"grads-{mixing}.pt", weights_only=True)
        want = _ddp_grads(distributed.TrainingModule(_ddp_model(mixing)), *_ddp_batch(mixing))
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-13, msg=f"{mixing}: {name}")
        assert want["coefficients.weight"].abs().sum() > 0  # the prior and the mixing reach the table


# --------------------------------------------------------------------------------------
# GPU checks (marker gpu: skipped without CUDA, run by `make gpu`)
# --------------------------------------------------------------------------------------


def _cuda_model(mixing):
    torch.manual_seed(0)
    model = create(
        "Remix-DiT-S/2",
        input_size=8,
        in_channels=4,
        num_classes=10,
        hidden_size=128,
        depth=2,
        num_heads=2,
        num_experts=8,
        mixing=mixing,
    )
    return randomize(model, seed=2, std=0.05).cuda()


def _cuda_batch(B=8):
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(B, 4, 8, 8, device="cuda", generator=g)
    t = torch.randint(0, 1000, (B,), device="cuda", generator=g)
    y = torch.randint(0, 10, (B,), device="cuda", generator=g)
    return x, t, y


@pytest.mark.gpu
@pytest.mark.parametrize("mixing", remix_dit.MIXING)
def test_cuda_training_step_has_no_host_sync_and_bf16_matches_float64(mixing):
    model = _cuda_model(mixing).train()
    model.y_embedder.dropout_prob = 0.0
    x, t, y = _cuda_batch()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, y)
        loss = out.float().square().mean() + 1e-4 * model.prior_loss(t)
        loss.backward()
        return out

    step()  # warm-up: kernel imports, auto's strategy timing
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = copy.deepcopy(model).cpu().double().set_backend("reference").eval()
    want = ref(x.cpu().double(), t.cpu(), y.cpu())
    err = rel(out.detach().cpu(), want)
    assert 0 < err < 1e-2, err
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("mixing", remix_dit.MIXING)
def test_cuda_sampling_step_replays_from_a_cuda_graph(mixing):
    """One timestep for the batch (0-d t): the mix and the step are capturable, and a replay
    with new data and a new timestep (another expert) equals the eager step."""
    model = _cuda_model(mixing).eval()
    x, _, y = _cuda_batch()
    t = torch.full((), 100, device="cuda", dtype=torch.int64)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(x, t, y)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x, t, y)
        for step, seed in ((900, 1), (450, 2)):
            g = torch.Generator(device="cuda").manual_seed(seed)
            x.copy_(torch.randn(x.shape, device="cuda", generator=g))
            t.fill_(step)
            graph.replay()
            torch.testing.assert_close(out, model(x, t, y), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_accelerated_published_model_has_no_host_sync():
    import switch_dit

    plain = published_standin().cuda().train()
    plain.y_embedder.dropout_prob = 0.0
    model = switch_dit.accelerate(copy.deepcopy(plain))
    x = torch.randn(4, 3, 6, 6, device="cuda")
    t = torch.full((4,), 420, device="cuda")
    y = torch.tensor([0, 1, 2, 3], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, t, y).float().mean().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, y)
        out.float().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = plain(x, t, y)
    assert rel(out.detach().float().cpu(), want.detach().float().cpu()) < 1e-2
