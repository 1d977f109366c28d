"""DiffMoE: a DiT whose MLPs (every other block) are expert-choice MoE layers over the batch.

Semantics are the public code's (KwaiVGI/DiffMoE ``models/models_DiffMoE.py``; docs/design.md
§6). Build with ``models.create("DiffMoE-S/2", num_experts=16, capacity=1.0)``.

``ExpertChoiceMoE`` (a block's MLP; E experts, each D -> 4D -> D with tanh GELU):
  gate        scores = softmax(x @ gate_weight^T) over experts, per token; x is the pool of all
              S = B * L tokens of the (local) batch.
  training    every expert takes its top C = int(S / E * capacity) tokens by score; a token's
              output is the sum over the experts that chose it of score * expert(token).
  predictor   Linear(D, D), SiLU, Linear(D, E) on x.detach(); its loss BCEWithLogits(pred,
              chosen) trains it to predict the choices (``aux_loss``).
  thresholds  buffer ``expert_threshold`` (E,): in training an EMA (``ema_decay`` 0.95) of each
              expert's C-th largest sigmoid(pred), then averaged over the ranks of the process
              group (no host sync: the all-reduce is queued on the device stream).
  evaluation  k_e = #{tokens: sigmoid(pred[:, e]) > threshold[e]}; expert e then takes the top
              k_e tokens *by gate score*, not the tokens above its threshold (the public code's
              rule, kept exactly). k_e stays on the device on the fast path.
The other blocks are plain DiT blocks; the block around the MoE is DiT's adaLN-Zero block.

Objective: "flow" (rectified flow, float t in [0, 1], ``switch_dit.flow``; the published recipe)
or "diffusion" (int64 t in [0, T), ``switch_dit.diffusion``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_labels, check_timesteps
from .flow import check_flow_time
from .layers import DiTBlock, FinalLayer, Mlp
from .models import DiT, add_embedders, guided_forward, init_embedders_and_outputs, init_linear
from .ops.dispatch import check_backend
from .ops.expert_mlp import STRATEGIES, expert_mlp

__all__ = ["ExpertChoiceMoE", "DiffMoE", "SIZES", "capacity_at"]

# name -> (hidden size, depth, heads). S's 16 heads are the published recipe's
# (config/000_DiffMoE_S_E16_Flow.yaml); B, L and XL keep DiT's counts. num_heads= overrides.
SIZES = {"S": (384, 12, 16), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def capacity_at(step: int, capacity: float, num_experts: int, stage_1: int, stage_2: int) -> float:
    """The public capacity schedule: E up to ``stage_1`` iterations, then linear down to
    ``capacity`` at ``stage_2``, then ``capacity``."""
    if step <= stage_1:
        return float(num_experts)
    if step <= stage_2:
        return capacity + (num_experts - capacity) * (stage_2 - step) / (stage_2 - stage_1)
    return capacity


class ExpertChoiceMoE(nn.Module):
    """The MoE MLP of a DiffMoE block: (B, L, D) -> (B, L, D) (module doc).

    Expert weights are stacked: fc1_weight (E, H, D), fc1_bias (E, H), fc2_weight (E, D, H),
    fc2_bias (E, D) (``switch_dit.interop`` maps them to the public per-expert keys).
    ``strategy`` picks the expert computation (``switch_dit.ops.expert_mlp``): "reference" runs
    the public code's loops (host syncs at evaluation); "auto" is "bmm" in training and
    "grouped" at evaluation, both free of host syncs, or "reference" in a model whose backend
    is "reference"; "fused" runs the Triton kernels, forward and backward (chosen by name: the
    model's "auto" keeps the cuBLAS strategies until a GPU run has checked the kernels).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int = 16,
        capacity: float = 1.0,
        mlp_ratio: float = 4.0,
        shared_expert: bool = False,
        strategy: str = "auto",
    ):
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not capacity > 0:
            raise ValueError(f"capacity must be > 0, got {capacity!r}")
        self.num_experts, self.capacity = num_experts, float(capacity)
        self.strategy = _check_strategy(strategy)
        self.backend = "auto"  # the model's backend (DiffMoE.set_backend): "reference" runs the public loops
        D, H, E = hidden_size, int(hidden_size * mlp_ratio), num_experts
        self.gate_weight = nn.Parameter(torch.empty(E, D))
        self.fc1_weight = nn.Parameter(torch.empty(E, H, D))
        self.fc1_bias = nn.Parameter(torch.zeros(E, H))
        self.fc2_weight = nn.Parameter(torch.empty(E, D, H))
        self.fc2_bias = nn.Parameter(torch.zeros(E, D))
        self.capacity_predictor = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, E))
        self.shared_experts = Mlp(D, 2 * H) if shared_expert else None
        self.register_buffer("expert_threshold", torch.zeros(E))
        self.register_buffer("ema_decay", torch.tensor([0.95]))
        self.process_group: Optional[dist.ProcessGroup] = None
        self._aux: Optional[torch.Tensor] = None
        self.last_tokens: Optional[torch.Tensor] = None  # evaluation: tokens processed (device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The public initialisation: gate normal(0.006); xavier-uniform linears, zero biases."""
        nn.init.normal_(self.gate_weight, std=0.006)
        for w in (self.fc1_weight, self.fc2_weight):
            bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
            nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.fc1_bias)
        nn.init.zeros_(self.fc2_bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "expert_threshold"
        got = state_dict.get(key)
        if got is not None and tuple(got.shape) != (self.num_experts,):
            raise ValueError(
                f"{key} has shape {tuple(got.shape)}, this layer has {self.num_experts} experts "
                f"(expected ({self.num_experts},))"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def tokens_per_expert(self, num_tokens: int) -> int:
        """C = int(S / E * capacity) for a pool of S tokens; raises when it is 0 or E > S."""
        E = self.num_experts
        if E > num_tokens:
            raise ValueError(f"num_experts = {E} exceeds the pool of S = B * L = {num_tokens} tokens")
        C = int(num_tokens / E * self.capacity)
        if C < 1:
            raise ValueError(
                f"capacity {self.capacity} gives C = int(S / E * capacity) = 0 tokens per expert "
                f"(S = {num_tokens}, E = {E})"
            )
        return min(C, num_tokens)

    def aux_loss(self) -> torch.Tensor:
        """BCEWithLogits(pred, choices) of the last training forward (unweighted)."""
        if self._aux is None:
            raise RuntimeError("aux_loss() needs a training-mode forward first")
        return self._aux

    def _weights(self):
        return self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias

    def _strategy(self, training: bool) -> str:
        if self.strategy != "auto":
            return self.strategy
        if self.backend == "reference":  # the model's reference path is the public loop throughout
            return "reference"
        return "bmm" if training else "grouped"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        flat = x.reshape(B * L, D)
        pred = self.capacity_predictor(flat.detach())  # (S, E)
        scores = F.linear(flat, self.gate_weight).softmax(dim=-1).t()  # (E, S)
        if self.training:
            y = self._forward_train(flat, scores, pred)
        else:
            y = self._forward_eval(flat, scores, pred)
        y = y.view(B, L, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def _forward_train(self, flat, scores, pred):
        S, E = flat.shape[0], self.num_experts
        C = self.tokens_per_expert(S)
        gating, index = torch.topk(scores, k=C, dim=-1, sorted=False)  # (E, C)
        chosen = torch.zeros(E, S, dtype=pred.dtype, device=flat.device).scatter_(1, index, 1.0)
        self._aux = F.binary_cross_entropy_with_logits(pred, chosen.t())
        self._update_threshold(pred.detach(), C)
        return expert_mlp(flat, index, gating, *self._weights(), backend=self._strategy(True))

    # Outside torch.compile's graph (one break per MoE layer): an in-place buffer update followed
    # by a collective is traced differently across torch releases; eagerly it is always right.
    @torch.compiler.disable
    @torch.no_grad()
    def _update_threshold(self, pred: torch.Tensor, C: int) -> None:
        quantile = torch.topk(torch.sigmoid(pred).t(), k=C, dim=-1).values[:, -1]  # (E,) C-th largest
        thr = self.expert_threshold
        decay = self.ema_decay.to(thr.dtype)
        thr.copy_(thr * decay + (1 - decay) * quantile.to(thr.dtype))
        group = self.process_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(thr, op=dist.ReduceOp.SUM, group=group)
            thr.div_(dist.get_world_size(group))

    def _forward_eval(self, flat, scores, pred):
        S = flat.shape[0]
        above = torch.sigmoid(pred).t() > self.expert_threshold.unsqueeze(1)  # (E, S)
        k = above.sum(1)  # (E,) on the device
        self.last_tokens = k.sum()
        strategy = self._strategy(False)
        if strategy == "reference":
            return self._eval_reference(flat, scores, k)
        # Rank the pool per expert by gate score; expert e keeps its first k_e (= its top k_e).
        gating, index = torch.sort(scores, dim=-1, descending=True, stable=True)
        valid = torch.arange(S, device=flat.device) < k.unsqueeze(1)
        return expert_mlp(flat, index, gating, *self._weights(), valid=valid, backend=strategy)

    def _eval_reference(self, flat, scores, k):
        """The public evaluation loop: one topk of host size k_e per expert (host syncs)."""
        y = torch.zeros_like(flat)
        w1, b1, w2, b2 = self._weights()
        for e in range(self.num_experts):
            gating, index = torch.topk(scores[e], k=int(k[e]), dim=-1, sorted=False)
            h = F.gelu(F.linear(flat[index], w1[e], b1[e]), approximate="tanh")
            y[index, :] += gating.unsqueeze(-1) * F.linear(h, w2[e], b2[e])
        return y


def _check_strategy(strategy: str) -> str:
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be 'auto' or one of {STRATEGIES}, got {strategy!r}")
    return strategy


class DiffMoE(nn.Module):
    """DiffMoE model: forward(x (B, C, H, W), t (B,), y (B,)) -> (B, C_out, H, W).

    t is float in [0, 1] for objective "flow", int64 in [0, num_timesteps) for "diffusion".
    After a training-mode forward, ``aux_loss()`` is the weighted capacity-predictor loss, the
    public ``cp_loss``: capacity_loss_weight * sum over MoE layers of BCEWithLogits.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        num_experts: int = 16,
        capacity: float = 1.0,
        interleave: bool = True,
        shared_expert: bool = False,
        capacity_loss_weight: float = 1.0,
        capacity_schedule: Optional[Sequence[int]] = None,
        objective: str = "flow",
        num_timesteps: int = 1000,
        backend: str = "auto",
        strategy: str = "auto",
    ):
        super().__init__()
        if objective not in ("flow", "diffusion"):
            raise ValueError(f"objective must be 'flow' or 'diffusion', got {objective!r}")
        if hidden_size % 4 or hidden_size % num_heads:
            raise ValueError(f"hidden_size must be a multiple of 4 and of num_heads={num_heads}, got {hidden_size}")
        if capacity_schedule is not None:
            if len(capacity_schedule) != 2 or not 0 <= capacity_schedule[0] < capacity_schedule[1]:
                raise ValueError(
                    f"capacity_schedule must be (stage_1_iters, stage_2_iters) with "
                    f"0 <= stage_1 < stage_2, got {capacity_schedule!r}"
                )
        self.objective = objective
        self.backend = check_backend(backend)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size, self.patch_size = input_size, patch_size
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes, self.num_timesteps = num_classes, num_timesteps
        self.num_experts, self.capacity, self.interleave = num_experts, float(capacity), interleave
        self.capacity_loss_weight = capacity_loss_weight
        self.capacity_schedule = tuple(capacity_schedule) if capacity_schedule is not None else None
        self.training_iters = -1  # the step of the capacity schedule: the trainer sets it before each step

        add_embedders(self, input_size, patch_size, in_channels, hidden_size, num_classes, class_dropout_prob)
        self.moe_blocks = [i for i in range(depth) if (i % 2 == 1 or not interleave)]
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, backend) for _ in range(depth)])
        for i in self.moe_blocks:
            self.blocks[i].mlp = ExpertChoiceMoE(hidden_size, num_experts, capacity, mlp_ratio, shared_expert, strategy)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, backend)
        self.set_backend(backend)
        self.initialize_weights()

    routing = "diffmoe"  # the family tag other modules read (Switch-DiT's is "switch")
    prior_matcher = None  # no diffusion prior (Switch-DiT's matcher state has no DiffMoE twin)

    def moe_layers(self) -> list[ExpertChoiceMoE]:
        return [self.blocks[i].mlp for i in self.moe_blocks]

    def set_process_group(self, group: Optional[dist.ProcessGroup]) -> "DiffMoE":
        """The group whose ranks average the thresholds (None: the default group)."""
        for layer in self.moe_layers():
            layer.process_group = group
        return self

    def set_strategy(self, strategy: str) -> "DiffMoE":
        for layer in self.moe_layers():
            layer.strategy = _check_strategy(strategy)
        return self

    def set_backend(self, backend: str) -> "DiffMoE":
        self.backend = check_backend(backend)
        for module in self.modules():
            if isinstance(module, (DiTBlock, FinalLayer, ExpertChoiceMoE)):
                module.backend = self.backend
        return self

    def initialize_weights(self) -> None:
        """DiT's initialisation (xavier on the linears, experts included; see ``models``)."""
        self.apply(init_linear)
        init_embedders_and_outputs(self)

    unpatchify = DiT.unpatchify  # (B, L, p*p*C) -> (B, C, H, W), DiT's layout

    def _check_inputs(self, x, t, y) -> None:
        want = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if self.objective == "flow":
            # Closed at 1: Heun's last correction evaluates the model at t = 1 (switch_dit.flow).
            check_flow_time(t, x.shape[0], closed=True)
        else:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                raise ValueError(
                    f"t must be int64 timesteps for a model with objective='diffusion', got {t.dtype} "
                    "(float flow times need objective='flow')"
                )
            check_timesteps(t, self.num_timesteps, batch=x.shape[0])
        check_labels(y, self.y_embedder.embedding_table.num_embeddings, batch=x.shape[0])

    def _apply_capacity_schedule(self) -> None:
        if self.training and self.capacity_schedule is not None:
            cap = capacity_at(self.training_iters, self.capacity, self.num_experts, *self.capacity_schedule)
            for layer in self.moe_layers():
                layer.capacity = cap

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x, t, y)
        self._apply_capacity_schedule()
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def aux_loss(self) -> torch.Tensor:
        """capacity_loss_weight * sum over MoE layers of their BCE (after a training forward)."""
        return self.capacity_loss_weight * sum(layer.aux_loss() for layer in self.moe_layers())

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """DiT-style guidance on a doubled batch (Gaussian diffusion sampling): guides the first
        in_channels. The pool then holds both halves, which changes the eval token choice
        relative to two separate passes (``switch_dit.flow.sample`` runs two passes)."""
        return guided_forward(self, x, t, y, cfg_scale, self.in_channels)
