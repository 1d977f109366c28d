"""Gaussian diffusion (DDPM with learned variance), as used by DiT / ADM.

(Over 600 lines: the schedule, the losses and both samplers share one process object, as in
ADM and DiT, whose code this follows step for step; splitting it would scatter that object.)

One process object, `GaussianDiffusion`, holds a beta schedule and everything
derived from it: the forward process q(x_t | x_0), the true posterior
q(x_{t-1} | x_t, x_0), the model's reverse step p(x_{t-1} | x_t), the hybrid
training loss of improved DDPM, and the DDPM and DDIM samplers.

Model contract (see switch_dit/models.py):
    model(x, t, y)                       -> (B, C_out, H, W)
    model.forward_with_cfg(x, t, y, cfg_scale) -> same, batch = [cond; null]
    model.prior_loss(t)                  -> scalar tensor (diffusion prior loss)
A model whose ``accepts_shared_timestep`` attribute is true also takes t as one 0-d
tensor for the whole batch; the samplers then pass that (every sample of a sampling
step has the same t), which lets Switch-DiT mix its experts once per block.
With learned sigma C_out = 2C: channels [:C] predict epsilon, channels [C:]
hold v in [-1, 1], the interpolation between log(beta_tilde_t) and log(beta_t).

Timesteps: `t` handed to this module's methods always indexes the process's
own schedule (0..num_timesteps-1). A respaced process keeps a map to the
original T = 1000 steps and hands the model ORIGINAL indices (int64), so the
model's timestep embedding and gate tables are always indexed the same way.

Schedules are float64 tensors; each is gathered at the batch timesteps and only
then cast to the dtype of the data, so a float32/bf16 run sees the same
rounding as the float64 reference at the point of use.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch

from ._checks import check_sample_args

try:  # progress bars are a nicety, never a requirement
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - exercised only without tqdm
    _tqdm = None

__all__ = [
    "get_beta_schedule",
    "space_timesteps",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "GaussianDiffusion",
    "accepts_shared_timestep",
    "create_diffusion",
    "sample",
]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------
# Schedules and respacing
# ---------------------------------------------------------------------------


def get_beta_schedule(name: str, num_timesteps: int = 1000) -> Tensor:
    """Betas of a named schedule, float64 tensor of shape (num_timesteps,).

    "linear": DiT/ADM's linear schedule, endpoints scaled by 1000 / T so that
        any T describes the same continuous process as T = 1000.
    "cosine": Nichol & Dhariwal, alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi/2),
        beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped at 0.999
        (the cap keeps the last step from being a singular beta = 1).
    """
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "cosine":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"noise_schedule must be 'linear' or 'cosine', got {name!r}")


def space_timesteps(num_timesteps: int, spacing: Union[None, int, str, Sequence[int]]) -> List[int]:
    """Sorted list of the original steps a respaced process keeps.

    spacing:
      None or ""      -> every step.
      int or "250"    -> that many steps, evenly strided (first and last kept).
      "10,15,20"      -> the range split into equal sections, each with its own
                         count (ADM's section spacing).
      "ddim50"        -> a fixed integer stride giving exactly 50 steps
                         starting at 0 (the DDIM paper's spacing).
    """
    if spacing is None or spacing == "":
        return list(range(num_timesteps))
    if isinstance(spacing, str):
        if spacing.startswith("ddim"):
            try:
                want = int(spacing[len("ddim") :])
            except ValueError:
                raise ValueError(f"timestep_respacing {spacing!r}: expected 'ddim<N>'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"timestep_respacing {spacing!r}: no integer stride gives {want} of {num_timesteps} steps")
        try:
            counts = [int(part) for part in spacing.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing must be an int, 'N', 'N1,N2,...' or 'ddimN', got {spacing!r}"
            ) from None
    elif isinstance(spacing, bool):
        raise ValueError(f"timestep_respacing must be an int or a string, got {spacing!r}")
    elif isinstance(spacing, int):
        counts = [spacing]
    else:
        counts = [int(c) for c in spacing]

    # Sections split the range as evenly as possible; the first
    # (num_timesteps % n) sections take one extra step.
    base, extra = divmod(num_timesteps, len(counts))
    kept: List[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(f"timestep_respacing: cannot take {count} steps from a section of {size} steps")
        # A fractional stride hits both ends of the section; rounding keeps
        # the steps integer (round-half-even, as Python's round()).
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return sorted(set(kept))


# ---------------------------------------------------------------------------
# Log-likelihood helpers
# ---------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Tanh approximation of the standard normal CDF (|error| < 2e-4).

    Kept instead of the exact erf so that decoder NLLs match ADM/DiT's numbers.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability (nats, elementwise) of data x in [-1, 1] quantised to 256 bins.

    Each value owns the bin x +- 1/255 under N(means, exp(log_scales)^2); the
    two edge bins extend to -inf / +inf so the 256 bins sum to one.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means, log_scales must have one shape, got {tuple(x.shape)}, "
            f"{tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # Clamps keep log() finite where the Gaussian puts ~no mass on the bin.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


def accepts_shared_timestep(model: Callable) -> bool:
    """Whether ``model`` (a module, or a bound method such as ``forward_with_cfg``) takes one
    0-d timestep for the whole batch: its ``accepts_shared_timestep`` attribute."""
    owner = getattr(model, "__self__", model)
    return bool(getattr(owner, "accepts_shared_timestep", False))


def _mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------


class GaussianDiffusion:
    """A discrete Gaussian diffusion process over num_timesteps = len(betas) steps.

    betas: 1-D float64 schedule, values in (0, 1].
    learn_sigma: model outputs 2C channels (epsilon, v) and trains with the
        hybrid loss; otherwise C channels (epsilon), fixed "large" variance
        (beta_t, with beta_tilde_1 at t=0, as DiT), MSE loss.
    lambda_dp: weight of model.prior_loss(t) in the training loss.
    timestep_map: int64 (num_timesteps,), original step of each step of this
        process (None: identity). Set by create_diffusion when respacing.
    """

    def __init__(
        self,
        betas: Tensor,
        *,
        learn_sigma: bool = True,
        lambda_dp: float = 1.0,
        timestep_map: Optional[Sequence[int]] = None,
    ) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        if not isinstance(lambda_dp, (int, float)) or isinstance(lambda_dp, bool) or lambda_dp < 0:
            raise ValueError(f"lambda_dp must be a non-negative number, got {lambda_dp!r}")
        T = betas.numel()
        if timestep_map is None:
            timestep_map = range(T)
        tmap = torch.as_tensor(list(timestep_map), dtype=torch.int64)
        if tmap.shape != (T,):
            raise ValueError(f"timestep_map must have {T} entries, got {tmap.numel()}")

        self.num_timesteps = T
        self.learn_sigma = bool(learn_sigma)
        self.lambda_dp = float(lambda_dp)
        self.timestep_map = tmap
        self.betas = betas

        alphas = 1.0 - betas
        acp = torch.cumprod(alphas, dim=0)
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = acp_prev
        self.sqrt_alphas_cumprod = acp.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - acp).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / acp).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / acp - 1.0).sqrt()

        # Posterior q(x_{t-1} | x_t, x_0); beta_tilde_0 = 0, so its log is
        # clipped to beta_tilde_1 (the value is only used where t = 0 is
        # decoded through the discretized likelihood anyway).
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_variance = post_var
        if T > 1:
            self.posterior_log_variance_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        else:  # a one-step process has no beta_tilde_1 to borrow
            self.posterior_log_variance_clipped = torch.log(betas.clone())
        self.posterior_mean_coef1 = betas * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp)

        # Fixed "large" variance for models without learned sigma.
        fixed_var = torch.cat([post_var[1:2], betas[1:]]) if T > 1 else betas.clone()
        self.fixed_large_variance = fixed_var
        self.fixed_large_log_variance = torch.log(fixed_var)
        self.log_betas = torch.log(betas)

        # Device copies, made once per device: a host->device copy inside
        # every training step would be a sync point (and break graph capture).
        self._device_cache: Dict[torch.device, Dict[str, Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, learn_sigma={self.learn_sigma}, "
            f"lambda_dp={self.lambda_dp}, respaced={self.is_respaced})"
        )

    @property
    def is_respaced(self) -> bool:
        return not torch.equal(self.timestep_map, torch.arange(self.num_timesteps))

    # -- helpers -------------------------------------------------------------

    def _on(self, name: str, device: torch.device) -> Tensor:
        cache = self._device_cache.setdefault(torch.device(device), {})
        if name not in cache:
            cache[name] = getattr(self, name).to(device)
        return cache[name]

    def _check_t(self, t: Tensor, batch: int, arg: str = "t") -> None:
        if not isinstance(t, Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{arg} must be an int64 tensor of timesteps")
        if t.shape != (batch,):
            raise ValueError(f"{arg} must have shape ({batch},), got {tuple(t.shape)}")
        # Range is checked only on the CPU: on a GPU the check would force a
        # host sync every step, and an out-of-range gather asserts there anyway.
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"{arg} must lie in [0, {self.num_timesteps}), got values outside it")

    def _extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Schedule `name` at timesteps t (B,), cast to like's dtype, shaped (B, 1, ...)."""
        values = self._on(name, t.device)[t].to(like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Original-schedule timesteps (int64) the model sees for steps t of this process."""
        return self._on("timestep_map", t.device)[t]

    def _split_output(self, out: Tensor, x: Tensor) -> tuple:
        C = x.shape[1]
        want = 2 * C if self.learn_sigma else C
        if out.shape != (x.shape[0], want, *x.shape[2:]):
            raise ValueError(
                f"model output must have shape {(x.shape[0], want, *x.shape[2:])} "
                f"(learn_sigma={self.learn_sigma}), got {tuple(out.shape)}"
            )
        if self.learn_sigma:
            return out[:, :C], out[:, C:]
        return out, None

    # -- forward process -----------------------------------------------------

    def sample_timesteps(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Uniform random timesteps, int64 (batch,) in [0, num_timesteps)."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator, dtype=torch.int64)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I). x0: (B, ...)."""
        self._check_t(t, x0.shape[0])
        if noise is None:
            noise = torch.randn_like(x0)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x0) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0).

        Returns (mean (B, ...), variance (B, 1, ...), log_variance (B, 1, ...)).
        """
        if x0.shape != x_t.shape:
            raise ValueError(f"x0 and x_t must have one shape, got {tuple(x0.shape)} and {tuple(x_t.shape)}")
        self._check_t(t, x_t.shape[0])
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t
        var = self._extract("posterior_variance", t, x_t)
        log_var = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, var, log_var

    # -- reverse process -----------------------------------------------------

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def p_mean_variance_from_output(
        self, out: Tensor, x: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> Dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a model output already computed (see p_mean_variance)."""
        eps, v = self._split_output(out, x)
        if self.learn_sigma:
            # v in [-1, 1] interpolates the log-variance between the two
            # extremes the true reverse variance can take: beta_tilde_t and beta_t.
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (v + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
            var = torch.exp(log_var)
        else:
            log_var = self._extract("fixed_large_log_variance", t, x).expand_as(x)
            var = self._extract("fixed_large_variance", t, x).expand_as(x)
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": pred_xstart, "eps": eps}

    def p_mean_variance(
        self,
        model: Callable,
        x: Tensor,
        t: Tensor,
        model_kwargs: Optional[dict] = None,
        clip_denoised: bool = False,
        *,
        shared_t: bool = False,
    ) -> Dict[str, Tensor]:
        """Run model(x, t_orig, **model_kwargs) and return p(x_{t-1} | x_t).

        x: (B, C, ...), t: int64 (B,) steps of this process. Returns a dict with
        "mean", "variance", "log_variance" (all (B, C, ...)), "pred_xstart", "eps".
        shared_t: every entry of t is the same step (the caller's promise, not checked:
        that would sync); the model gets it as one 0-d timestep (see the model contract).
        """
        self._check_t(t, x.shape[0])
        t_model = self.model_timesteps(t[0] if shared_t else t)
        out = model(x, t_model, **(model_kwargs or {}))
        return self.p_mean_variance_from_output(out, x, t, clip_denoised)

    # -- training ------------------------------------------------------------

    def training_losses(
        self, model: Callable, x0: Tensor, t: Tensor, y: Optional[Tensor] = None, noise: Optional[Tensor] = None
    ) -> Dict[str, Tensor]:
        """Per-sample training loss for one batch.

        x0: (B, C, H, W) clean data (latents); t: int64 (B,); y: labels (B,).
        Returns "loss" (B,) = mse + vb + lambda_dp * prior, "mse" (B,) on epsilon,
        "vb" (B,) the VLB term in bits/dim (zeros without learned sigma), and
        "prior" the raw scalar model.prior_loss(t_orig) (zero if lambda_dp = 0).
        """
        if not isinstance(x0, Tensor) or x0.ndim < 2:
            raise ValueError("x0 must be a tensor of shape (B, C, ...)")
        self._check_t(t, x0.shape[0])
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        t_model = self.model_timesteps(t)
        out = model(x_t, t_model, y)
        eps, v = self._split_output(out, x_t)

        mse = _mean_flat((noise - eps) ** 2)
        if self.learn_sigma:
            # The VLB term trains only the variance: the mean prediction is
            # detached so that epsilon is learned from the MSE alone.
            frozen = torch.cat([eps.detach(), v], dim=1)
            vb = self._vlb_bits_per_dim(frozen, x0, x_t, t)
            # ADM's hybrid objective rescales the VLB by T/1000 so its weight
            # does not depend on the number of steps (it is 1 for T = 1000).
            vb = vb * (self.num_timesteps / 1000.0)
        else:
            vb = torch.zeros_like(mse)

        prior = self._prior_loss(model, t_model, mse)
        loss = mse + vb + self.lambda_dp * prior
        return {"loss": loss, "mse": mse, "vb": vb, "prior": prior}

    def _vlb_bits_per_dim(self, out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """One VLB term per sample (B,), bits/dim: KL for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance_from_output(out, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def _prior_loss(self, model: Callable, t_model: Tensor, like: Tensor) -> Tensor:
        if self.lambda_dp == 0.0:
            return like.new_zeros(())
        prior_fn = getattr(model, "prior_loss", None)
        if prior_fn is None:  # a DDP-wrapped model keeps its methods on .module
            prior_fn = getattr(getattr(model, "module", None), "prior_loss", None)
        if prior_fn is None:
            raise ValueError("model has no prior_loss(t); pass lambda_dp=0 to train without the prior")
        prior = prior_fn(t_model)
        if not isinstance(prior, Tensor) or prior.numel() != 1:
            raise ValueError("model.prior_loss(t) must return a scalar tensor")
        return prior.reshape(()).to(like.dtype)

    # -- sampling ------------------------------------------------------------

    def p_sample(
        self,
        model: Callable,
        x: Tensor,
        t: Tensor,
        model_kwargs: Optional[dict] = None,
        clip_denoised: bool = False,
        generator: Optional[torch.Generator] = None,
        *,
        shared_t: bool = False,
    ) -> Dict[str, Tensor]:
        """One ancestral (DDPM) step x_t -> x_{t-1}. Returns "sample" and "pred_xstart".
        shared_t: as in p_mean_variance."""
        out = self.p_mean_variance(model, x, t, model_kwargs, clip_denoised, shared_t=shared_t)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # No noise is added on the last step: x_0 is the mean.
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample_ = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample_, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Callable,
        x: Tensor,
        t: Tensor,
        model_kwargs: Optional[dict] = None,
        clip_denoised: bool = False,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
        *,
        shared_t: bool = False,
    ) -> Dict[str, Tensor]:
        """One DDIM step x_t -> x_{t-1} (eta = 0: deterministic; eta = 1: DDPM-like variance).
        shared_t: as in p_mean_variance."""
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or eta < 0:
            raise ValueError(f"eta must be a non-negative number, got {eta!r}")
        out = self.p_mean_variance(model, x, t, model_kwargs, clip_denoised, shared_t=shared_t)
        # Epsilon is re-derived from x0 so that clipping x0 is honoured.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._extract("alphas_cumprod", t, x)
        abar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar)) * torch.sqrt(1.0 - abar / abar_prev)
        # 1 - abar_prev - sigma^2 >= 0 exactly, but can round to just below 0 (NaN in the sqrt) at eta = 1.
        mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt((1.0 - abar_prev - sigma**2).clamp_min(0)) * eps
        if eta == 0:
            return {"sample": mean, "pred_xstart": out["pred_xstart"]}
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def _initial_noise(self, shape, noise, generator, device, dtype) -> Tensor:
        if (
            not isinstance(shape, (tuple, list, torch.Size))
            or len(shape) < 2
            or any(not isinstance(s, int) or s < 1 for s in shape)
        ):
            raise ValueError(f"shape must be a tuple of positive ints (B, C, ...), got {shape!r}")
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
            return noise
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def _steps(self, progress: bool) -> Iterable[int]:
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress and _tqdm is not None:
            return _tqdm(steps, total=self.num_timesteps, leave=False)
        return steps

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: Callable,
        shape: Sequence[int],
        model_kwargs: Optional[dict] = None,
        *,
        noise: Optional[Tensor] = None,
        clip_denoised: bool = False,
        progress: bool = False,
        generator: Optional[torch.Generator] = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Ancestral sampling from pure noise over every step of this process.

        model is called as model(x, t_orig, **model_kwargs), t_orig one 0-d timestep
        for the batch when the model accepts it (accepts_shared_timestep), else (B,).
        Returns x_0 of `shape`. With a generator (on `device`) the result is deterministic.
        """
        x = self._initial_noise(shape, noise, generator, device, dtype)
        shared = accepts_shared_timestep(model)
        for i in self._steps(progress):
            t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
            x = self.p_sample(model, x, t, model_kwargs, clip_denoised, generator, shared_t=shared)["sample"]
        return x

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model: Callable,
        shape: Sequence[int],
        model_kwargs: Optional[dict] = None,
        *,
        noise: Optional[Tensor] = None,
        clip_denoised: bool = False,
        eta: float = 0.0,
        progress: bool = False,
        generator: Optional[torch.Generator] = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """DDIM sampling over every step of this process (respace for fewer steps); the model
        gets one 0-d timestep per step when it accepts it, as in p_sample_loop."""
        x = self._initial_noise(shape, noise, generator, device, dtype)
        shared = accepts_shared_timestep(model)
        for i in self._steps(progress):
            t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
            x = self.ddim_sample(model, x, t, model_kwargs, clip_denoised, eta, generator, shared_t=shared)["sample"]
        return x


# ---------------------------------------------------------------------------
# Construction and the sampling convenience
# ---------------------------------------------------------------------------


def create_diffusion(
    timestep_respacing: Union[None, int, str] = None,
    noise_schedule: str = "cosine",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
    lambda_dp: float = 1.0,
) -> GaussianDiffusion:
    """Build the process DiT/Switch-DiT train and sample with.

    timestep_respacing: None/"" keeps all diffusion_steps; 250 / "250" /
    "ddim50" / "10,20" keep a subset (see space_timesteps). The respaced betas
    are chosen so the kept steps have exactly the original alphas_cumprod.
    """
    if not isinstance(learn_sigma, bool):
        raise ValueError(f"learn_sigma must be a bool, got {learn_sigma!r}")
    if not isinstance(diffusion_steps, int) or isinstance(diffusion_steps, bool) or diffusion_steps < 1:
        raise ValueError(f"diffusion_steps must be a positive int, got {diffusion_steps!r}")
    if not isinstance(timestep_respacing, (type(None), int, str)) or isinstance(timestep_respacing, bool):
        raise ValueError(f"timestep_respacing must be None, an int or a string, got {timestep_respacing!r}")
    betas = get_beta_schedule(noise_schedule, diffusion_steps)
    kept = space_timesteps(diffusion_steps, timestep_respacing)
    if len(kept) == diffusion_steps:
        return GaussianDiffusion(betas, learn_sigma=learn_sigma, lambda_dp=lambda_dp)

    # beta'_k = 1 - abar(s_k) / abar(s_{k-1}) makes the product of the new
    # alphas over the kept steps telescope to the original abar(s_k).
    acp = torch.cumprod(1.0 - betas, dim=0)
    kept_acp = acp[kept]
    prev = torch.cat([kept_acp.new_ones(1), kept_acp[:-1]])
    new_betas = 1.0 - kept_acp / prev
    return GaussianDiffusion(new_betas, learn_sigma=learn_sigma, lambda_dp=lambda_dp, timestep_map=kept)


def sample(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    y: Tensor,
    *,
    cfg_scale: float = 1.0,
    null_class: Optional[int] = None,
    method: str = "ddpm",
    shape: Optional[Sequence[int]] = None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> Tensor:
    """Class-conditional samples (B, C, H, W) for labels y (int64 (B,)).

    cfg_scale != 1 doubles the batch as DiT does: the second half holds the
    null label (null_class, default model.num_classes) and
    model.forward_with_cfg mixes the two; the conditional half is returned.
    shape: per-sample (C, H, W); default (model.in_channels, model.input_size,
    model.input_size). noise: optional initial noise (B, C, H, W).
    Put the model in eval mode first: in training mode DiT drops labels.
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
    shape, dtype = check_sample_args(model, y, cfg_scale, shape)  # (B, C, H, W)
    z = diffusion._initial_noise(shape, noise, generator, y.device, dtype)

    if cfg_scale == 1.0:
        model_fn, kwargs = model, {"y": y}
    else:
        if null_class is None:
            null_class = getattr(model, "num_classes", None)
            if null_class is None:
                raise ValueError("null_class is required when the model has no num_classes")
        # Both halves start from the same noise, so the guided pair sees one x.
        z = torch.cat([z, z])
        y = torch.cat([y, torch.full_like(y, null_class)])
        model_fn, kwargs = model.forward_with_cfg, {"y": y, "cfg_scale": cfg_scale}

    common = dict(noise=z, clip_denoised=clip_denoised, progress=progress, generator=generator)
    if method == "ddpm":
        out = diffusion.p_sample_loop(model_fn, tuple(z.shape), kwargs, **common)
    else:
        out = diffusion.ddim_sample_loop(model_fn, tuple(z.shape), kwargs, eta=eta, **common)
    return out[: shape[0]]
