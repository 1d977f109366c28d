"""DiT, DTR and Switch-DiT: the reference models (DESIGN.md §1).

One class, ``DiT``, covers the three families; ``routing`` picks the block input:
  "none"   plain DiT (Peebles & Xie)
  "dtr"    a fixed binary channel mask per timestep (Park et al., DTR)
  "switch" a timestep-gated sparse mixture of experts in front of every block (Switch-DiT)

Module and parameter names follow the public reference implementation, so its state
dicts map onto ours with few renames (see ``switch_dit.interop``).

Build models with ``create("Switch-DiT-S/2")``; every name is in ``MODEL_NAMES``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import prior as prior_lib
from ._checks import check_backend, check_labels, check_timesteps
from .ops import expert_mask, fused_block

__all__ = ["DiT", "create", "MODEL_NAMES", "count_params", "modulate"]

# name -> (hidden size, depth, heads)
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
FAMILIES = {"DiT": "none", "DTR": "dtr", "Switch-DiT": "switch"}
MODEL_NAMES = [f"{fam}-{size}/{p}" for fam in FAMILIES for size in SIZES for p in (2, 4, 8)]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (B, L, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                           Embedding layers                                    #
#################################################################################


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H*W / p^2, D) by a conv with kernel = stride = p."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Timesteps (B,) -> (B, D): 256-dim sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) -> (B, dim) float32: cos half first, then sin half."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Labels (B,) -> (B, D); the extra last row is the null class used by guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                       Routing: SMoE (Switch-DiT) and DTR                      #
#################################################################################


class Experts(nn.Module):
    """M linear maps D_in -> D_out, weights stored (M, D_in, D_out) as the reference does."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(num_experts, in_features, out_features))
        self.b = nn.Parameter(torch.zeros(num_experts, out_features))


class TimestepRouter(nn.Module):
    """The SMoE layer of one Switch-DiT block.

    gate: SiLU -> Linear(D, M) on the *timestep* embedding, softmax, top-k (the weights
    are the top-k probabilities themselves, not renormalised).
    mask: m(z) = 1 + sum_j g_j (z @ W_j + b_j), the same g for every token of a sample.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        if num_experts < 2:
            raise ValueError(f"num_experts must be >= 2, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.f_gate = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_experts, bias=True))
        self.experts = Experts(num_experts, hidden_size, hidden_size)

    def gate_probs(self, t_emb: torch.Tensor) -> torch.Tensor:
        """(B, D) timestep embeddings -> (B, M) softmax probabilities, at least float32."""
        logits = self.f_gate(t_emb)
        return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)

    def route(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M) -> top-k expert indices (B, k) int64 and weights (B, k), ties to the lower index."""
        idx = prior_lib.topk_indices(probs, self.top_k)
        return idx, probs.gather(-1, idx)

    def forward(self, z: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """m(z): z (B, L, D), topk_idx / topk_w (B, k) -> (B, L, D)."""
        return expert_mask(z, self.experts.w, self.experts.b, topk_idx, topk_w, backend=self.backend)


def dtr_mask_table(num_timesteps: int, hidden_size: int, alpha: float = 4.0, beta: float = 0.8) -> torch.Tensor:
    """DTR's channel mask for every timestep: (T, D) float32 0/1, the same in every block."""
    return prior_lib.window_table(num_timesteps, hidden_size, beta, alpha)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias (timm's layout: one qkv linear, one proj)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block. With a mask m (Switch-DiT, DTR), the branches see
    r = z * m and the skip z * (1 - m) is added at the end.

    backend "reference" runs the block as written; "triton" (and "auto" on CUDA) runs it
    through the fused ops by identity (b) of DESIGN.md §2: out = z + a + f, the mask only
    shapes the branch inputs, and (1 - m) * z is never formed.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        ada = self.adaLN_modulation(c).chunk(6, dim=1)
        if _use_fused(self.backend, x):
            return fused_block(x, mask, ada, self.attn, self.mlp, backend=self.backend)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada
        r = x if mask is None else x * mask
        r = r + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(r), shift_msa, scale_msa))
        r = r + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(r), shift_mlp, scale_mlp))
        return r if mask is None else r + (1 - mask) * x


class FinalLayer(nn.Module):
    """LayerNorm, adaLN modulate, Linear(D, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer; ``routing`` in {"none", "dtr", "switch"} (see module doc).

    forward(x (B, C, H, W), t (B,) int64 in [0, T), y (B,) int64) -> (B, C_out, H, W),
    C_out = 2C with learned sigma (epsilon first, then the variance interpolation).
    """

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
        routing: str = "none",
        num_experts: int = 3,
        top_k: int = 2,
        num_timesteps: int = 1000,
        dtr_alpha: float = 4.0,
        dtr_beta: float = 0.8,
        backend: str = "auto",
    ):
        super().__init__()
        if routing not in ("none", "dtr", "switch"):
            raise ValueError(f"routing must be 'none', 'dtr' or 'switch', got {routing!r}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        if hidden_size % 4 or hidden_size % num_heads:
            raise ValueError(f"hidden_size must be a multiple of 4 (2-D sin-cos embedding) and of num_heads={num_heads}, got {hidden_size}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.routing = routing
        self.backend = check_backend(backend)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_classes = num_classes
        self.num_timesteps = num_timesteps
        self.num_experts = num_experts if routing == "switch" else 0
        self.top_k = top_k if routing == "switch" else 0

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        class_dropout_prob = 0.0 if num_classes == 1 else class_dropout_prob
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos embedding, saved in the state dict as the reference does.
        self.register_buffer("pos_embed", torch.zeros(1, self.x_embedder.num_patches, hidden_size))

        if routing == "switch":
            self.routers = nn.ModuleList([TimestepRouter(hidden_size, num_experts, top_k, backend) for _ in range(depth)])
            self._matcher = prior_lib.AsyncAssignment()
            self.register_buffer("w_prior", prior_lib.prior_table(num_timesteps, depth, num_experts, top_k), persistent=False)
        elif routing == "dtr":
            self.register_buffer("dtr_mask", dtr_mask_table(num_timesteps, hidden_size, dtr_alpha, dtr_beta), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, backend) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def set_backend(self, backend: str) -> "DiT":
        """Switch every block and router to ``backend`` ("auto", "reference" or "triton")."""
        self.backend = check_backend(backend)
        for module in self.modules():
            if isinstance(module, (DiTBlock, TimestepRouter)):
                module.backend = self.backend
        return self

    def initialize_weights(self) -> None:
        """DiT's initialisation; experts zero, so that m = 1 and Switch-DiT starts as DiT."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.hidden_size, self.x_embedder.grid_size)
        self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.routing == "switch":
            for router in self.routers:
                nn.init.zeros_(router.experts.w)
                nn.init.zeros_(router.experts.b)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        c, p, h = self.out_channels, self.patch_size, self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        want = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        check_timesteps(t, self.num_timesteps, batch=x.shape[0])
        check_labels(y, self.y_embedder.embedding_table.num_embeddings, batch=x.shape[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x, t, y)
        t_emb = self.t_embedder(t)  # (B, D)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, L, D)
        c = t_emb + self.y_embedder(y, self.training)  # (B, D)
        if self.routing == "switch":
            topk_idx, topk_w = self.route(t_emb)  # (N, B, k) each
            for i, (router, block) in enumerate(zip(self.routers, self.blocks)):
                h = block(h, c, router(h, topk_idx[i], topk_w[i]))
        elif self.routing == "dtr":
            mask = self.dtr_mask[t].unsqueeze(1).to(h.dtype)  # (B, 1, D)
            for block in self.blocks:
                h = block(h, c, mask)
        else:
            for block in self.blocks:
                h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries the null label.

        Guidance is applied to the epsilon channels (the first ``in_channels``); the
        guided half is duplicated into both halves, as DiT does.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def gate_probs(self, t_emb: torch.Tensor) -> torch.Tensor:
        """Gate probabilities of every block: (B, D) timestep embeddings -> (B, N, M), at least float32.

        The reference path runs each block's gate; the fused path runs all N gate linears
        as one GEMM (they read the same input).
        """
        if self.routing != "switch":
            raise ValueError(f"gate probabilities need a Switch-DiT model, this one has routing={self.routing!r}")
        if not _use_fused(self.backend, t_emb):
            return torch.stack([router.gate_probs(t_emb) for router in self.routers], dim=1)
        weight = torch.cat([r.f_gate[1].weight for r in self.routers])  # (N*M, D)
        bias = torch.cat([r.f_gate[1].bias for r in self.routers])
        logits = F.linear(F.silu(t_emb), weight, bias).unflatten(-1, (self.depth, self.num_experts))
        return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)

    def route(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts of every block for a batch: (N, B, k) int64 indices and (N, B, k) weights."""
        probs = self.gate_probs(t_emb).transpose(0, 1)  # (N, B, M)
        idx = prior_lib.topk_indices(probs, self.top_k)
        return idx, probs.gather(-1, idx)

    def gate_table(self) -> torch.Tensor:
        """Gate probabilities of every block for every timestep: (T, N, M), at least float32."""
        t_all = torch.arange(self.num_timesteps, device=self.pos_embed.device)
        return self.gate_probs(self.t_embedder(t_all))

    def prior_loss(self, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion prior loss L_dp for a batch's timesteps (B,); a zero scalar for DiT and DTR."""
        if self.routing != "switch":
            return torch.zeros((), device=self.pos_embed.device)
        check_timesteps(t, self.num_timesteps)
        if _use_fused(self.backend, t):
            # No host sync: the Hungarian matching is solved off the critical path.
            return prior_lib.prior_loss_matched(self.gate_table(), self.w_prior, t, self.top_k, self._matcher)
        return prior_lib.prior_loss(self.gate_table(), self.w_prior, t, self.top_k, generator=generator)


def _use_fused(backend: str, x: torch.Tensor) -> bool:
    """The fused path runs for backend "triton", and for "auto" on CUDA tensors."""
    return backend == "triton" or (backend == "auto" and x.is_cuda)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) MAE-style 2-D sin-cos position embedding."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   Configs                                     #
#################################################################################


def create(
    name: str,
    *,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    num_experts: int = 3,
    top_k: int = 2,
    num_timesteps: int = 1000,
    backend: str = "auto",
    **kwargs,
) -> DiT:
    """Build a model by name, e.g. ``create("Switch-DiT-XL/2")``; names in ``MODEL_NAMES``.

    Extra keyword arguments (hidden_size, depth, num_heads, mlp_ratio, dtr_alpha,
    dtr_beta) override the named size, for small test models.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    fam_size, patch = name.split("/")
    family, size = fam_size.rsplit("-", 1)
    hidden, depth, heads = SIZES[size]
    cfg = dict(hidden_size=hidden, depth=depth, num_heads=heads)
    cfg.update(kwargs)
    return DiT(
        input_size=input_size,
        patch_size=int(patch),
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        routing=FAMILIES[family],
        num_experts=num_experts,
        top_k=top_k,
        num_timesteps=num_timesteps,
        backend=backend,
        **cfg,
    )


def count_params(model: DiT) -> dict[str, int]:
    """Trainable parameters: ``total`` and ``activated`` (what one sample uses: k of the M
    experts of every block), the paper's Table 2 counts the activated ones."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    idle = 0
    if model.routing == "switch":
        for router in model.routers:
            per_expert = router.experts.w[0].numel() + router.experts.b[0].numel()
            idle += (router.num_experts - router.top_k) * per_expert
    return {"total": total, "activated": total - idle}
