"""Building blocks of DiT, DTR and Switch-DiT as public ``nn.Module``s (docs/design.md §1).

For users who write their own DiT-like model. Module and parameter names follow the
public reference implementation (``models/DiT/models.py``), so state dicts line up.
Modules hold parameters and call ``switch_dit.ops``; no computation is written twice here.

  embedders   PatchEmbed, TimestepEmbedder, LabelEmbedder, get_2d_sincos_pos_embed
  routing     TimestepRouter (gate + Experts): the timestep-routed SMoE giving m or
              (m, x * m); gate_probs_of_blocks and route_top_k (the gates of N blocks, top-k),
              shared by our models and the drop-in; dtr_mask_table (DTR's fixed channel masks)
  block       DiTBlock: adaLN-Zero, dense (mask=None) or masked (Switch-DiT: m from a
              TimestepRouter; DTR: a (B, 1, D) 0/1 mask); Attention and Mlp (timm layout)
  adaLN       adaln_zero_block (the block as a function), FinalLayer

``backend`` (modules that call ops: TimestepRouter, DiTBlock, FinalLayer, and
adaln_zero_block): "reference" runs the model as written, in plain PyTorch (the ops'
reference twins, ``ops.reference_block``); "auto" (or None) does so on CPU tensors and
otherwise lets each op choose its strategy; any other name (``switch_dit.ops.strategies``)
goes to every op that has that strategy ("fused", alias "triton": the Triton kernels, all
ops), and the others choose their own ("bmm" runs the routed ops as "bmm", the norm ops by
"auto"; ``ops.dispatch.backend_for``).
The embedders have no fused variant (a conv, two small linears, a table lookup) and take
no backend.

Example (a Switch-DiT block of one's own model; t_emb (B, D) timestep embedding,
c (B, D) conditioning, z (B, L, D) tokens):

    router = TimestepRouter(D, num_experts=3, top_k=2, backend="auto")
    block = DiTBlock(D, num_heads=6, backend="auto")
    idx, w = router.route(router.gate_probs(t_emb))
    z = block(z, c, router(z, idx, w))
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import prior as prior_lib
from .ops import expert_mask, expert_mask_and_apply, fused_block, mask_ln_modulate, reference_block
from .ops.dispatch import backend_for, check_backend, runs_reference
from .routing import ExpertGroups

__all__ = [
    "PatchEmbed",
    "TimestepEmbedder",
    "LabelEmbedder",
    "get_2d_sincos_pos_embed",
    "Experts",
    "TimestepRouter",
    "dtr_mask_table",
    "Attention",
    "Mlp",
    "DiTBlock",
    "FinalLayer",
    "adaln_zero_block",
    "gate_probs_of_blocks",
    "route_top_k",
    "is_silu_linear",
]

LN_EPS = 1e-6  # DiT's LayerNorms: no affine, eps 1e-6


#################################################################################
#                        adaLN-Zero block (function)                            #
#################################################################################


def adaln_zero_block(
    x: torch.Tensor,
    c: torch.Tensor,
    mask: Optional[torch.Tensor],
    adaLN_modulation: Callable[[torch.Tensor], torch.Tensor],
    attn: Callable[[torch.Tensor], torch.Tensor],
    mlp: Callable[[torch.Tensor], torch.Tensor],
    *,
    eps: float = LN_EPS,
    backend: str = "auto",
) -> torch.Tensor:
    """The adaLN-Zero block as a function of its parts (what DiTBlock.forward runs).

    x (B, L, D) tokens, c (B, D) conditioning, mask (B, L, D), (B, 1, D) or None;
    adaLN_modulation: c -> (B, 6D) (shift, scale, gate of attention, then of the MLP);
    attn, mlp: (B, L, D) -> (B, L, D). With a mask m (Switch-DiT, DTR):
        r = x * m; r = r + g_a * attn(mod(LN(r))); r = r + g_m * mlp(mod(LN(r)));
        out = r + (1 - m) * x.
    The reference path is ``ops.reference_block``; otherwise ``ops.fused_block`` computes the
    same as out = x + a + f (docs/design.md §2.2): the mask only shapes the branch inputs and
    (1 - m) * x is never formed.
    """
    ada = adaLN_modulation(c).chunk(6, dim=1)
    if runs_reference(backend, x):
        return reference_block(x, mask, ada, attn, mlp, eps)
    return fused_block(x, mask, ada, attn, mlp, eps=eps, backend=backend_for("mask_ln_modulate", backend))


#################################################################################
#                               Embedders                                       #
#################################################################################


class PatchEmbed(nn.Module):
    """Images (B, C, H, W) -> tokens (B, H*W / p^2, D) by a conv with kernel = stride = p."""

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
    """Labels (B,) int64 -> (B, D); the extra last row is the null class used by guidance.

    In training (``train=True``) each label is replaced by the null class with
    probability ``dropout_prob``; ``force_drop_ids`` (B,) drops where it equals 1.
    """

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


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) MAE-style 2-D sin-cos position embedding (fixed, not trained)."""
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
#                       Routing: SMoE (Switch-DiT) and DTR                      #
#################################################################################


class Experts(nn.Module):
    """M linear maps D_in -> D_out: ``w`` (M, D_in, D_out) stored (in, out) as the reference
    does, ``b`` (M, D_out). Zero at init, so that m = 1 and Switch-DiT starts as DiT."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(num_experts, in_features, out_features))
        self.b = nn.Parameter(torch.zeros(num_experts, out_features))


def is_silu_linear(gate: nn.Module) -> bool:
    """Whether a gate is SiLU -> Linear (ours and the reference's ``f_gate``): then the gates of
    all blocks can run as one GEMM."""
    return (
        isinstance(gate, nn.Sequential)
        and len(gate) == 2
        and isinstance(gate[0], nn.SiLU)
        and isinstance(gate[1], nn.Linear)
    )


def gate_probs_of_blocks(t_emb: torch.Tensor, gates: Sequence[nn.Module], *, one_gemm: bool) -> torch.Tensor:
    """Gate probabilities of N blocks: t_emb (R, D) -> (R, N, M) softmax, at least float32.

    ``gates``: each block's gate module, (R, D) -> (R, M) logits. With ``one_gemm`` (every gate
    SiLU -> Linear, see ``is_silu_linear``) the N linears run as one GEMM over their concatenated
    weights, since they read the same input (docs/design.md §2.4); else each gate runs itself.
    The softmax runs in at least float32 (the reference runs it in the logits' dtype).
    """
    if one_gemm:
        linears = [gate[1] for gate in gates]
        weight = torch.cat([lin.weight for lin in linears])  # (N*M, D)
        bias = None if any(lin.bias is None for lin in linears) else torch.cat([lin.bias for lin in linears])
        logits = F.linear(F.silu(t_emb), weight, bias).unflatten(-1, (len(gates), -1))
    else:
        logits = torch.stack([gate(t_emb) for gate in gates], dim=-2)
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def route_top_k(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., M) gate probabilities -> top-k expert indices (..., k) int64 (ties to the lower index)
    and their weights (..., k): the probabilities themselves, not renormalised (docs/design.md §1.2)."""
    idx = prior_lib.topk_indices(probs, top_k)
    return idx, probs.gather(-1, idx)


class TimestepRouter(nn.Module):
    """The timestep-routed SMoE layer in front of one Switch-DiT block.

    gate: SiLU -> Linear(D, M) on the *timestep* embedding, softmax, top-k; the weights are
    the top-k probabilities themselves (not renormalised), ties go to the lower index.
    mask: m(z) = 1 + sum_j g_j (z @ W_j + b_j), the same g for every token of a sample.

    Use: ``idx, w = router.route(router.gate_probs(t_emb))``, then ``router(z, idx, w)``
    for m, or ``router.mask_and_apply(z, idx, w)`` for (m, z * m) in one pass. A model that
    has the batch's routing plan passes the block's grouping too (``groups=``, see
    ``switch_dit.routing.block_groups``), which the "grouped" strategy reads.
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
        return gate_probs_of_blocks(t_emb, [self.f_gate], one_gemm=False)[:, 0]

    def route(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M) -> top-k expert indices (B, k) int64 and weights (B, k), ties to the lower index."""
        return route_top_k(probs, self.top_k)

    def forward(
        self, z: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, groups: ExpertGroups | None = None
    ) -> torch.Tensor:
        """m(z): z (B, L, D), topk_idx (B, k) int, topk_w (B, k) float -> m (B, L, D) in z's dtype."""
        backend = backend_for("expert_mask", self.backend)
        return expert_mask(z, self.experts.w, self.experts.b, topk_idx, topk_w, backend=backend, groups=groups)

    def mask_and_apply(
        self, z: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, groups: ExpertGroups | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, z * m), both (B, L, D), in one pass on the fused path; arguments as forward."""
        backend = backend_for("expert_mask_and_apply", self.backend)
        w, b = self.experts.w, self.experts.b
        return expert_mask_and_apply(z, w, b, topk_idx, topk_w, backend=backend, groups=groups)


def dtr_mask_table(num_timesteps: int, hidden_size: int, alpha: float = 4.0, beta: float = 0.8) -> torch.Tensor:
    """DTR's channel mask for every timestep: (T, D) float32 0/1, the same in every block.

    Row t holds floor(D * beta) ones starting at round((t / (T-1))**alpha * (D - floor(D * beta))).
    A block's mask for a batch is ``table[t].unsqueeze(1)`` (B, 1, D).
    """
    return prior_lib.window_table(num_timesteps, hidden_size, beta, alpha)


#################################################################################
#                                 DiT block                                     #
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
        """(B, L, D) -> (B, L, D)."""
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear: (B, L, D) -> (B, L, D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block, dense or masked (see ``adaln_zero_block``).

    forward(x (B, L, D), c (B, D), mask=None) -> (B, L, D). The Switch-DiT block and the
    DTR block are this block with a mask: m (B, L, D) from a TimestepRouter, or DTR's
    (B, 1, D) 0/1 mask. backend "reference" (and "auto" on CPU tensors) runs it as written;
    any other through the fused block ops, each op with that strategy (or its own "auto" choice).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return adaln_zero_block(
            x, c, mask, self.adaLN_modulation, self.attn, self.mlp, eps=self.norm1.eps, backend=self.backend
        )


class FinalLayer(nn.Module):
    """LayerNorm, adaLN modulate, Linear(D, p*p*C_out): (B, L, D), c (B, D) -> (B, L, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        backend = backend_for("mask_ln_modulate", self.backend)
        return self.linear(mask_ln_modulate(x, None, shift, scale, eps=self.norm_final.eps, backend=backend))
