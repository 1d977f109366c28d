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
