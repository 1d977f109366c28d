"""Rectified flow (switch_dit.flow) against a float64 restatement of the public DiffMoE code."""

import math

import pytest
import torch

from switch_dit import flow


class _ToyModel(torch.nn.Module):
    """A label- and time-dependent velocity field with learned-sigma style 2C outputs."""

    def __init__(self, channels=3, num_classes=5, learn_sigma=True):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = torch.nn.Parameter(torch.randn(channels, channels, generator=g, dtype=torch.float64) * 0.3)
        self.emb = torch.nn.Parameter(torch.randn(num_classes + 1, channels, generator=g, dtype=torch.float64))
        self.in_channels, self.input_size, self.num_classes = channels, 4, num_classes
        self.learn_sigma = learn_sigma
        self.calls = []

    def forward(self, z, t, y):
        self.calls.append((z.shape[0], t.clone(), y.clone()))
        v = torch.einsum("bchw,cd->bdhw", z, self.w) * torch.cos(t.double())[:, None, None, None]
        v = v + self.emb[y][:, :, None, None] * t.double()[:, None, None, None]
        return torch.cat([v, 7 * torch.ones_like(v)], 1) if self.learn_sigma else v


def test_training_loss_matches_float64_restatement():
    g = torch.Generator().manual_seed(0)
    B, C = 6, 3
    x1 = torch.randn(B, C, 4, 4, generator=g, dtype=torch.float64)
    z0 = torch.randn(B, C, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (B,), generator=g)
    model = _ToyModel(C)
    parts = flow.RectifiedFlow().training_losses(model, x1, t, y, noise=z0)
    # The public code: zt = t x1 + (1 - t) z0, ut = x1 - z0, MSE on the first C channels.
    texp = t.view(B, 1, 1, 1)
    zt = texp * x1 + (1 - texp) * z0
    out = model(zt, t, y)[:, :C]
    want = ((out - (x1 - z0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(parts["mse"], want, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts["loss"], want, rtol=1e-12, atol=0)
    assert parts["loss"].shape == (B,) and float(parts["prior"]) == 0.0
    # The loss trains the velocity channels only.
    parts["loss"].mean().backward()
    assert model.w.grad.abs().sum() > 0


def test_training_loss_without_learned_sigma_and_sampled_t():
    g = torch.Generator().manual_seed(1)
    model = _ToyModel(2, learn_sigma=False)
    rf = flow.RectifiedFlow()
    t = rf.sample_timesteps(5, generator=g)
    assert t.dtype == torch.float32 and t.min() >= 0 and t.max() < 1
    x1 = torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=g)
    parts = rf.training_losses(model, x1, t.double(), torch.zeros(5, dtype=torch.int64))
    assert torch.isfinite(parts["loss"]).all() and (parts["loss"] > 0).all()


@pytest.mark.parametrize(
    "t, msg",
    [
        (torch.tensor([0.5, 1.0]), r"\[0, 1\)"),
        (torch.tensor([-0.1, 0.5]), r"\[0, 1\)"),
        (torch.tensor([1, 2]), "floating-point"),
        (torch.tensor([0.5]), r"shape \(2,\)"),
    ],
)
def test_training_loss_rejects_bad_t(t, msg):
    x1 = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=msg):
        flow.RectifiedFlow().training_losses(_ToyModel(3).float(), x1, t, torch.zeros(2, dtype=torch.int64))


def _restated_sampler(model, z, y, y_null, steps, cfg, mode):
    """The public RectifiedFlow.sample loop, restated in float64."""
    b = z.shape[0]
    dt = 1.0 / steps

    def fn_v(z, t):
        tt = torch.tensor([t] * b)  # float32, as the public code builds it
        vc = model(z, tt, y)[:, : z.shape[1]]
        if y_null is not None:
            vu = model(z, tt, y_null)[:, : z.shape[1]]
            vc = vu + cfg * (vc - vu)
        return vc

    for i in range(steps):
        vc = fn_v(z, i / steps)
        if mode == "euler":
            z = z + dt * vc
        else:
            vn = fn_v(z + dt * vc, (i + 1) / steps)
            z = z + 0.5 * dt * (vc + vn)
    return z


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_sampler_matches_restatement(method, cfg):
    g = torch.Generator().manual_seed(3)
    model = _ToyModel(3)
    y = torch.randint(0, 5, (4,), generator=g)
    z = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    got = flow.sample(model, y, steps=7, method=method, cfg_scale=cfg, noise=z)
    want = _restated_sampler(model, z, y, torch.full_like(y, 5) if cfg != 1.0 else None, 7, cfg, method)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Guidance runs two separate passes of the batch size (not one doubled batch).
    assert all(c[0] == 4 for c in model.calls)
    per_step = (2 if method == "heun" else 1) * (2 if cfg != 1.0 else 1)
    assert len(model.calls) == 2 * 7 * per_step  # the restatement made as many calls


class _GaussianFlow(torch.nn.Module):
    """The exact rectified-flow velocity for data x1 ~ N(mu, s^2) (per channel) and z0 ~ N(0, 1):
    z_t ~ N(t mu, sigma_t^2) with sigma_t^2 = t^2 s^2 + (1 - t)^2, and the ODE moves each point
    along z_t = t mu + sigma_t xi. Its flow map sends z0 to mu + s * z0 at t = 1."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s
        self.register_buffer("_p", torch.zeros((), dtype=torch.float64))

    def forward(self, z, t, y):
        t = t.double().view(-1, 1, 1, 1)
        var = t**2 * self.s**2 + (1 - t) ** 2
        dvar = t * self.s**2 - (1 - t)  # sigma_t * d sigma_t / dt
        return self.mu + dvar / var * (z - t * self.mu)


def test_euler_many_steps_vs_heun_on_gaussian_flow():
    g = torch.Generator().manual_seed(11)
    mu, s = 1.5, 0.4
    model = _GaussianFlow(mu, s)
    z0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.int64)
    exact = mu + s * z0
    euler = flow.sample(model, y, steps=4000, method="euler", noise=z0)
    heun = flow.sample(model, y, steps=200, method="heun", noise=z0)
    heun_coarse = flow.sample(model, y, steps=20, method="heun", noise=z0)
    err_e = (euler - exact).abs().max().item()
    err_h = (heun - exact).abs().max().item()
    err_hc = (heun_coarse - exact).abs().max().item()
    assert err_e < 2e-3 and err_h < 1e-4
    # Second order: 10x the steps gives ~100x less error (allow a wide band).
    assert 30 < err_hc / err_h < 300, (err_hc, err_h)
    torch.testing.assert_close(euler, heun, rtol=0, atol=2e-3)
    assert not math.isnan(err_e)


def test_sampler_bad_arguments():
    model = _ToyModel(3)
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="method"):
        flow.sample(model, y, method="rk4")
    with pytest.raises(ValueError, match="steps"):
        flow.sample(model, y, steps=0)
    with pytest.raises(ValueError, match="noise must have shape"):
        flow.sample(model, y, noise=torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        flow.sample(model, y.float())


# --------------------------------------------------------------------------- every family with flow


def test_timestep_index_meets_diffusion_at_both_ends():
    T = 50
    assert flow.timestep_index(torch.tensor([0.0, 1.0, 1 - 0.5 / T, 1 - 1.5 / T]), T).tolist() == [T - 1, 0, 0, 1]
    assert torch.equal(flow.timestep_index(flow.index_times(T), T), torch.arange(T))
    gen = torch.Generator().manual_seed(3)
    for T in (50, 1000, 4000):
        index = torch.randint(0, T, (20000,), generator=gen)
        t = flow.flow_times_of_index(index, T, generator=gen)
        assert t.dtype == torch.float32 and bool(((t > 0) & (t < 1)).all())
        assert torch.equal(flow.timestep_index(t, T), index)


FAMILY_NAMES = ["DiT-S/4", "DTR-S/4", "Switch-DiT-S/4", "Remix-DiT-S/4"]
TINY_MODEL = dict(input_size=8, in_channels=1, num_classes=5, hidden_size=16, depth=2, num_heads=2, num_timesteps=40)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_flow_model_reads_its_tables_at_the_timestep_of_its_flow_time(name):
    """A flow model of every family equals its diffusion twin (same weights) fed timestep_index(t),
    with the twin's embedder shown the flow times: so DTR's mask, Switch-DiT's gates and prior and
    Remix-DiT's experts are read at timestep_index(t), and only the embedder sees the float t.
    float64, forward, backward and (Switch-DiT) the prior loss."""
    from switch_dit.models import create

    extra = dict(num_experts=4, mixing="sample") if name.startswith("Remix") else {}
    if name.startswith("Switch"):
        extra = dict(prior="exact")
    fl = _randomize(create(name, objective="flow", **TINY_MODEL, **extra), seed=1).double().eval()
    twin = create(name, **TINY_MODEL, **extra).double().eval()
    twin.load_state_dict(fl.state_dict())
    T = TINY_MODEL["num_timesteps"]
    times = flow.index_times(T).double()
    embed = fl.t_embedder
    twin.t_embedder.forward = lambda steps: embed(times[steps])  # the twin's steps -> the flow times
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g)
    steps = torch.tensor([0, 7, 23, T - 1])
    outs = []
    for model, t in ((fl, times[steps]), (twin, steps)):
        out = model(x, t, y)
        loss = out.square().sum()
        if name.startswith("Switch"):
            loss = loss + model.prior_loss(t, generator=torch.Generator().manual_seed(5))
        # (the twin's own embedder is bypassed: its stand-in is the flow model's)
        params = [p for n, p in model.named_parameters() if not n.startswith("t_embedder.")]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        outs.append((out, loss, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-12)
    for a, b in zip(outs[0][2], outs[1][2]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if not name.startswith("DiT"):  # the tables do depend on t: another step, another output
        assert not torch.allclose(twin(x, steps, y), twin(x, steps.flip(0), y))
    with pytest.raises(ValueError, match="floating-point"):
        fl(x, steps, y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fl(x, torch.tensor([0.0, 0.5, 1.5, 0.2], dtype=torch.float64), y)


@pytest.mark.parametrize("name", ["DTR-S/4", "Switch-DiT-S/4", "Remix-DiT-S/4"])
def test_every_family_trains_and_samples_with_flow(name, tmp_path):
    """`switch-dit train --objective flow` for the families with timestep tables (DiT and DiffMoE:
    tests/test_diffmoe_train.py): a run completes, with a prior term where the family has one and
    Remix-DiT's interval sampling in flow times, and samples with Euler."""
    pytest.importorskip("sklearn")
    from switch_dit.config import TrainConfig
    from switch_dit.train import train
    from tests.tiny_run import TINY_TRAIN, records

    cfg = dict(TINY_TRAIN, model=name, objective="flow", num_experts=4, steps=2)
    cfg.update(sample=True, samples_per_class=1, sample_steps=2)
    tc = TrainConfig(**cfg, out=str(tmp_path / "run"))
    assert tc.sample_method == "euler"
    summary = train(tc, log=lambda *a, **k: None)
    rows = records(tmp_path / "run")
    assert summary["steps"] == 2 and all(r["loss"] > 0 and math.isfinite(r["loss"]) for r in rows)
    if not name.startswith("DTR"):
        assert all(r["prior"] > 0 for r in rows)


def test_flow_sampling_passes_one_flow_time_per_step_where_the_model_takes_it():
    """A flow model with ``accepts_shared_timestep`` (Switch-DiT here) is sampled with one 0-d flow
    time per step (its shared path: experts mixed once per block), and gives what per-sample
    times give (float64, Euler and Heun with guidance)."""
    from switch_dit.models import create

    model = _randomize(create("Switch-DiT-S/4", objective="flow", **TINY_MODEL), seed=4).double().eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[1].dim()))
    y = torch.tensor([0, 3, 4])
    for method in ("euler", "heun"):
        noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        seen.clear()
        shared = flow.sample(model, y, steps=3, method=method, cfg_scale=2.0, noise=noise)
        assert seen and set(seen) == {0}
        type(model).accepts_shared_timestep = False  # the per-sample path, for comparison
        try:
            seen.clear()
            per_sample = flow.sample(model, y, steps=3, method=method, cfg_scale=2.0, noise=noise)
            assert set(seen) == {1}
        finally:
            type(model).accepts_shared_timestep = True
        torch.testing.assert_close(shared, per_sample, rtol=1e-10, atol=1e-12)


def test_a_flow_model_is_not_exported_as_a_diffusion_model(tmp_path):
    """The public DiT, DTR, Switch-DiT and Remix-DiT code is diffusion-only: a flow model of these
    families has no reference layout (export refuses rather than write weights the public code
    would read as a diffusion model's), and a Remix-DiT starts only from a DiT of its objective."""
    from switch_dit import checkpoint, interop
    from switch_dit.models import create

    for name in FAMILY_NAMES:
        extra = dict(num_experts=4) if name.startswith("Remix") else {}
        with pytest.raises(ValueError, match="objective 'flow'.*diffusion-only"):
            interop.official_state_dict(create(name, objective="flow", **TINY_MODEL, **extra))
        interop.official_state_dict(create(name, **TINY_MODEL, **extra))  # diffusion: exported as before
    moe = dict(TINY_MODEL, num_experts=4)
    with pytest.raises(ValueError, match="objective 'diffusion'.*public DiffMoE code trains rectified flow"):
        interop.official_state_dict(create("DiffMoE-S/4", objective="diffusion", **moe))
    interop.official_state_dict(create("DiffMoE-S/4", **moe))  # flow, its default: exported
    dit = create("DiT-S/4", objective="flow", **TINY_MODEL)
    kwargs = dict(name="DiT-S/4", objective="flow", **TINY_MODEL)
    sd = dit.state_dict()
    ckpt = {"format": checkpoint.FORMAT, "model_kwargs": kwargs, "model": sd, "ema": sd, "step": 0}
    path = tmp_path / "dit-flow.pt"
    torch.save(ckpt, path)
    assert checkpoint.load_model(path)[0].objective == "flow"  # our format keeps the objective
    remix = create("Remix-DiT-S/4", num_experts=4, **TINY_MODEL)
    with pytest.raises(ValueError, match="objective 'flow'; this Remix-DiT has objective 'diffusion'"):
        interop.init_remix_from_dit_file(remix, path)
    interop.init_remix_from_dit_file(create("Remix-DiT-S/4", num_experts=4, objective="flow", **TINY_MODEL), path)
