"""DiffMoE (switch_dit.diffmoe) against a float64 restatement of the public code's MoE layer."""

import pytest
import torch
import torch.nn.functional as F

from switch_dit import models
from switch_dit.diffmoe import SIZES, ExpertChoiceMoE, capacity_at

STRATS = ["reference", "bmm", "grouped"]


def _layer(D=8, E=4, capacity=1.0, seed=0, strategy="reference", shared=False):
    torch.manual_seed(seed)
    layer = ExpertChoiceMoE(D, E, capacity, mlp_ratio=2.0, shared_expert=shared, strategy=strategy).double()
    with torch.no_grad():  # non-zero biases, so that a lost bias shows
        for p in (layer.fc1_bias, layer.fc2_bias):
            p.normal_()
        layer.gate_weight.normal_(std=1.0)  # spread scores: no near-ties
    return layer


def _expert(layer, e, x):
    h = F.gelu(x @ layer.fc1_weight[e].t() + layer.fc1_bias[e], approximate="tanh")
    return h @ layer.fc2_weight[e].t() + layer.fc2_bias[e]


def _public_train(layer, x, threshold):
    """forward_train + update_threshold of the public SparseMoEBlock, restated (one rank)."""
    B, s, D = x.shape
    x = x.reshape(-1, D)
    S, E = x.shape[0], layer.num_experts
    pred = layer.capacity_predictor(x.detach())
    k = int((S / E) * layer.capacity)
    scores = F.linear(x, layer.gate_weight).softmax(dim=-1).permute(1, 0)
    gating, index = torch.topk(scores, k=k, dim=-1, sorted=False)
    mask = torch.zeros(E, S, dtype=x.dtype).scatter_(1, index, 1.0)
    outs = torch.stack([_expert(layer, e, x[index[e]]) for e in range(E)]) * gating.unsqueeze(-1)
    y = torch.zeros(S * E, D, dtype=x.dtype)
    flat_index = (index + torch.arange(E).unsqueeze(1) * S).view(-1)
    y = torch.scatter(y, 0, flat_index.unsqueeze(1).expand(-1, D), outs.view(-1, D)).view(E, S, D).sum(0)
    threshold = threshold.clone()
    sig = torch.sigmoid(pred)
    for i in range(E):
        q = torch.topk(sig[:, i], k=k, sorted=True).values[-1]
        threshold[i] = threshold[i] * layer.ema_decay + (1 - layer.ema_decay) * q  # the (1,) buffer, 0.95
    bce = torch.nn.BCEWithLogitsLoss()(pred.view(B, s, E), mask.permute(1, 0).reshape(B, s, E))
    return y.view(B, s, D), threshold, bce, index


def _public_eval(layer, x):
    """forward_eval of the public SparseMoEBlock, restated: k_i from the predictor, tokens by score."""
    B, s, D = x.shape
    x = x.reshape(-1, D)
    pred = torch.sigmoid(layer.capacity_predictor(x))
    scores = F.linear(x, layer.gate_weight).softmax(dim=-1).permute(1, 0)
    y = torch.zeros_like(x)
    ks, sets = [], []
    for i in range(layer.num_experts):
        k_fixed = int(torch.where(pred[:, i] > layer.expert_threshold[i], 1, 0).sum())
        gating, index = torch.topk(scores[i], k=k_fixed, sorted=False)
        y[index, :] += gating.unsqueeze(-1) * _expert(layer, i, x[index])
        ks.append(k_fixed)
        above = torch.nonzero(pred[:, i] > layer.expert_threshold[i]).flatten()
        sets.append((set(index.tolist()), set(above.tolist())))
    return y.view(B, s, D), ks, sets


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("capacity", [1.0, 1.5, 0.5])
def test_train_forward_matches_public(strategy, capacity):
    layer = _layer(capacity=capacity, strategy=strategy)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g)
    thr0 = torch.rand(4, dtype=torch.float64, generator=g)
    layer.expert_threshold.copy_(thr0)
    want_y, want_thr, want_bce, index = _public_train(layer, x, thr0)
    layer.train()
    y = layer(x)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.expert_threshold, want_thr, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.aux_loss(), want_bce, rtol=1e-12, atol=0)
    # The case the combine must get right: some token chosen by several experts.
    if capacity >= 1:
        assert torch.bincount(index.flatten()).max() > 1


def test_threshold_ema_over_steps():
    layer = _layer().train()
    g = torch.Generator().manual_seed(2)
    thr = layer.expert_threshold.clone()
    for _ in range(3):
        x = torch.randn(2, 6, 8, dtype=torch.float64, generator=g)
        _, thr, _, _ = _public_train(layer, x, thr)
        layer(x)
        torch.testing.assert_close(layer.expert_threshold, thr, rtol=1e-12, atol=0)
    assert (layer.expert_threshold > 0).all()


@pytest.mark.parametrize("strategy", STRATS)
def test_eval_forward_matches_public_including_quirk(strategy):
    layer = _layer(E=5, strategy=strategy).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 8, dtype=torch.float64, generator=g)
    # Expert 0 takes no token, expert 1 all S, the others a data-dependent share.
    thr = torch.tensor([2.0, -1.0, 0.45, 0.5, 0.55], dtype=torch.float64)
    layer.expert_threshold.copy_(thr)
    want, ks, sets = _public_eval(layer, x)
    assert ks[0] == 0 and ks[1] == 14 and any(0 < k < 14 for k in ks[2:]), ks
    # The quirk is exercised: some expert's tokens (by gate score) differ from its tokens above threshold.
    assert any(a != b for a, b in sets[2:]), sets
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert int(layer.last_tokens) == sum(ks)


@pytest.mark.parametrize("strategy", ["bmm", "grouped"])
@pytest.mark.parametrize("training", [True, False])
def test_strategies_match_reference_backward(strategy, training):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 8, dtype=torch.float64, generator=g)
    thr = torch.tensor([2.0, -1.0, 0.5, 0.52], dtype=torch.float64)
    grads = {}
    for strat in ("reference", strategy):
        layer = _layer(strategy=strat, shared=True).train(training)
        layer.expert_threshold.copy_(thr)
        xx = x.clone().requires_grad_()
        y = layer(xx)
        dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        (y * dy).sum().backward()
        grads[strat] = [y.detach(), xx.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
    for a, b in zip(grads["reference"], grads[strategy]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert len(grads["reference"]) == len(grads[strategy])


def test_eval_forward_fused_kernels():
    """Evaluation through the Triton kernels (the interpreter on CPU, float32) = the public loop."""
    layer = _layer(D=16, E=5, strategy="fused").float().eval()
    ref = _layer(D=16, E=5, strategy="reference").float().eval()
    thr = torch.tensor([2.0, -1.0, 0.45, 0.5, 0.55])
    layer.expert_threshold.copy_(thr)
    ref.expert_threshold.copy_(thr)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_gradcheck_bmm_layer():
    layer = _layer(D=4, E=2, strategy="bmm").train()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


def _tiny(name="DiffMoE-S/2", **kw):
    torch.manual_seed(0)
    args = dict(input_size=8, num_classes=5, hidden_size=32, depth=4, num_heads=4, num_experts=4)
    return models.create(name, **{**args, **kw})


def test_every_name_builds():
    with torch.device("meta"):
        for name in [n for n in models.MODEL_NAMES if n.startswith("DiffMoE")]:
            m = models.create(name)
            D, depth, heads = SIZES[name.split("-")[1].split("/")[0]]
            assert (m.hidden_size, m.depth, m.num_heads, m.patch_size) == (D, depth, heads, int(name[-1]))
            assert m.blocks[1].mlp.fc1_weight.shape == (16, 4 * D, D)


def test_create_and_layout():
    assert "DiffMoE-XL/2" in models.MODEL_NAMES and "DiffMoE-S/8" in models.MODEL_NAMES
    m = models.create("DiffMoE-S/2", input_size=16, num_classes=10, depth=2)  # depth 2: a quick build
    assert (m.hidden_size, m.num_heads, m.num_experts, m.capacity) == (384, 16, 16, 1.0)
    m = models.create("DiffMoE-S/2", input_size=16, num_classes=10, hidden_size=32, num_experts=2)
    assert m.depth == 12 and m.moe_blocks == [1, 3, 5, 7, 9, 11] and m.objective == "flow"
    assert models.create("DiffMoE-B/4", input_size=16, num_classes=10, num_heads=6, depth=2).num_heads == 6
    m = _tiny(interleave=False)
    assert m.moe_blocks == [0, 1, 2, 3]
    # The interleaved model's dense blocks keep DiT's MLP.
    m = _tiny()
    assert type(m.blocks[0].mlp).__name__ == "Mlp" and isinstance(m.blocks[1].mlp, ExpertChoiceMoE)


@pytest.mark.parametrize("strategy", ["bmm", "grouped"])
def test_model_train_and_eval_forward(strategy):
    m = _tiny().double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=g)
    t = torch.rand(3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (3,), generator=g)
    with torch.no_grad():  # make the blocks non-trivial (adaLN-Zero starts them at zero)
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=g))
    ref = _tiny().double()
    ref.load_state_dict(m.state_dict())
    ref.set_strategy("reference")
    m.set_strategy(strategy)
    for mode in (True, False):
        m.train(mode)
        ref.train(mode)
        torch.manual_seed(8)
        out_ref = ref(x, t, y)
        torch.manual_seed(8)
        out = m(x, t, y)
        assert out.shape == (3, 8, 8, 8)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
        if mode:
            aux = m.aux_loss()
            assert aux.shape == () and aux > 0
            torch.testing.assert_close(aux, ref.aux_loss(), rtol=1e-12, atol=0)
            torch.testing.assert_close(aux, sum(layer.aux_loss() for layer in m.moe_layers()) * m.capacity_loss_weight)


def test_reference_backend_runs_the_public_loops():
    m = _tiny(backend="reference")
    assert all(
        layer._strategy(False) == "reference" and layer._strategy(True) == "reference" for layer in m.moe_layers()
    )
    m.set_backend("auto")
    assert [m.moe_layers()[0]._strategy(t) for t in (True, False)] == ["bmm", "grouped"]
    m.set_strategy("fused")
    assert m.moe_layers()[0]._strategy(False) == "fused"


def test_capacity_schedule():
    assert capacity_at(0, 1.0, 16, 10, 20) == 16
    assert capacity_at(15, 1.0, 16, 10, 20) == pytest.approx(1 + 15 * 5 / 10)
    assert capacity_at(21, 1.0, 16, 10, 20) == 1.0
    m = _tiny(capacity_schedule=(2, 4)).train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.int64)
    m.training_iters = 0
    m(x, t, y)
    assert all(layer.capacity == 4 for layer in m.moe_layers())


def test_bad_input():
    x, y = torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="capacity must be > 0"):
        _tiny(capacity=0.0)
    m = _tiny(capacity=0.01).train()
    with pytest.raises(ValueError, match="C = int"):
        m(x, torch.rand(2), y)
    m = _tiny(input_size=2).train()  # S = B * L = 2 tokens < 4 experts
    with pytest.raises(ValueError, match="exceeds the pool"):
        m(torch.randn(2, 4, 2, 2), torch.rand(2), y)
    m = _tiny()
    with pytest.raises(ValueError, match="floating-point"):
        m(x, torch.tensor([1, 2]), y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m(x, torch.tensor([0.5, 1.5]), y)
    md = _tiny(objective="diffusion")
    with pytest.raises(ValueError, match="int64 timesteps"):
        md(x, torch.tensor([0.5, 0.2]), y)
    md.eval()(x, torch.tensor([3, 999]), y)  # int timesteps are fine for a diffusion model
    sd = m.state_dict()
    sd["blocks.1.mlp.expert_threshold"] = torch.zeros(5)
    with pytest.raises(ValueError, match="expert_threshold has shape"):
        m.load_state_dict(sd)
    with pytest.raises(ValueError, match="strategy"):
        m.set_strategy("magic")
    with pytest.raises(RuntimeError, match="training-mode forward"):
        _tiny().aux_loss()


def _public_keys(depth, E, moe_blocks):
    """The state-dict keys of the public DiT in models_DiffMoE.py (timm PatchEmbed, Mlp)."""
    keys = {
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "pos_embed",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    keys |= {f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    for b in range(depth):
        p = f"blocks.{b}."
        keys |= {p + f"{m}.{w}" for m in ("attn.qkv", "attn.proj", "adaLN_modulation.1") for w in ("weight", "bias")}
        if b in moe_blocks:
            keys |= {p + "mlp.gate_weight", p + "mlp.expert_threshold", p + "mlp.ema_decay"}
            keys |= {p + f"mlp.capacity_predictor.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
            keys |= {
                p + f"mlp.experts.{j}.{f}.{w}" for j in range(E) for f in ("fc1", "fc2") for w in ("weight", "bias")
            }
        else:
            keys |= {p + f"mlp.{f}.{w}" for f in ("fc1", "fc2") for w in ("weight", "bias")}
    return keys


def test_interop_round_trip():
    from switch_dit import interop

    src = _tiny()
    src.eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for layer in src.moe_layers():
            layer.expert_threshold.uniform_(0.3, 0.7)
    sd = interop.official_state_dict(src)
    assert set(sd) == _public_keys(4, 4, [1, 3])
    assert sd["blocks.1.mlp.experts.2.fc1.weight"].shape == (128, 32)
    torch.testing.assert_close(sd["blocks.3.mlp.experts.1.fc2.bias"], src.blocks[3].mlp.fc2_bias[1])
    dst = _tiny()
    interop.load_official(dst, {"model": {"module." + k: v for k, v in sd.items()}})
    dst.eval()
    g = torch.Generator().manual_seed(9)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 4])
    torch.testing.assert_close(dst(x, t, y), src(x, t, y), rtol=0, atol=0)
    torch.testing.assert_close(dst.blocks[1].mlp.expert_threshold, src.blocks[1].mlp.expert_threshold)


def test_interop_errors():
    from switch_dit import interop

    sd = interop.official_state_dict(_tiny(num_experts=2))
    with pytest.raises(ValueError, match="E = 4"):
        interop.load_official(_tiny(), sd)
    sd = interop.official_state_dict(_tiny())
    sd["blocks.1.mlp.expert_threshold"] = torch.zeros(3)
    with pytest.raises(ValueError, match="expert_threshold"):
        interop.load_official(_tiny(), sd)
    sd = interop.official_state_dict(_tiny(interleave=False))
    with pytest.raises(ValueError, match="does not fit DiffMoE"):
        interop.load_official(_tiny(), sd)


requires_cuda = pytest.mark.gpu


def _cuda_layer(strategy):
    torch.manual_seed(0)
    layer = ExpertChoiceMoE(64, 8, 1.0, strategy=strategy).cuda().to(torch.bfloat16)
    layer.expert_threshold.copy_(torch.linspace(0.3, 0.7, 8))
    layer.expert_threshold[0] = 2.0  # an expert that takes no token
    return layer


@requires_cuda
@pytest.mark.parametrize("training", [True, False])
def test_cuda_step_has_no_host_sync(training):
    """The fast paths (bmm in training, grouped at evaluation) never wait for the device."""
    layer = _cuda_layer("auto").train(training)
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=training)
    layer(x)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        if training:
            (y.float().square().mean() + layer.aux_loss()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # The same token choice as the fast path (ties of bf16 scores go the same way): the public
    # loop in training, the padded bmm over the same ranking at evaluation.
    ref = _cuda_layer("reference" if training else "bmm").train(training)
    ref.load_state_dict(layer.state_dict())
    want = ref(x.detach()).float()
    got = y.detach().float()
    err = (got - want).norm() / want.norm()
    assert err < 1e-2, err


@requires_cuda
def test_cuda_eval_step_replays_from_a_cuda_graph():
    layer = _cuda_layer("auto").eval()
    static = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                layer(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(static)
        for seed in range(3):  # new data, new k_e: the graph's sizes do not depend on them
            g = torch.Generator(device="cuda").manual_seed(seed)
            static.copy_(torch.randn(static.shape, device="cuda", dtype=static.dtype, generator=g))
            graph.replay()
            want = layer(static)
            torch.testing.assert_close(out, want, rtol=0, atol=0)


@requires_cuda
def test_cuda_flow_sampling_from_a_cuda_graph_equals_eager():
    from switch_dit import sampling

    torch.manual_seed(0)
    model = (
        models.create(
            "DiffMoE-S/4",
            input_size=8,
            in_channels=1,
            num_classes=10,
            hidden_size=64,
            depth=2,
            num_heads=4,
            num_experts=4,
        )
        .cuda()
        .eval()
    )
    for layer in model.moe_layers():
        layer.expert_threshold.fill_(0.5)
    labels = torch.arange(4, device="cuda")
    eager = sampling.generate(model, labels, method="heun", steps=3, cfg_scale=2.0, capture=False, seed=1)
    graph = sampling.generate(model, labels, method="heun", steps=3, cfg_scale=2.0, capture=True, seed=1)
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)


def test_published_checkpoint_loads_and_samples(tmp_path):
    """A state dict in the public layout (saved as the public train.py does): the architecture
    is read off the shapes, the weights and thresholds load, and the model samples."""
    from switch_dit import checkpoint, interop

    src = models.create(
        "DiffMoE-S/2", input_size=8, num_classes=5, hidden_size=32, depth=4, num_heads=4, num_experts=3
    ).eval()
    with torch.no_grad():
        for layer in src.moe_layers():
            layer.expert_threshold.uniform_(0.3, 0.7)
    torch.save(
        {"model": interop.official_state_dict(src), "ema": interop.official_state_dict(src)}, tmp_path / "0050000.pt"
    )
    model, info = checkpoint.load_model(tmp_path / "0050000.pt", num_heads=4)
    assert info["layout"] == "reference" and model.num_experts == 3 and model.moe_blocks == [1, 3]
    assert model.objective == "flow"
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), src(x, t, y), rtol=0, atol=0)


def test_training_forward_compiles():
    """torch.compile of a training step (the threshold update runs outside the graph)."""
    m = _tiny().train()
    ref = _tiny().train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    m.y_embedder.dropout_prob = ref.y_embedder.dropout_prob = 0.0
    compiled = torch.compile(m, backend="aot_eager")
    out = compiled(x, t, y)
    (out.square().mean() + m.aux_loss()).backward()
    torch.testing.assert_close(out, ref(x, t, y), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.blocks[1].mlp.expert_threshold, ref.blocks[1].mlp.expert_threshold)
    assert m.blocks[1].mlp.fc1_weight.grad is not None
