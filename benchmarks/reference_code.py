"""A stand-in of the public Switch-DiT reference implementation, own code.

Written to the reference's module names and semantics (models/DiT/models.py, models/MoE.py,
ParallelExperts, util/model_util.py, models/taskrouting.py): ``TaskMoE`` routers that gate
on the full timestep table and group samples by expert (with the reference's host sync),
``DiTBlock(x, c, mask)``, DTR's ``TaskRouter`` masks, and the ``DiffusionPrior`` with its
random column shuffle. It does not import switch_dit. Two users:
  - tests/test_dropin.py: the oracle that ``switch_dit.accelerate`` is held against;
  - the "patched" training-step benchmark rows: this model after ``switch_dit.accelerate``,
    what a user of the reference code runs.
The reference repository is not a dependency.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = ["RefDiT", "DiTBlock", "DiffusionPrior", "TaskMoE", "TaskRouter", "FinalLayer", "window_mask"]


def ref_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def window_mask(units, tasks, beta, alpha=4.0):
    """(tasks, units) 0/1: int(units*beta) ones from round((t/(tasks-1))**alpha * rest)."""
    width = int(units * beta)
    start = ((np.linspace(0, 1, tasks) ** alpha) * (units - width)).round().astype(np.int64)
    out = torch.zeros(tasks, units)
    for task, s in enumerate(start):
        out[task, s : s + width] = 1.0
    return out


class PatchEmbed(nn.Module):  # timm's layout: proj conv, patch_size as a tuple
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):  # timm's layout; fused attention, as timm uses by default
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class ParallelExperts(nn.Module):
    """M linears, w (M, D_in, D_out); rows arrive grouped by expert, one mm per expert."""

    def __init__(self, num_experts, d_in, d_out):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(num_experts, d_in, d_out))
        self.b = nn.Parameter(torch.zeros(num_experts, d_out))

    def forward(self, rows, expert_size):
        sizes = expert_size.tolist()  # host sync, as the reference
        outs = [torch.mm(r, self.w[e]) + self.b[e] for e, r in enumerate(rows.split(sizes))]
        return torch.cat(outs)


class TaskMoE(nn.Module):
    """The reference router: gate on the full timestep table, samples sorted by expert."""

    def __init__(self, hidden_size, num_experts, k):
        super().__init__()
        self.hidden_size, self.num_experts, self.k = hidden_size, num_experts, k
        self.f_gate = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_experts, bias=True))
        self.experts = ParallelExperts(num_experts, hidden_size, hidden_size)
        self.active_task = 0

    def set_active_task(self, active_task):
        self.active_task = active_task

    def forward(self, x, task_full):
        B, L, D = x.shape
        probs = torch.softmax(self.f_gate(task_full), dim=1)  # (T, M)
        gates, idx = probs.topk(self.k, dim=1)  # not renormalised
        quantized = torch.zeros(task_full.shape[0], self.num_experts, device=x.device).scatter(1, idx, 1)
        a_probs, a_gates, a_idx = probs[self.active_task], gates[self.active_task], idx[self.active_task]
        # group the (sample, slot) pairs by expert
        dense = torch.zeros_like(a_probs).scatter(1, a_idx, a_gates)
        flat_g, flat_e = a_gates.flatten(), a_idx.flatten()
        nz = flat_g.nonzero().squeeze(-1)
        pos = nz[flat_e[nz].sort(0).indices]
        batch_index, batch_gates = pos.div(self.k, rounding_mode="trunc"), flat_g[pos]
        expert_size = (dense > 0).long().sum(0)
        out = self.experts(x[batch_index].reshape(-1, D), expert_size * L).view(-1, L, D) * batch_gates[:, None, None]
        out = torch.zeros(x.shape, dtype=out.dtype, device=x.device).index_add(0, batch_index, out)
        return 1 + out, a_probs, quantized


class TaskRouter(nn.Module):  # DTR
    def __init__(self, unit_count, taskcount, alpha, beta):
        super().__init__()
        self.active_task = 0
        self.register_buffer("_unit_mapping", window_mask(unit_count, taskcount, beta, alpha))

    def set_active_task(self, active_task):
        self.active_task = active_task
        self.active_mask = self._unit_mapping[active_task].unsqueeze(1)


class DiffusionPrior(nn.Module):
    shuffle = True  # the reference always shuffles; tests switch it off for a deterministic prior

    def __init__(self, taskcount, depth, k, num_experts):
        super().__init__()
        self.depth = depth
        self.register_buffer("_unit_mapping", window_mask(depth * num_experts, taskcount, k / num_experts))
        self.active_task = 0

    def set_active_task(self, active_task):
        self.active_task = active_task
        self.active_mask = self._unit_mapping[active_task]

    def compute_JSD_loss(self, x1, x2, epsilon=1e-6):
        mid = (x1 + x2) / 2
        kl1 = (x1 * (torch.log(x1 + epsilon) - torch.log(mid + epsilon))).sum(1)
        kl2 = (x2 * (torch.log(x2 + epsilon) - torch.log(mid + epsilon))).sum(1)
        return ((kl1 + kl2) / 2).mean()

    def forward(self, probs, probs_full_quantized):
        U = probs.size(-1)
        if self.shuffle:
            g, p = torch.rand(U).argsort(), torch.rand(U).argsort()
        else:
            g = p = torch.arange(U)
        a, b = probs_full_quantized[:, g], self._unit_mapping[:, p]
        cost = (a[:, :, None] - b[:, None]).abs().sum(0)
        match = torch.as_tensor(linear_sum_assignment(cost.detach().cpu())[1], dtype=torch.int64)
        target = self.active_mask[:, p][:, match]
        return self.compute_JSD_loss(probs[:, g] / self.depth, target / self.active_mask.sum(1, keepdim=True))


class DiTBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden, bias=True))

    def forward(self, x, c, mask=None):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        if mask is not None:
            r = x * mask
            r = r + g1.unsqueeze(1) * self.attn(ref_modulate(self.norm1(r), s1, sc1))
            r = r + g2.unsqueeze(1) * self.mlp(ref_modulate(self.norm2(r), s2, sc2))
            return r + (1 - mask) * x
        x = x + g1.unsqueeze(1) * self.attn(ref_modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(ref_modulate(self.norm2(x), s2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ref_modulate(self.norm_final(x), shift, scale))


class RefDiT(nn.Module):
    """The reference DiT's forward; routing_method "DMoE" (Switch-DiT), "DTR" or another name (plain)."""

    def __init__(
        self,
        routing_method,
        input_size=6,
        patch_size=2,
        in_channels=3,
        hidden_size=40,
        depth=2,
        num_heads=2,
        num_classes=5,
        taskcount=50,
        num_experts=3,
        k=2,
        w_JSD=1.0,
        alpha=4.0,
        beta=0.8,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, 2 * in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, 0.1)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.routing_method = routing_method
        if routing_method == "DMoE":
            self.w_JSD = w_JSD
            self.register_buffer("full_time", torch.arange(taskcount))
            self.prior = DiffusionPrior(taskcount, depth, k, num_experts)
            self.routers = nn.ModuleList([TaskMoE(hidden_size, num_experts, k) for _ in range(depth)])
        elif routing_method == "DTR":
            self.routers = nn.ModuleList([TaskRouter(hidden_size, taskcount, alpha, beta) for _ in range(depth)])
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, h, p, p, c))
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y):
        for m in self.modules():  # the reference's self.apply(_change_task)
            if hasattr(m, "active_task"):
                m.set_active_task(t)
        dmoe = self.routing_method == "DMoE"
        if dmoe:
            full_time = self.t_embedder(self.full_time)
            t_emb = full_time[t]
            probs_list, quantized_list = [], []
        else:
            t_emb = self.t_embedder(t)
        x = self.x_embedder(x) + self.pos_embed
        c = t_emb + self.y_embedder(y, self.training)
        for i, block in enumerate(self.blocks):
            if dmoe:
                mask, probs, quantized = self.routers[i](x, full_time)
                probs_list.append(probs)
                quantized_list.append(quantized)
            elif self.routing_method == "DTR":
                mask = self.routers[i].active_mask
            else:
                mask = None
            x = block(x, c, mask)
        x = self.unpatchify(self.final_layer(x, c))
        if self.training:
            aux = self.w_JSD * self.prior(torch.cat(probs_list, 1), torch.cat(quantized_list, 1)) if dmoe else 0
            return x, aux
        return x

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond, uncond = torch.split(eps, len(eps) // 2)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
