"""Reference models: names, shapes, initialisation, paper parameter counts, bad input."""

import pytest
import torch

from switch_dit import models
from switch_dit.models import MODEL_NAMES, count_params, create

TINY = dict(input_size=8, in_channels=3, num_classes=5, hidden_size=24, depth=2, num_heads=2, num_timesteps=50)


def tiny(name, **kw):
    return create(name, **{**TINY, **kw})


def randomize(model, seed=0, std=0.3):
    """Give every zero-initialised layer random values, so outputs depend on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def batch(model, B=3, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=g, dtype=dtype)
    t = torch.randint(0, model.num_timesteps, (B,), generator=g)
    y = torch.randint(0, model.num_classes, (B,), generator=g)
    return x, t, y


def test_every_name_builds_with_the_paper_sizes():
    assert len(MODEL_NAMES) == 60  # DiT, DTR, Switch-DiT, Remix-DiT (tests/test_remix_dit.py), DiffMoE
    with torch.device("meta"):
        for name in [n for n in MODEL_NAMES if not n.startswith("DiffMoE")]:  # DiffMoE: tests/test_diffmoe.py
            m = create(name)
            size = name.split("-")[-1].split("/")[0]
            D, depth, heads = models.SIZES[size]
            assert (m.hidden_size, m.depth, m.num_heads, m.patch_size) == (D, depth, heads, int(name[-1]))
            assert len(m.blocks) == depth
            family = name.rsplit("-", 1)[0]
            assert m.routing == ("remix" if family == "Remix-DiT" else models.FAMILIES[family])
            if m.routing == "switch":
                assert len(m.routers) == depth and m.routers[0].experts.w.shape == (3, D, D)


# Table 2 (ImageNet 256, latent 32x32x4, patch 2) counts activated parameters, in millions.
@pytest.mark.parametrize(
    "name,paper_m",
    [
        ("DiT-S/2", 33),
        ("Switch-DiT-S/2", 36),
        ("DiT-B/2", 131),
        ("Switch-DiT-B/2", 144),
        ("DiT-XL/2", 675),
        ("Switch-DiT-XL/2", 749),
        ("DTR-XL/2", 675),
    ],
)
def test_parameter_counts_match_table_2(name, paper_m):
    with torch.device("meta"):
        n = count_params(create(name))["activated"]
    assert abs(n / 1e6 - paper_m) < 1.0, (name, n)


# Table 1 (FFHQ, Switch-DiT-B with M experts, top-k): activated parameters in millions.
@pytest.mark.parametrize("M,k,paper_m", [(3, 1, 137), (4, 2, 144), (2, 2, 144), (4, 3, 151), (3, 2, 144)])
def test_parameter_counts_match_table_1(M, k, paper_m):
    with torch.device("meta"):
        counts = count_params(create("Switch-DiT-B/2", num_experts=M, top_k=k))
    assert abs(counts["activated"] / 1e6 - paper_m) < 1.0
    D = 768
    assert counts["total"] - counts["activated"] == 12 * (M - k) * (D * D + D)


@pytest.mark.parametrize("family", ["DiT", "DTR", "Switch-DiT"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_shapes_train_and_eval(family, learn_sigma):
    m = randomize(tiny(f"{family}-S/4", learn_sigma=learn_sigma))
    x, t, y = batch(m)
    for train in (True, False):
        m.train(train)
        out = m(x, t, y)
        assert out.shape == (3, 6 if learn_sigma else 3, 8, 8)
        assert torch.isfinite(out).all()
    p = m.prior_loss(t)
    assert p.dim() == 0
    if family != "Switch-DiT":
        assert p.item() == 0.0


def test_initialisation():
    m = tiny("Switch-DiT-S/2")
    for block in m.blocks:
        assert block.adaLN_modulation[-1].weight.abs().sum() == 0 and block.adaLN_modulation[-1].bias.abs().sum() == 0
        assert block.attn.qkv.bias.abs().sum() == 0 and block.attn.qkv.weight.abs().sum() > 0
    for router in m.routers:
        assert router.experts.w.abs().sum() == 0 and router.experts.b.abs().sum() == 0
        assert router.f_gate[1].weight.abs().sum() > 0
    assert m.final_layer.linear.weight.abs().sum() == 0
    assert abs(m.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.005
    # fixed 2-D sin-cos position embedding, not trained
    assert "pos_embed" in m.state_dict() and all(p is not m.pos_embed for p in m.parameters())
    assert m.pos_embed[0, 0, : TINY["hidden_size"] // 4].abs().sum() == 0  # sin(0) of the first grid axis


def test_switch_dit_equals_dit_while_experts_are_zero():
    """Experts start at zero, so m = 1 and the block is a plain DiT block."""
    torch.manual_seed(0)
    dit = randomize(tiny("DiT-S/2"), seed=3).eval()
    sw = tiny("Switch-DiT-S/2").eval()
    missing, unexpected = sw.load_state_dict(dit.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("routers.") for k in missing)
    with torch.no_grad():
        for r in sw.routers:
            r.f_gate[1].weight.normal_()  # any gate: zero experts make it irrelevant
    x, t, y = batch(dit)
    torch.testing.assert_close(sw(x, t, y), dit(x, t, y), rtol=0, atol=0)
    # and with non-zero experts they differ
    with torch.no_grad():
        sw.routers[0].experts.w.normal_()
    assert not torch.allclose(sw(x, t, y), dit(x, t, y))


def test_switch_block_semantics_by_hand():
    """m = 1 + sum_j g_j (z W_j + b_j) with the top-k softmax weights, not renormalised."""
    m = randomize(tiny("Switch-DiT-S/2", num_experts=4, top_k=3).double())
    x, t, y = batch(m, dtype=torch.float64)
    router = m.routers[0]
    e = m.t_embedder(t)
    probs = torch.softmax(router.f_gate(e), -1)
    z = torch.randn(3, 5, TINY["hidden_size"], dtype=torch.float64)
    idx, w = router.route(router.gate_probs(e))
    got = router(z, idx, w)
    for b in range(3):
        top = torch.argsort(probs[b], descending=True)[:3]
        want = 1 + sum(probs[b, j] * (z[b] @ router.experts.w[j] + router.experts.b[j]) for j in top)
        torch.testing.assert_close(got[b], want)


def test_dtr_mask_semantics():
    m = tiny("DTR-S/2", hidden_size=20, num_heads=2)
    table = m.dtr_mask
    T, D = table.shape
    assert (T, D) == (50, 20)
    width, last = int(20 * 0.8), 20 - int(20 * 0.8)
    for t in (0, 17, 49):
        start = round((t / (T - 1)) ** 4 * last)
        want = torch.zeros(D)
        want[start : start + width] = 1
        assert torch.equal(table[t], want)


def test_forward_with_cfg_scale_one_is_conditional():
    m = randomize(tiny("Switch-DiT-S/2")).double().eval()
    x, t, _ = batch(m, B=2, dtype=torch.float64)
    x = torch.cat([x[:1], x[:1]])
    t = torch.cat([t[:1], t[:1]])
    y = torch.tensor([2, m.num_classes])  # second half: the null class
    out = m.forward_with_cfg(x, t, y, 1.0)
    cond = m(x[:1], t[:1], y[:1])
    torch.testing.assert_close(out[:1, :3], cond[:, :3])
    torch.testing.assert_close(out[1:, :3], cond[:, :3])
    guided = m.forward_with_cfg(x, t, y, 4.0)
    assert not torch.allclose(guided[:1, :3], cond[:, :3])


def test_smoe_layer_gradcheck_float64():
    m = randomize(tiny("Switch-DiT-S/2", hidden_size=8, num_heads=2, num_experts=3, top_k=2).double())
    router = m.routers[0]
    z = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 8, dtype=torch.float64)

    def f(z, w, b, gate_w):
        with torch.no_grad():
            router.f_gate[1].weight.copy_(gate_w)
        probs = router.gate_probs(e)
        idx, _ = router.route(probs.detach())
        g = probs.gather(-1, idx)
        out = 1.0
        for j in range(2):
            out = out + g[:, j, None, None] * (torch.bmm(z, w[idx[:, j]]) + b[idx[:, j]][:, None])
        return out

    args = (
        z,
        router.experts.w.detach().clone().requires_grad_(),
        router.experts.b.detach().clone().requires_grad_(),
        router.f_gate[1].weight.detach().clone(),
    )
    assert torch.autograd.gradcheck(f, args)
    # the module itself, gradients wrt z and the experts
    idx, w = router.route(router.gate_probs(e))
    assert torch.autograd.gradcheck(lambda z, w_: router(z, idx, w_), (z, w.detach().clone().requires_grad_()))


def test_whole_model_backward_reaches_every_parameter():
    m = randomize(tiny("Switch-DiT-S/2"))
    x, t, y = batch(m)
    (m(x, t, y).square().mean() + m.prior_loss(t)).backward()
    for name, p in m.named_parameters():
        if name == "y_embedder.embedding_table.weight":
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("M,k", [(3, 1), (4, 2), (2, 2), (4, 3), (3, 2)])
def test_any_experts_topk(M, k):
    m = randomize(tiny("Switch-DiT-S/2", num_experts=M, top_k=k))
    x, t, y = batch(m)
    assert m(x, t, y).shape == (3, 6, 8, 8)
    assert m.w_prior.shape == (50, 2 * M) and torch.all(m.w_prior.sum(1) == 2 * k)


def test_bad_input_raises_clear_errors():
    m = tiny("Switch-DiT-S/2")
    x, t, y = batch(m)
    with pytest.raises(ValueError, match="unknown model"):
        create("Switch-DiT-M/2")
    with pytest.raises(ValueError, match="top_k"):
        tiny("Switch-DiT-S/2", num_experts=3, top_k=4)
    with pytest.raises(ValueError, match="num_experts"):
        tiny("Switch-DiT-S/2", num_experts=1, top_k=1)
    with pytest.raises(ValueError, match="hidden_size"):
        tiny("DiT-S/2", hidden_size=10)
    with pytest.raises(ValueError, match="backend"):
        tiny("DiT-S/2", backend="cuda")
    with pytest.raises(ValueError, match="x must be"):
        m(x[:, :2], t, y)
    with pytest.raises(ValueError, match=r"t \(timesteps\) values must be in \[0, 50\)"):
        m(x, torch.tensor([0, 1, 50]), y)
    with pytest.raises(ValueError, match="integer"):
        m(x, t.float(), y)
    with pytest.raises(ValueError, match="shape"):
        m(x, t[:2], y)
    with pytest.raises(ValueError, match=r"y \(class labels\)"):
        m(x, t, torch.tensor([0, 1, 6]))  # 5 classes + the null row
    with pytest.raises(ValueError, match="timesteps"):
        m.prior_loss(torch.tensor([-1]))


@pytest.mark.parametrize("backend", ["bmm", "grouped", "emulated"])
def test_a_strategy_one_op_family_lacks_applies_to_the_ops_that_have_it(backend):
    """A model-wide strategy name goes to the ops that have it ("bmm": the routed linear; "emulated":
    the norm ops); the others choose by "auto" (here, on the CPU, their reference). float64,
    forward and backward, against the model as written, by the relative error of docs/design.md §4:
    float64's unit roundoff is 1.1e-16, so sqrt(D)-sized dot products compounded over two blocks stay
    orders of magnitude under 1e-12 (single elements may cancel, so not elementwise)."""
    ref = randomize(tiny("Switch-DiT-S/2", backend="reference").double()).eval()  # eval: no label dropout
    other = randomize(tiny("Switch-DiT-S/2", backend=backend).double()).eval()
    x, t, y = batch(ref, dtype=torch.float64)
    outs = []
    for model in (ref, other):
        out = model(x, t, y)
        out.square().sum().backward()
        outs.append([out] + [p.grad for p in model.parameters()])
    for got, want in zip(outs[1], outs[0]):
        assert ((got - want).norm() / want.norm()).item() < 1e-12


@pytest.mark.parametrize("backend", ["reference", "bmm", "grouped"])
def test_the_fast_path_routes_through_one_routing_plan(backend, monkeypatch):
    """Off the reference path, Switch-DiT routes a batch with one call of the extension's routing
    plan (all blocks), and the "grouped" strategy takes each block's grouping from it: it never
    sorts the experts itself, forward or backward. The reference path computes no plan."""
    from switch_dit import routing
    from switch_dit.ops import expert_grouped

    calls = []
    real_plan = routing.plan
    monkeypatch.setattr(routing, "plan", lambda *a, **kw: calls.append(a[0].shape) or real_plan(*a, **kw))

    def no_sorting(*_):
        raise AssertionError("expert_groups ran although the model has a plan")

    monkeypatch.setattr(expert_grouped, "expert_groups", no_sorting)
    model = randomize(tiny("Switch-DiT-S/2", backend=backend)).eval()
    x, t, y = batch(model, B=4)
    model(x, t, y).square().sum().backward()
    N, M = model.depth, model.num_experts
    assert calls == ([] if backend == "reference" else [(N, 4, M)])
    assert all(p.grad is not None for p in model.routers.parameters())
