"""Remix-DiT: N timestep experts mixed from K basis models (docs/design.md §1.5).

Published semantics (Fang et al., public code VainF/Remix-DiT ``remix_dit.py``):
  - The qkv, proj, fc1 and fc2 linears of every block are *mixed linears*: weight
    (K, out, in), bias (K, out); a model for mixing coefficients c (K,) uses
    W = sum_k c_k W_k and b = sum_k c_k b_k. The adaLN linears, the embedders and the
    (plain) final layer are ordinary layers.
  - Expert n in [0, N) owns the timesteps [n T/N, (n+1) T/N): id = t // (T // N). Its
    coefficients are softmax(coefficients[id]), ``coefficients = nn.Embedding(N, K)``.
  - mixing="batch" (published): one mixed model per batch, from the batch mean of the
    samples' softmax coefficients; training draws every batch from one interval.
  - mixing="sample" (ours): every sample uses its own expert, so batches may mix
    timesteps freely (uniform timestep sampling).
  - The prior ties expert groups to bases: eye(K) with each row repeated N / K times;
    ``prior_loss`` is the cross-entropy of the coefficient logits against its argmax.
  - Initialisation from a trained DiT repeats every mixed layer's weight and bias K
    times (``interop.init_remix_from_dit``).

Fast paths (backend "triton", or "auto" on CUDA), docs/design.md §2.1 and §2.3:
  - shared coefficients (mixing="batch", or one timestep for the whole batch as in
    sampling): each layer's K bases are mixed once by a (1, K) x (K, out*in) GEMM on the
    device (no host reads), then one dense F.linear (cuBLAS);
  - per-sample coefficients: ``ops.mixed_linear`` with all K bases active (idx = 0..K-1
    for every sample, coef = the sample's softmax coefficients).
  Gradients reach all K bases and the coefficient table on both paths. The block runs
  the fused adaLN-Zero ops of our DiT unchanged (``layers.adaln_zero_block``).

If T is not a multiple of N (the published code would index past the table for the
last T mod N timesteps), those timesteps belong to the last expert.

Reading order: the mixed linear as functions, the layers, the model, the configs and the
published training recipe, then the drop-in patch for models built by the published code
(``accelerate_published``, what ``switch_dit.accelerate`` calls for them). The module is a
little over 600 lines because it keeps all of Remix-DiT in one file, as DiT's and the
published code's single-file style does.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dropin
from ._checks import check_index, check_labels
from .dropin import _Patched
from .flow import check_flow_time, timestep_index
from .layers import (
    LN_EPS,
    FinalLayer,
    adaln_zero_block,
)
from .models import SIZES, DiT, add_embedders, guided_forward, init_embedders_and_outputs, shared_timestep
from .ops import mixed_linear
from .ops.dispatch import backend_for, check_backend, no_autocast, runs_reference

__all__ = [
    "RemixDiT",
    "MixedLinear",
    "create",
    "MODEL_NAMES",
    "MIXING",
    "TIMESTEP_SAMPLING",
    "expert_prior",
    "mix_bases",
    "mixed_linear_shared",
    "mixed_linear_per_sample",
    "sample_interval_timesteps",
    "published_prior_weight",
    "coefficient_param_groups",
    "accelerate_published",
]

MODEL_NAMES = [f"Remix-DiT-{size}/{p}" for size in SIZES for p in (2, 4, 8)]
MIXING = ("batch", "sample")
PRIOR_STRENGTH = 3.0  # published: coefficient logits start at randn + 3 std * prior


#################################################################################
#                          Mixed linear (the functions)                         #
#################################################################################


def mix_bases(coef: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """sum_k coef[k] * bases[k]: coef (K,), bases (K, *S) -> (*S) in the bases' dtype.

    One (1, K) x (K, prod S) GEMM, on the device, no host reads. Autocast is off inside:
    the mix runs in the parameters' (master) dtype, and F.linear casts the one mixed
    weight afterwards, instead of casting all K bases.
    """
    dev = bases.device.type
    with no_autocast(dev):
        return (coef.to(bases.dtype).unsqueeze(0) @ bases.flatten(1)).view(bases.shape[1:])


def mixed_linear_shared(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, coef: torch.Tensor, fast: bool
) -> torch.Tensor:
    """One mixed model for the whole batch: x (B, L, in), weight (K, out, in), bias (K, out),
    coef (K,) -> (B, L, out). ``fast=False`` runs the published formula as written."""
    if not fast:
        w = (coef[:, None, None].to(weight.dtype) * weight).sum(0)
        b = None if bias is None else (coef[:, None].to(bias.dtype) * bias).sum(0)
        return F.linear(x, w, b)
    return F.linear(x, mix_bases(coef, weight), None if bias is None else mix_bases(coef, bias))


def mixed_linear_per_sample(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, coef: torch.Tensor, backend: str
) -> torch.Tensor:
    """Each sample its own mixed model: x (B, L, in), weight (K, out, in), bias (K, out),
    coef (B, K) -> (B, L, out) = x_b @ (sum_k c_bk W_k)^T + sum_k c_bk b_k.

    Fast path: ops.mixed_linear with all K bases active; it takes the weight as
    (K, in, out), which is a transposed *view* of ours (the kernels take any strides).
    Reference: the formula in plain PyTorch.
    """
    if not runs_reference(backend, x):
        K = weight.shape[0]
        idx = torch.arange(K, device=x.device).expand(x.shape[0], K)
        return mixed_linear(x, weight.transpose(1, 2), bias, idx, coef, backend=backend_for("mixed_linear", backend))
    w = torch.einsum("bk,koi->boi", coef.to(weight.dtype), weight)
    y = torch.einsum("bli,boi->blo", x, w.to(x.dtype))
    if bias is not None:
        y = y + (coef.to(bias.dtype) @ bias).to(y.dtype)[:, None, :]
    return y


#################################################################################
#                             Mixed layers (modules)                            #
#################################################################################


class MixedLinear(nn.Module):
    """K bases of a linear layer in the published layout: weight (K, out, in), bias (K, out).

    forward(x (B, L, in), coef, backend) -> (B, L, out); coef (K,) shared by the batch or
    (B, K) per sample.
    """

    def __init__(self, in_features: int, out_features: int, num_basis: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.num_basis = in_features, out_features, num_basis
        self.weight = nn.Parameter(torch.empty(num_basis, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_basis, out_features)) if bias else None
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor, coef: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        if coef.dim() == 1:
            return mixed_linear_shared(x, self.weight, self.bias, coef, not runs_reference(backend, x))
        return mixed_linear_per_sample(x, self.weight, self.bias, coef, backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, num_basis={self.num_basis}"


class MixedAttention(nn.Module):
    """Multi-head self-attention with mixed qkv and proj: (B, L, D), coef -> (B, L, D)."""

    def __init__(self, dim: int, num_heads: int, num_basis: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = MixedLinear(dim, 3 * dim, num_basis)
        self.proj = MixedLinear(dim, dim, num_basis)

    def forward(self, x: torch.Tensor, coef: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x, coef, backend).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, L, D), coef, backend)


class MixedMlp(nn.Module):
    """Mixed fc1 -> GELU(tanh) -> mixed fc2: (B, L, D), coef -> (B, L, D)."""

    def __init__(self, dim: int, hidden: int, num_basis: int):
        super().__init__()
        self.fc1 = MixedLinear(dim, hidden, num_basis)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = MixedLinear(hidden, dim, num_basis)

    def forward(self, x: torch.Tensor, coef: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x, coef, backend)), coef, backend)


class MixedDiTBlock(nn.Module):
    """adaLN-Zero block with mixed attention and MLP; forward(x (B, L, D), c (B, D), coef) -> (B, L, D).

    The adaLN part is our DiT block's (``adaln_zero_block``, no mask): fused norm /
    modulate / gated residual ops on the fast path.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, num_basis: int, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.attn = MixedAttention(hidden_size, num_heads, num_basis)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.mlp = MixedMlp(hidden_size, int(hidden_size * mlp_ratio), num_basis)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        return adaln_zero_block(
            x,
            c,
            None,
            self.adaLN_modulation,
            lambda h: self.attn(h, coef, backend),
            lambda h: self.mlp(h, coef, backend),
            eps=self.norm1.eps,
            backend=backend,
        )


def expert_prior(num_experts: int, num_basis: int) -> torch.Tensor:
    """The published prior: eye(K) with every row repeated N / K times, (N, K) float32."""
    return torch.eye(num_basis).repeat_interleave(num_experts // num_basis, dim=0)


#################################################################################
#                                 The model                                     #
#################################################################################


class RemixDiT(nn.Module):
    """Remix-DiT (see the module doc).

    forward(x (B, C, H, W), t (B,) int64 in [0, T), or an int or 0-d tensor (one timestep
    for the whole batch), y (B,) int64) -> (B, C_out, H, W), C_out = 2C with learned sigma.
    Parameter names and shapes are the published code's, so its state dicts load as they are.
    """

    routing = "remix"  # the family tag other modules read (``DiT.routing`` is none/dtr/switch)
    accepts_shared_timestep = True  # the samplers may pass one 0-d t per step (docs/design.md §2.3)

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        num_basis: int = 4,
        num_experts: int = 20,
        mixing: str = "batch",
        num_timesteps: int = 1000,
        cfg_channels: int = 3,
        backend: str = "auto",
        objective: str = "diffusion",
    ):
        super().__init__()
        if objective not in ("diffusion", "flow"):
            raise ValueError(f"objective must be 'diffusion' or 'flow', got {objective!r}")
        if mixing not in MIXING:
            raise ValueError(f"mixing must be one of {MIXING}, got {mixing!r}")
        if num_basis < 1:
            raise ValueError(f"num_basis must be >= 1, got {num_basis}")
        if num_experts < 1 or num_experts % num_basis:
            raise ValueError(
                f"num_experts must be a positive multiple of num_basis={num_basis} (the prior gives "
                f"every basis num_experts / num_basis experts), got {num_experts}"
            )
        if num_timesteps < num_experts:
            raise ValueError(f"num_timesteps ({num_timesteps}) must be >= num_experts ({num_experts})")
        if hidden_size % 4 or hidden_size % num_heads:
            raise ValueError(
                f"hidden_size must be a multiple of 4 (2-D sin-cos embedding) and of "
                f"num_heads={num_heads}, got {hidden_size}"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if cfg_channels < 1:
            raise ValueError(f"cfg_channels must be >= 1, got {cfg_channels}")
        self.backend = check_backend(backend)
        self.objective = objective  # "flow": float t in [0, 1], the intervals read at timestep_index(t)
        self.mixing = mixing
        self.num_basis, self.num_experts, self.num_timesteps = num_basis, num_experts, num_timesteps
        self.timesteps_per_expert = num_timesteps // num_experts
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.cfg_channels = cfg_channels
        self.input_size, self.patch_size = input_size, patch_size
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes = num_classes

        add_embedders(self, input_size, patch_size, in_channels, hidden_size, num_classes, class_dropout_prob)
        self.blocks = nn.ModuleList(
            [MixedDiTBlock(hidden_size, num_heads, mlp_ratio, num_basis, backend) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, backend)
        self.coefficients = nn.Embedding(num_experts, num_basis)
        # Not in the state dict (the published model keeps it as a plain attribute).
        self.register_buffer("prior", expert_prior(num_experts, num_basis), persistent=False)
        self.initialize_weights()

    # The published model has no matcher and no per-timestep table: the training loop's hooks see None.
    prior_matcher = None

    def set_backend(self, backend: str) -> "RemixDiT":
        """Switch every block and the final layer to ``backend`` ("auto", "reference" or "triton")."""
        self.backend = check_backend(backend)
        for module in self.modules():
            if isinstance(module, (MixedDiTBlock, FinalLayer)):
                module.backend = self.backend
        return self

    def initialize_weights(self) -> None:
        """The published initialisation: DiT's, with xavier_uniform_ applied to the (K, out, in)
        mixed weights as they are (torch's fans of a 3-D tensor), and coefficient logits
        randn + 3 std(randn) * prior."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, MixedLinear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        init_embedders_and_outputs(self)
        with torch.no_grad():
            logits = torch.randn_like(self.coefficients.weight)
            self.coefficients.weight.copy_(logits + self.prior * logits.std() * PRIOR_STRENGTH)

    unpatchify = DiT.unpatchify  # (B, L, p*p*C) -> (B, C, H, W), the same layout

    # -- coefficients ------------------------------------------------------------------

    def expert_ids(self, t: torch.Tensor) -> torch.Tensor:
        """Expert of each timestep: t // (T // N), the last T mod N timesteps to the last expert."""
        return torch.clamp(torch.div(t, self.timesteps_per_expert, rounding_mode="floor"), max=self.num_experts - 1)

    def mixing_coefficients(self, t: torch.Tensor) -> torch.Tensor:
        """Coefficients of the K bases, at least float32: (K,) when one model serves the batch
        (mixing="batch": the batch mean of the softmaxes, as published; or a 0-d t), else (B, K).
        A flow model's float t picks its expert by ``switch_dit.flow.timestep_index``."""
        steps = timestep_index(t, self.num_timesteps) if self.objective == "flow" else t
        logits = self.coefficients(self.expert_ids(steps))
        coef = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        if t.dim() == 0 or self.mixing == "sample":
            return coef
        return coef.mean(0)

    def prior_loss_per_expert(self) -> torch.Tensor:
        """The published ``get_prior_loss``: cross-entropy of each expert's logits against the
        prior's basis, (N,) (reduction "none")."""
        return F.cross_entropy(self.coefficients.weight, self.prior.argmax(1), reduction="none")

    def prior_loss(self, t: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loop's prior term: the mean of ``prior_loss_per_expert`` (scalar; t unused,
        kept for the common model contract)."""
        return self.prior_loss_per_expert().mean()

    # -- forward -----------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        want = (self.in_channels, self.input_size, self.input_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if self.objective == "flow":  # float flow times (switch_dit.flow); 1 is Heun's last point
            zero_d = isinstance(t, torch.Tensor) and t.dim() == 0
            check_flow_time(t.reshape(1) if zero_d else t, None if zero_d else x.shape[0], closed=True)
        elif isinstance(t, torch.Tensor) and t.dim() == 0:
            check_index(t.reshape(1), self.num_timesteps, "t (timesteps)")
        else:
            check_index(t, self.num_timesteps, "t (timesteps)", batch=x.shape[0])
        check_labels(y, self.y_embedder.embedding_table.num_embeddings, batch=x.shape[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor) -> torch.Tensor:
        if isinstance(t, int):  # one timestep for the batch (docs/design.md §2.3)
            t = shared_timestep(t, self.num_timesteps, x)
        self._check_inputs(x, t, y)
        coef = self.mixing_coefficients(t)  # (K,) or (B, K)
        if t.dim() == 0:  # one timestep for the batch: embed it once
            t_emb = self.t_embedder(t.reshape(1)).expand(x.shape[0], -1)
        else:
            t_emb = self.t_embedder(t)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, L, D)
        c = t_emb + self.y_embedder(y, self.training)  # (B, D)
        for block in self.blocks:
            h = block(h, c, coef)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, channels: int | None = None
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries the null label.

        Guides the first ``channels`` output channels (default ``self.cfg_channels``: 3, as
        the published code does, which slices all channels of a model with fewer;
        ``in_channels`` guides every epsilon channel, as our DiT does); the guided half is
        duplicated into both halves.
        """
        n = min(self.cfg_channels, self.out_channels) if channels is None else channels
        if not 1 <= n <= self.out_channels:
            raise ValueError(f"channels must be in [1, {self.out_channels}], got {n}")
        return guided_forward(self, x, t, y, cfg_scale, n)


#################################################################################
#                                   Configs                                     #
#################################################################################


def create(
    name: str,
    *,
    num_basis: int = 4,
    num_experts: int | None = None,
    mixing: str = "batch",
    timestep_sampling: str | None = None,
    **kwargs,
) -> RemixDiT:
    """Build ``Remix-DiT-{S,B,L,XL}/{2,4,8}``; extra keywords as RemixDiT's (hidden_size,
    depth, num_heads override the named size). num_experts defaults to 20.

    timestep_sampling ("interval" or "uniform"), when given, is checked against mixing:
    uniform sampling with mixing="batch" warns (the batch mean blurs the experts).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    size, patch = name[len("Remix-DiT-") :].split("/")
    hidden, depth, heads = SIZES[size]  # DiT's sizes
    cfg = dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(patch))
    cfg.update(kwargs)
    if timestep_sampling is not None:
        check_timestep_sampling(timestep_sampling, mixing)
    return RemixDiT(num_basis=num_basis, num_experts=20 if num_experts is None else num_experts, mixing=mixing, **cfg)


# The published training recipe (train_fast.py)
PUBLISHED_PRIOR_STRENGTH = 1e-4  # prior_strength
PUBLISHED_COEF_LR = 1e-2  # AdamW learning rate of the coefficient table (its own parameter group)


def published_prior_weight(progress: float, strength: float = PUBLISHED_PRIOR_STRENGTH) -> float:
    """Weight of the prior loss at ``progress`` in [0, 1] of training.

    train_fast.py computes ``prior_strength * (1 - (epoch / epochs - 1))`` per epoch, which by
    Python's precedence is strength * (2 - epoch / epochs): 2 * strength at the start, falling
    linearly to strength at the end. We keep that expression as written (per step here:
    progress = step / steps).
    """
    return strength * (2.0 - progress)


def coefficient_param_groups(model: nn.Module, lr: float, coef_lr: float = PUBLISHED_COEF_LR) -> list[dict]:
    """AdamW parameter groups as published: every parameter at ``lr``, the coefficient table
    (any parameter named ``coefficients.*``) at ``coef_lr``."""
    coef, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (coef if name.split(".")[-2:-1] == ["coefficients"] else rest).append(p)
    if not coef:
        raise ValueError("the model has no coefficients.weight parameter: not a Remix-DiT")
    return [{"params": rest, "lr": lr}, {"params": coef, "lr": coef_lr}]


TIMESTEP_SAMPLING = ("interval", "uniform")
_warned_uniform_batch = False


def check_timestep_sampling(sampling: str, mixing: str) -> None:
    """Raise for an unknown sampling; warn once for uniform sampling with batch mixing."""
    global _warned_uniform_batch
    if sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLING}, got {sampling!r}")
    if sampling == "uniform" and mixing == "batch" and not _warned_uniform_batch:
        _warned_uniform_batch = True
        warnings.warn(
            "Remix-DiT with mixing='batch' and uniform timestep sampling: every batch mixes one model "
            "from the mean coefficients of all its timesteps, which blurs the experts; use "
            "mixing='sample' or interval sampling (the published setting)",
            UserWarning,
            stacklevel=3,
        )


def sample_interval_timesteps(
    batch: int, num_timesteps: int, num_experts: int, *, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The published training's timesteps: one expert interval per step, drawn uniformly, and
    every t of the batch uniform inside it: (batch,) int64. Sync-free (the interval is drawn
    on the device). The last expert's interval includes the T mod N remainder."""
    per = num_timesteps // num_experts
    e = torch.randint(0, num_experts, (1,), device=device, generator=generator)
    lo = e * per
    width = torch.where(e == num_experts - 1, num_timesteps - lo, torch.full_like(lo, per))
    u = torch.rand(batch, device=device, generator=generator)
    return lo + torch.clamp((u * width).long(), max=width - 1)


#################################################################################
#              Drop-in: a model built by the published remix_dit.py             #
#################################################################################

_PUBLISHED = (
    "a Remix-DiT built by the published code (remix_dit.py of VainF/Remix-DiT): attributes x_embedder, "
    "t_embedder, y_embedder, pos_embed, blocks (MixedDiTBlocks with norm1, attn (qkv, proj: mixed linears "
    "with weight (K, out, in) and bias (K, out)), norm2, mlp (fc1, act, fc2: mixed), adaLN_modulation), "
    "final_layer, coefficients (nn.Embedding(N, K)), n_timesteps_per_expert and unpatchify"
)


def is_published_remix(model: nn.Module) -> bool:
    """Whether ``model`` looks like the published RemixDiT (what ``accelerate`` dispatches on)."""
    return isinstance(getattr(model, "coefficients", None), nn.Embedding) and hasattr(model, "n_timesteps_per_expert")


def accelerate_published(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Patch a published RemixDiT in place (``switch_dit.accelerate`` calls this).

    Class swap only, as ``switch_dit.dropin`` does for Switch-DiT: the same parameters,
    state-dict keys and outputs (mixing="batch" as published). The fast path mixes each
    mixed layer's K bases once per batch (``mix_bases``) and runs the fused adaLN-Zero
    block ops; the model also accepts one timestep for the whole batch (an int or a 0-d
    tensor), as our models do. Raises ValueError naming what does not fit.
    """
    backend = check_backend(backend)
    _check_published(model)
    for block in model.blocks:
        dropin._patch(block, _AcceleratedMixedBlock, backend)
    dropin._patch(model.final_layer, dropin._AcceleratedFinalLayer, backend)
    dropin._patch(model, _AcceleratedPublishedRemix, backend)
    return model


def _check_published(model: nn.Module) -> None:
    def problem(msg):
        return ValueError(f"accelerate() expects {_PUBLISHED}.\nThis model does not fit: {msg}")

    for name in ("x_embedder", "t_embedder", "y_embedder", "pos_embed", "blocks", "final_layer", "unpatchify"):
        if not hasattr(model, name):
            raise problem(f"it has no attribute {name!r} ({type(model).__name__})")
    if not isinstance(model.blocks, nn.ModuleList) or len(model.blocks) == 0:
        raise problem("blocks must be a non-empty nn.ModuleList")
    N, K = model.coefficients.weight.shape
    if not isinstance(model.n_timesteps_per_expert, int) or model.n_timesteps_per_expert < 1:
        raise problem(f"n_timesteps_per_expert must be a positive int, got {model.n_timesteps_per_expert!r}")
    D = model.pos_embed.shape[-1]
    for i, block in enumerate(model.blocks):
        for name in ("norm1", "norm2", "adaLN_modulation", "attn", "mlp"):
            if not isinstance(getattr(block, name, None), nn.Module):
                raise problem(f"blocks[{i}] has no submodule {name!r}")
        for norm in (block.norm1, block.norm2):
            if not isinstance(norm, nn.LayerNorm) or norm.elementwise_affine or tuple(norm.normalized_shape) != (D,):
                raise problem(f"blocks[{i}] norms must be nn.LayerNorm({D}, elementwise_affine=False)")
        for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            layer = block.get_submodule(path)
            w, b = getattr(layer, "weight", None), getattr(layer, "bias", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != K:
                raise problem(
                    f"blocks[{i}].{path}.weight must be (K={K}, out, in), got "
                    f"{tuple(w.shape) if isinstance(w, torch.Tensor) else w!r}"
                )
            if b is not None and tuple(b.shape) != (K, w.shape[1]):
                raise problem(f"blocks[{i}].{path}.bias must be (K={K}, {w.shape[1]}), got {tuple(b.shape)}")
        if not hasattr(block.attn, "num_heads"):
            raise problem(f"blocks[{i}].attn must have num_heads")


class _AcceleratedPublishedRemix(_Patched):
    """forward(x, t, y) of the published RemixDiT; t may also be one timestep for the batch."""

    accepts_shared_timestep = True

    def forward(self, x, t, y):
        per = self.n_timesteps_per_expert
        if isinstance(t, int):
            t = shared_timestep(t, per * self.coefficients.num_embeddings, x)
        check_index(
            t.reshape(-1),
            per * self.coefficients.num_embeddings,
            "t (timesteps)",
            batch=None if t.dim() == 0 else x.shape[0],
        )
        logits = self.coefficients(torch.div(t, per, rounding_mode="floor"))
        coeffs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
        if t.dim() == 0:
            t_emb = self.t_embedder(t.reshape(1)).expand(x.shape[0], -1)
        else:
            coeffs = coeffs.mean(0)
            t_emb = self.t_embedder(t)
        h = self.x_embedder(x) + self.pos_embed
        c = t_emb + self.y_embedder(y, self.training)
        for block in self.blocks:
            h = block(h, c, coeffs)
        return self.unpatchify(self.final_layer(h, c))


class _AcceleratedMixedBlock(_Patched):
    """forward(x, c, coeffs) of the published MixedDiTBlock through the fused block ops, each
    mixed layer's bases mixed once (``mix_bases``)."""

    def forward(self, x, c, coeffs):
        backend = self._switch_dit_backend
        if runs_reference(backend, x):
            return super().forward(x, c, coeffs)  # the published code itself
        attn, mlp = self.attn, self.mlp

        def run_attn(h):
            B, L, D = h.shape
            qkv = mixed_linear_shared(h, attn.qkv.weight, attn.qkv.bias, coeffs, True)
            q, k, v = qkv.reshape(B, L, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
            q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
            drop = getattr(attn, "attn_drop", None)
            p = drop.p if drop is not None and self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(B, L, D)
            out = mixed_linear_shared(out, attn.proj.weight, attn.proj.bias, coeffs, True)
            return getattr(attn, "proj_drop", nn.Identity())(out)

        def run_mlp(h):
            h = mlp.act(mixed_linear_shared(h, mlp.fc1.weight, mlp.fc1.bias, coeffs, True))
            h = getattr(mlp, "norm", nn.Identity())(getattr(mlp, "drop1", nn.Identity())(h))
            h = mixed_linear_shared(h, mlp.fc2.weight, mlp.fc2.bias, coeffs, True)
            return getattr(mlp, "drop2", nn.Identity())(h)

        return adaln_zero_block(
            x, c, None, self.adaLN_modulation, run_attn, run_mlp, eps=self.norm1.eps, backend=backend
        )


for _mixin in (_AcceleratedPublishedRemix, _AcceleratedMixedBlock):
    _mixin._switch_dit_mixin = _mixin
