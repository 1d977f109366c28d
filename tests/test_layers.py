"""Public layers (switch_dit.layers) against plain PyTorch math, and backend "reference"
against "triton" (the interpreter on CPU, float32). Shapes break tiling on purpose
(D = 20, L = 5); GPU bf16 variants skip without a GPU."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from switch_dit import layers
from switch_dit.layers import (
    Attention,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    TimestepRouter,
    adaln_zero_block,
    gate_probs_of_blocks,
    is_silu_linear,
    route_top_k,
)
from tests.test_models import randomize

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
F64 = torch.float64


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def rand(*shape, seed=0, dtype=F64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


# ---------------------------------------------------------------------------- adaLN pieces


def test_final_layer_reference_is_the_formula():
    """LN without affine, adaLN modulate, then the linear; through ops' reference twin."""
    fl = randomize(FinalLayer(20, 2, 3, backend="reference").double(), seed=4)
    x, c = rand(2, 5, 20, seed=1), rand(2, 20, seed=2)
    shift, scale = fl.adaLN_modulation(c).chunk(2, dim=1)
    h = layer_norm(x) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(fl(x, c), fl.linear(h))


# ---------------------------------------------------------------------------- embedders


def test_patch_embed_is_a_linear_map_of_patches():
    pe = randomize(PatchEmbed(6, 2, 3, 8).double())
    x = rand(2, 3, 6, 6, seed=1)
    patches = x.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C, 3, 3, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 9, 3 * 4)  # row-major grid, (C, p, p) features
    want = patches @ pe.proj.weight.reshape(8, -1).t() + pe.proj.bias
    torch.testing.assert_close(pe(x), want)
    assert pe.num_patches == 9
    with pytest.raises(ValueError, match="multiple of patch_size"):
        PatchEmbed(7, 2, 3, 8)


def test_timestep_embedder_features_and_mlp():
    te = randomize(TimestepEmbedder(8, frequency_embedding_size=6).double())
    t = torch.tensor([0, 3, 999])
    freqs = torch.tensor([math.exp(-math.log(10000.0) * i / 3) for i in range(3)], dtype=F64)
    args = t[:, None].double() * freqs
    feats = torch.cat([torch.cos(args), torch.sin(args)], -1)  # cos half first
    torch.testing.assert_close(
        TimestepEmbedder.timestep_embedding(t, 6).double(), feats, rtol=0, atol=1e-5
    )  # float32 args
    h = TimestepEmbedder.timestep_embedding(t, 6).double() @ te.mlp[0].weight.t() + te.mlp[0].bias
    want = F.silu(h) @ te.mlp[2].weight.t() + te.mlp[2].bias
    torch.testing.assert_close(te(t), want)
    assert TimestepEmbedder.timestep_embedding(t, 7).shape == (3, 7)  # odd dim: zero-padded


def test_label_embedder_lookup_and_null_class():
    le = randomize(LabelEmbedder(4, 6, dropout_prob=1.0))
    y = torch.tensor([0, 3, 2])
    torch.testing.assert_close(le(y, train=False), le.embedding_table.weight[y])
    null = le.embedding_table.weight[4]
    assert torch.equal(le(y, train=True), null.expand(3, 6))  # dropout 1: every label dropped
    got = le(y, train=False, force_drop_ids=torch.tensor([0, 1, 0]))
    assert torch.equal(got[1], null) and torch.equal(got[0], le.embedding_table.weight[0])
    assert LabelEmbedder(4, 6, 0.0).embedding_table.num_embeddings == 4  # no null row without dropout


def test_2d_sincos_pos_embed():
    pos = layers.get_2d_sincos_pos_embed(8, 3)  # (9, 8): first half the w axis... as MAE
    assert pos.shape == (9, 8)
    # token (row i, col j): first D/2 from the column index j, the rest from the row index i
    i, j = 2, 1
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=F64) / 2)
    want = torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)])
    torch.testing.assert_close(torch.from_numpy(pos[i * 3 + j]).double(), want)


# ---------------------------------------------------------------------------- SMoE router


def router_and_inputs(D=20, M=3, k=2, B=3, L=5, dtype=F64, seed=0):
    r = randomize(TimestepRouter(D, M, k, backend="reference").to(dtype), seed=seed)
    return r, rand(B, L, D, seed=seed + 1, dtype=dtype), rand(B, D, seed=seed + 2, dtype=dtype)


def test_router_gate_route_and_mask_are_the_formulas():
    r, z, e = router_and_inputs()
    probs = torch.softmax(F.silu(e) @ r.f_gate[1].weight.t() + r.f_gate[1].bias, -1)
    torch.testing.assert_close(r.gate_probs(e), probs)
    idx, w = r.route(probs)
    torch.testing.assert_close(w, probs.gather(-1, idx))  # the probabilities themselves
    assert (w.sum(-1) < 1).all()  # not renormalised
    want = torch.ones_like(z)
    for b in range(3):
        for j in idx[b]:
            want[b] = want[b] + probs[b, j] * (z[b] @ r.experts.w[j] + r.experts.b[j])
    torch.testing.assert_close(r(z, idx, w), want)
    m, applied = r.mask_and_apply(z, idx, w)
    torch.testing.assert_close(m, want)
    torch.testing.assert_close(applied, z * want)


def test_router_ties_go_to_the_lower_index():
    r = TimestepRouter(4, 4, 2)
    idx, w = r.route(torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3]]))
    assert idx.tolist() == [[0, 1], [1, 2]]


def test_gates_of_all_blocks_as_one_gemm_equal_each_gate():
    """The one-GEMM gate (models and the drop-in share it) against each block's own gate."""
    routers = [randomize(TimestepRouter(12, 3, 2).double(), seed=s) for s in range(4)]
    gates = [r.f_gate for r in routers]
    assert all(is_silu_linear(g) for g in gates) and not is_silu_linear(torch.nn.Linear(12, 3))
    e = rand(5, 12, seed=7)
    each = torch.stack([r.gate_probs(e) for r in routers], dim=1)  # (5, 4, 3)
    torch.testing.assert_close(gate_probs_of_blocks(e, gates, one_gemm=True), each)
    torch.testing.assert_close(gate_probs_of_blocks(e, gates, one_gemm=False), each)
    torch.testing.assert_close(each.sum(-1), torch.ones(5, 4, dtype=F64))
    half = gate_probs_of_blocks(e.half(), [copy.deepcopy(g).half() for g in gates], one_gemm=True)
    assert half.dtype == torch.float32  # the softmax runs in at least float32
    idx, w = route_top_k(each, 2)  # (5, 4, 2): weights are the probabilities, not renormalised
    assert idx.shape == (5, 4, 2) and torch.equal(w, each.gather(-1, idx))
    assert (w[..., 0] >= w[..., 1]).all()


def test_router_gradcheck_float64():
    r, z, e = router_and_inputs(D=6, B=2, L=2)
    idx, w = r.route(r.gate_probs(e))
    z, w = z.requires_grad_(), w.detach().clone().requires_grad_()
    wt, bt = r.experts.w.detach().clone().requires_grad_(), r.experts.b.detach().clone().requires_grad_()

    def m_of(z, gw, wt, bt):  # forward with the expert weights as inputs
        return torch.func.functional_call(r, {"experts.w": wt, "experts.b": bt}, (z, idx, gw))

    assert torch.autograd.gradcheck(m_of, (z, w, wt, bt))
    assert torch.autograd.gradcheck(lambda z, gw: r.mask_and_apply(z, idx, gw), (z, w))


def test_router_triton_matches_reference_with_an_idle_expert():
    ref, z, e = router_and_inputs(dtype=torch.float32, seed=3)
    fast = TimestepRouter(20, 3, 2, backend="triton").to(DEV)
    fast.load_state_dict(ref.state_dict())
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])  # expert 2 receives no sample
    w = rand(3, 2, seed=9, dtype=torch.float32).abs()
    g1, g2 = rand(3, 5, 20, seed=10, dtype=torch.float32), rand(3, 5, 20, seed=11, dtype=torch.float32)
    outs = []
    for mod, dev in ((ref.double(), "cpu"), (fast, DEV)):
        zz = z.to(dev, next(mod.parameters()).dtype).detach().requires_grad_()
        ww = w.to(dev, zz.dtype).detach().requires_grad_()
        m, applied = mod.mask_and_apply(zz, idx.to(dev), ww)
        ((m * g1.to(dev, zz.dtype)).sum() + (applied * g2.to(dev, zz.dtype)).sum()).backward()
        outs.append([m, applied, zz.grad, ww.grad, mod.experts.w.grad, mod.experts.b.grad])
        torch.testing.assert_close(mod(zz, idx.to(dev), ww), m)
    for got, want in zip(outs[1], outs[0]):
        assert rel(got.detach().cpu(), want) < 1e-5
    assert outs[1][4][2].abs().sum() == 0  # the idle expert gets a zero gradient


# ---------------------------------------------------------------------------- block parts


def test_attention_and_mlp_are_the_formulas():
    attn, mlp = randomize(Attention(8, 2).double()), randomize(Mlp(8, 12).double())
    x = rand(2, 5, 8, seed=1)
    q, k, v = (x @ attn.qkv.weight.t() + attn.qkv.bias).split(8, -1)
    heads = lambda a: a.reshape(2, 5, 2, 4).transpose(1, 2)  # noqa: E731
    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2.0, -1)
    out = (att @ heads(v)).transpose(1, 2).reshape(2, 5, 8)
    torch.testing.assert_close(attn(x), out @ attn.proj.weight.t() + attn.proj.bias)
    h = x @ mlp.fc1.weight.t() + mlp.fc1.bias
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    torch.testing.assert_close(mlp(x), gelu @ mlp.fc2.weight.t() + mlp.fc2.bias)
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 3)


def block_by_hand(block, x, c, mask):
    s1, sc1, g1, s2, sc2, g2 = (
        F.silu(c) @ block.adaLN_modulation[1].weight.t() + block.adaLN_modulation[1].bias
    ).chunk(6, 1)
    r = x if mask is None else x * mask
    r = r + g1[:, None] * block.attn(layer_norm(r) * (1 + sc1[:, None]) + s1[:, None])
    r = r + g2[:, None] * block.mlp(layer_norm(r) * (1 + sc2[:, None]) + s2[:, None])
    return r if mask is None else r + (1 - mask) * x


MASKS = {"dense": None, "switch": (3, 5, 20), "dtr": (3, 1, 20)}


@pytest.mark.parametrize("kind", MASKS)
def test_dit_block_is_the_formula(kind):
    block = randomize(DiTBlock(20, 2, backend="reference").double(), std=0.2)
    x, c = rand(3, 5, 20, seed=1), rand(3, 20, seed=2)
    mask = None if MASKS[kind] is None else 1 + 0.5 * rand(*MASKS[kind], seed=3)
    torch.testing.assert_close(block(x, c, mask), block_by_hand(block, x, c, mask))


def test_dit_block_gradcheck_float64():
    block = randomize(DiTBlock(8, 2, mlp_ratio=1.0, backend="reference").double(), std=0.3)
    args = (
        rand(2, 3, 8, seed=1, requires_grad=True),
        rand(2, 8, seed=2, requires_grad=True),
        rand(2, 3, 8, seed=3, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda x, c, m: block(x, c, m), args, fast_mode=True)


@pytest.mark.parametrize("kind", MASKS)
def test_dit_block_triton_matches_reference(kind):
    ref = randomize(DiTBlock(20, 2, backend="reference"), std=0.2)
    fast = DiTBlock(20, 2, backend="triton").to(DEV)
    fast.load_state_dict(ref.state_dict())
    ref = ref.double()
    x, c, g = rand(3, 5, 20, seed=4), rand(3, 20, seed=5), rand(3, 5, 20, seed=6)
    mask = None if MASKS[kind] is None else 1 + 0.5 * rand(*MASKS[kind], seed=7)
    grads = []
    for mod, dt, dev in ((ref, F64, "cpu"), (fast, torch.float32, DEV)):
        xs = [x.to(dev, dt).detach().requires_grad_(), c.to(dev, dt).detach().requires_grad_()]
        ms = None if mask is None else mask.to(dev, dt).detach().requires_grad_()
        out = mod(xs[0], xs[1], ms)
        (out * g.to(dev, dt)).sum().backward()
        grads.append(
            [out] + [a.grad for a in xs] + ([] if ms is None else [ms.grad]) + [p.grad for p in mod.parameters()]
        )
    for got, want in zip(grads[1], grads[0]):
        assert rel(got.detach().cpu(), want) < 1e-5


def test_adaln_zero_block_takes_any_branches():
    """The function form: attention and MLP are any callables (here parameter-free)."""
    ada = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(20, 120))
    randomize(ada, std=0.2)
    x, c, m = (
        rand(2, 5, 20, seed=1, dtype=torch.float32),
        rand(2, 20, seed=2, dtype=torch.float32),
        rand(2, 1, 20, seed=3, dtype=torch.float32),
    )
    attn, mlp = torch.tanh, torch.sin
    want = adaln_zero_block(x, c, m, ada, attn, mlp, backend="reference")
    got = adaln_zero_block(x.to(DEV), c.to(DEV), m.to(DEV), ada.to(DEV), attn, mlp, backend="triton")
    assert rel(got.cpu(), want) < 1e-5


def test_final_layer_formula_and_triton():
    ref = randomize(FinalLayer(20, 2, 3, backend="reference"), std=0.2)
    x, c = rand(3, 5, 20, seed=1, dtype=torch.float32), rand(3, 20, seed=2, dtype=torch.float32)
    shift, scale = (F.silu(c) @ ref.adaLN_modulation[1].weight.t() + ref.adaLN_modulation[1].bias).chunk(2, 1)
    want = (layer_norm(x) * (1 + scale[:, None]) + shift[:, None]) @ ref.linear.weight.t() + ref.linear.bias
    assert rel(ref(x, c), want) < 1e-6
    fast = FinalLayer(20, 2, 3, backend="triton").to(DEV)
    fast.load_state_dict(ref.state_dict())
    assert fast(x.to(DEV), c.to(DEV)).shape == (3, 5, 12)
    assert rel(fast(x.to(DEV), c.to(DEV)).cpu(), want) < 1e-5


def test_bad_backend_and_shapes_raise():
    for make in (
        lambda: DiTBlock(8, 2, backend="cuda"),
        lambda: FinalLayer(8, 2, 3, backend="fast"),
        lambda: TimestepRouter(8, 3, 2, backend="x"),
    ):
        with pytest.raises(ValueError, match="backend"):
            make()
    with pytest.raises(ValueError, match="backend 'gpu' is not a strategy of mask_ln_modulate"):
        adaln_zero_block(
            rand(1, 2, 4), rand(1, 4), None, lambda c: c.repeat(1, 6), lambda h: h, lambda h: h, backend="gpu"
        )
    with pytest.raises(ValueError, match="top_k"):
        TimestepRouter(8, 3, 4)
    with pytest.raises(ValueError, match="m must have shape"):
        f32 = dict(dtype=torch.float32)
        adaln_zero_block(
            rand(2, 3, 4, **f32),
            rand(2, 4, **f32),
            rand(2, 2, 4, **f32),
            lambda c: c.repeat(1, 6),
            lambda h: h,
            lambda h: h,
            backend="triton",
        )


# ---------------------------------------------------------------------------- GPU, bf16


@pytest.mark.gpu
@pytest.mark.parametrize("kind", MASKS)
def test_gpu_bf16_block_and_router(kind):
    """bf16 fused path vs the float32 reference: at most twice the bf16 reference's error plus 1e-3."""
    torch.manual_seed(0)
    D, B, L = 384, 4, 256
    ref = randomize(DiTBlock(D, 6, backend="reference"), std=0.05).cuda()
    fast = DiTBlock(D, 6, backend="triton").cuda()
    fast.load_state_dict(ref.state_dict())
    router = randomize(TimestepRouter(D, 3, 2, backend="triton"), std=0.05).cuda()
    router_ref = TimestepRouter(D, 3, 2, backend="reference").cuda()
    router_ref.load_state_dict(router.state_dict())
    x, c, e = torch.randn(B, L, D, device="cuda"), torch.randn(B, D, device="cuda"), torch.randn(B, D, device="cuda")
    idx, w = router_ref.route(router_ref.gate_probs(e))
    mask = {"dense": None, "switch": router_ref(x, idx, w), "dtr": (torch.rand(B, 1, D, device="cuda") > 0.2).float()}[
        kind
    ]
    with torch.no_grad():
        want = ref(x, c, mask)
        with torch.autocast("cuda", torch.bfloat16):
            base, got = ref(x, c, mask), fast(x, c, mask)
            m_base, m_got = router_ref(x, idx, w), router(x, idx, w)
    assert rel(got, want) <= 2 * rel(base, want) + 1e-3
    m_want = router_ref(x, idx, w)
    assert rel(m_got, m_want) <= 2 * rel(m_base, m_want) + 1e-3


# ---------------------------------------------------------------------------- models.DiT


def test_switch_dit_model_copies_with_a_live_matcher():
    """After CUDA steps the prior's matcher holds an event (not copyable): copies get a fresh one."""
    import copy
    import pickle
    import threading

    from switch_dit.models import create

    model = create("Switch-DiT-S/2", input_size=4, hidden_size=8, depth=1, num_heads=2, num_timesteps=10, num_classes=2)
    model._matcher._event = threading.Lock()  # stands in for a CUDA event: neither copies nor pickles
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin._matcher is not model._matcher and twin._matcher.perm is None
        assert model._matcher._event is not None
        for a, b in zip(twin.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)
