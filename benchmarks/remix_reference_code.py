"""A stand-in of the public Remix-DiT code (VainF/Remix-DiT ``remix_dit.py``), own code.

Written to its module names, shapes and semantics: ``MixedLinear`` (an nn.Linear whose
weight is (K, out, in) and bias (K, out), mixed by coefficients (K,) before F.linear),
``MixedAttention`` / ``MixedMlp`` / ``MixedDiTBlock(x, c, coeffs)``, the plain
``FinalLayer``, ``coefficients = nn.Embedding(N, K)``, the ``prior`` kept as a plain
attribute, expert id ``t // n_timesteps_per_expert`` and the batch mean of the softmaxes.
It does not import switch_dit. Users: tests/test_remix_dit.py (the oracle of
``switch_dit.accelerate`` on such a model) and benchmarks comparing against the
published code. The public repository is not a dependency.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.reference_code import FinalLayer, LabelEmbedder, PatchEmbed, RefDiT, TimestepEmbedder, ref_modulate

__all__ = ["MixedLinear", "MixedAttention", "MixedMlp", "MixedDiTBlock", "PublishedRemixDiT"]


class MixedLinear(nn.Linear):
    """nn.Linear(in, K * out) whose parameters are reshaped to (K, out, in) and (K, out)."""

    def __init__(self, in_features, out_features, bias=True, n_basis=4):
        super().__init__(in_features, n_basis * out_features, bias)
        self.n_basis = n_basis
        self.weight = nn.Parameter(self.weight.detach().reshape(n_basis, out_features, in_features).clone())
        self.bias = nn.Parameter(self.bias.detach().reshape(n_basis, out_features).clone())

    def forward(self, x, coeffs):
        w = (coeffs[:, None, None] * self.weight).sum(0)
        b = (coeffs[:, None] * self.bias).sum(0)
        return F.linear(x, w, b)


class MixedAttention(nn.Module):
    def __init__(self, dim, num_heads, n_basis):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = MixedLinear(dim, 3 * dim, bias=True, n_basis=n_basis)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = MixedLinear(dim, dim, n_basis=n_basis)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, coeffs):
        B, L, D = x.shape
        q, k, v = self.qkv(x, coeffs).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, D), coeffs))


class MixedMlp(nn.Module):
    def __init__(self, dim, hidden, n_basis):
        super().__init__()
        self.fc1 = MixedLinear(dim, hidden, n_basis=n_basis)
        self.act = nn.GELU(approximate="tanh")
        self.drop1, self.norm, self.drop2 = nn.Dropout(0.0), nn.Identity(), nn.Dropout(0.0)
        self.fc2 = MixedLinear(hidden, dim, n_basis=n_basis)

    def forward(self, x, coeffs):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x, coeffs)))), coeffs))


class MixedDiTBlock(nn.Module):
    def __init__(self, hidden, num_heads, mlp_ratio=4.0, n_basis=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = MixedAttention(hidden, num_heads, n_basis)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = MixedMlp(hidden, int(hidden * mlp_ratio), n_basis)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c, coeffs):
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + ga.unsqueeze(1) * self.attn(ref_modulate(self.norm1(x), sa, ca), coeffs=coeffs)
        return x + gm.unsqueeze(1) * self.mlp(ref_modulate(self.norm2(x), sm, cm), coeffs=coeffs)


class PublishedRemixDiT(nn.Module):
    """forward(x, t (B,), y) with one mixed model per batch, as published."""

    def __init__(
        self,
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=64,
        depth=2,
        num_heads=2,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=10,
        learn_sigma=True,
        n_basis=4,
        n_experts=8,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size, self.num_heads = patch_size, num_heads
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([MixedDiTBlock(hidden_size, num_heads, mlp_ratio, n_basis) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.n_experts, self.n_basis = n_experts, n_basis
        self.n_timesteps_per_expert = 1000 // n_experts
        self.coefficients = nn.Embedding(n_experts, n_basis)
        self.prior = torch.eye(n_basis).repeat_interleave(n_experts // n_basis, 0)

    def get_prior_loss(self):
        return F.cross_entropy(
            self.coefficients.weight, self.prior.argmax(1).to(self.coefficients.weight.device), reduction="none"
        )

    unpatchify = RefDiT.unpatchify  # the published DiT's, which Remix-DiT's code repeats

    def forward(self, x, t, y):
        coeffs = torch.softmax(self.coefficients(t // self.n_timesteps_per_expert), -1).mean(0)
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c, coeffs)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
