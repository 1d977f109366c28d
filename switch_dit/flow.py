"""Rectified flow: the training objective and the Euler / Heun samplers (DiffMoE's objective).

The convention is the public DiffMoE code's (``diffusion/rectified_flow.py``):
  t ~ U[0, 1), one per sample, handed to the model as a float (its timestep embedder takes
  fractional t);  x1 = data, z0 ~ N(0, I);
  z_t = t * x1 + (1 - t) * z0,   target velocity u = x1 - z0;
  loss = mean over (C, H, W) of (v - u)^2 with v the first C output channels (a model with
  learned sigma outputs 2C channels; the second half gets no gradient from this loss).
Sampling integrates dz/dt = v(z, t) from t = 0 (noise) to t = 1 (data) with ``steps`` equal
steps; guidance mixes two forward passes, v = v_uncond + cfg * (v_cond - v_uncond), on all C
channels. The two passes are separate calls (not one doubled batch) because a DiffMoE eval
forward chooses tokens over the whole batch: batching them together would change the result.

Model contract: ``model(z, t, y) -> (B, C or 2C, H, W)`` with t float (B,) in [0, 1]; every
family built with ``objective="flow"`` accepts such t (DiffMoE's default). The timestep embedder
takes the float t, as DiffMoE's does. DTR's masks, Switch-DiT's gate table and prior, and
Remix-DiT's expert intervals are tables over T integer timesteps; a flow model reads them at
``timestep_index(t)``, the diffusion step that plays t's part (the noise end t = 0 is step T - 1,
the data end t = 1 is step 0), and evaluates a table row i at the flow time ``index_times(T)[i]``,
the middle of the times that map to i.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from ._checks import _should_check_values, check_sample_args
from .diffusion import accepts_shared_timestep

__all__ = ["RectifiedFlow", "check_flow_time", "sample", "timestep_index", "index_times", "flow_times_of_index"]

Tensor = torch.Tensor


def check_flow_time(t: Tensor, batch: Optional[int] = None, *, closed: bool = False, name: str = "t") -> None:
    """t must be a floating (B,) tensor with values in [0, 1) ([0, 1] with ``closed``).

    The values of a CUDA tensor are checked only with SWITCH_DIT_CHECK_VALUES=1 (a host sync).
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor of flow times in [0, 1), got {t.dtype} "
            "(integer timesteps belong to Gaussian diffusion: build the model with objective='diffusion')"
        )
    if t.dim() != 1 or (batch is not None and t.shape[0] != batch):
        want = f"({batch},)" if batch is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if _should_check_values(t) and t.numel():
        lo, hi = float(t.min()), float(t.max())
        bad_hi = hi > 1.0 if closed else hi >= 1.0
        if lo < 0.0 or bad_hi or lo != lo or hi != hi:
            interval = "[0, 1]" if closed else "[0, 1)"
            raise ValueError(f"{name} values must lie in {interval}, got range [{lo}, {hi}]")


def timestep_index(t: Tensor, num_timesteps: int) -> Tensor:
    """Flow times t (any shape) in [0, 1] -> the integer timesteps of the same role, int64:
    floor((1 - t) * T) clipped to [0, T - 1]. Flow runs from noise (t = 0) to data (t = 1),
    Gaussian diffusion from data (0) to noise (T - 1), so the two ends meet: t = 0 -> T - 1,
    t = 1 -> 0. Step i covers the flow times (1 - (i + 1) / T, 1 - i / T]."""
    return ((1 - t.float()) * num_timesteps).floor().clamp_(0, num_timesteps - 1).long()


def index_times(num_timesteps: int, device=None) -> Tensor:
    """The flow time of every integer timestep: (T,) float32, 1 - (i + 0.5) / T, the middle of
    the times step i covers (``timestep_index(index_times(T), T)`` is arange(T))."""
    return 1 - (torch.arange(num_timesteps, device=device, dtype=torch.float64) + 0.5).div(num_timesteps).float()


def flow_times_of_index(index: Tensor, num_timesteps: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Flow times drawn uniformly inside the times of each integer timestep (B,): float32 in
    (0, 1), with ``timestep_index`` of them equal to ``index``. For Remix-DiT's interval sampling
    under the flow objective. The draw keeps 1 % of each step's width from its edges, so that
    rounding t to float32 (an error of up to 6e-8, i.e. 6e-8 * T steps) never crosses one: that
    holds for T up to 1e5, and larger T is refused."""
    if num_timesteps > 100_000:
        raise ValueError(f"num_timesteps must be <= 100000 for float32 flow times, got {num_timesteps}")
    u = torch.rand(index.shape, device=index.device, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    return (1 - (index.double() + u) / num_timesteps).float()


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def _velocity(out: Tensor, z: Tensor) -> Tensor:
    """The velocity channels of a model output: all of them, or the first C of 2C."""
    if out.shape[1] == z.shape[1]:
        return out
    if out.shape[1] != 2 * z.shape[1]:
        raise ValueError(f"model output must have {z.shape[1]} or {2 * z.shape[1]} channels, got {out.shape[1]}")
    return out[:, : z.shape[1]]


def _expand(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class RectifiedFlow:
    """The rectified-flow objective; the trainer's counterpart of ``GaussianDiffusion``.

    lambda_dp weighs ``model.prior_loss(t)`` (when lambda_dp > 0 and the model has one) in the
    loss, as in ``GaussianDiffusion``: the trainer hands DiffMoE's capacity-predictor loss there,
    so the loss is the public ``mse + cp_loss`` at lambda_dp = 1.
    """

    objective = "flow"

    def __init__(self, lambda_dp: float = 0.0):
        self.lambda_dp = float(lambda_dp)

    def sample_timesteps(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """t ~ U[0, 1), float32 (B,)."""
        return torch.rand(batch, device=device, generator=generator, dtype=torch.float32)

    @staticmethod
    def interpolate(x1: Tensor, z0: Tensor, t: Tensor) -> Tensor:
        """z_t = t * x1 + (1 - t) * z0 for data x1, noise z0 (B, ...), t (B,)."""
        texp = _expand(t, x1)
        return texp * x1 + (1 - texp) * z0

    def training_losses(
        self, model: Callable, x1: Tensor, t: Tensor, y: Optional[Tensor] = None, noise: Optional[Tensor] = None
    ) -> Dict[str, Tensor]:
        """Per-sample loss of one batch: x1 (B, C, H, W) data, t float (B,) in [0, 1), y (B,).

        Returns "loss" (B,) = "mse" + lambda_dp * "prior", "mse" (B,) the velocity error, "vb"
        (B,) zeros and "prior" the scalar model.prior_loss(t) (zero without one): the keys of
        ``GaussianDiffusion.training_losses``.
        """
        if not isinstance(x1, Tensor) or x1.ndim < 2:
            raise ValueError("x1 must be a tensor of shape (B, C, ...)")
        check_flow_time(t, x1.shape[0])
        z0 = torch.randn_like(x1) if noise is None else noise
        if z0.shape != x1.shape:
            raise ValueError(f"noise must have the shape of x1 {tuple(x1.shape)}, got {tuple(z0.shape)}")
        z_t = self.interpolate(x1, z0, t)
        v = _velocity(model(z_t, t, y), z_t)
        mse = _mean_flat((v - (x1 - z0)) ** 2)
        prior = mse.new_zeros(())
        prior_fn = getattr(model, "prior_loss", None) if self.lambda_dp else None
        if prior_fn is not None:
            prior = prior_fn(t).reshape(()).to(mse.dtype)
        return {"loss": mse + self.lambda_dp * prior, "mse": mse, "vb": torch.zeros_like(mse), "prior": prior}


@torch.no_grad()
def sample(
    model: Callable,
    y: Tensor,
    *,
    steps: int = 50,
    method: str = "euler",
    cfg_scale: float = 1.0,
    null_class: Optional[int] = None,
    shape: Optional[Sequence[int]] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Samples (B, C, H, W) for labels y (B,) by integrating the flow from t = 0 to 1.

    method "euler": z += dt * v(z, t_i);  "heun": z~ = z + dt * v(z, t_i), then
    z += dt / 2 * (v(z, t_i) + v(z~, t_{i+1})), with t_i = i / steps. As the public code, Heun
    also corrects the last step, so the model sees t = 1 there. cfg_scale != 1 guides with a
    second pass on the null class (null_class, default model.num_classes).
    shape: per-sample (C, H, W), default from noise (B, C, H, W) if given, else from
    model.in_channels and model.input_size.
    Put the model in eval mode first (training mode drops labels and, for DiffMoE, chooses
    tokens by the training rule).
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if shape is None and noise is not None:
        shape = tuple(noise.shape[1:])
    shape, dtype = check_sample_args(model, y, cfg_scale, shape)  # (B, C, H, W)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        z = noise
    else:
        z = torch.randn(shape, generator=generator, device=y.device, dtype=dtype)
    y_null = None
    if cfg_scale != 1.0:
        if null_class is None:
            null_class = getattr(model, "num_classes", None)
            if null_class is None:
                raise ValueError("null_class is required when the model has no num_classes")
        y_null = torch.full_like(y, null_class)

    # One 0-d flow time per step where the model takes it (``accepts_shared_timestep``: DiT, DTR,
    # Switch-DiT, Remix-DiT): one row of gates and one mixed weight per block (docs/design.md §2.3).
    per_step = () if accepts_shared_timestep(model) else None

    def velocity(z: Tensor, t: float) -> Tensor:
        tt = torch.full(per_step if per_step is not None else (z.shape[0],), t, device=z.device, dtype=torch.float32)
        v = _velocity(model(z, tt, y), z)
        if y_null is not None:
            vu = _velocity(model(z, tt, y_null), z)
            v = vu + cfg_scale * (v - vu)
        return v

    dt = 1.0 / steps
    for i in range(steps):
        v = velocity(z, i / steps)
        if method == "euler":
            z = z + dt * v
        else:
            v_next = velocity(z + dt * v, (i + 1) / steps)
            z = z + 0.5 * dt * (v + v_next)
    return z
