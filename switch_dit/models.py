"""DiT, DTR and Switch-DiT: the reference models (docs/design.md §1).

One class, ``DiT``, covers the three families; ``routing`` picks the block input:
  "none"   plain DiT (Peebles & Xie)
  "dtr"    a fixed binary channel mask per timestep (Park et al., DTR)
  "switch" a timestep-gated sparse mixture of experts in front of every block (Switch-DiT)

Module and parameter names follow the public reference implementation, so its state
dicts map onto ours with few renames (see ``switch_dit.interop``).

Build models with ``create("Switch-DiT-S/2")``; every name is in ``MODEL_NAMES``. The
building blocks (embedders, SMoE router, block, final layer) live in ``switch_dit.layers``
and are re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import prior as prior_lib
from . import routing as routing_lib
from ._checks import check_labels, check_timesteps
from .flow import check_flow_time, index_times, timestep_index
from .layers import (  # noqa: F401  the building blocks stay importable from here
    Attention,
    DiTBlock,
    Experts,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    TimestepRouter,
    _1d_sincos,
    dtr_mask_table,
    gate_probs_of_blocks,
    get_2d_sincos_pos_embed,
    route_top_k,
)
from .ops.dispatch import check_backend, runs_reference
from .ops.shared_mix import shared_expert_mask

__all__ = ["DiT", "create", "MODEL_NAMES", "count_params", "PRIOR_MODES"]

# name -> (hidden size, depth, heads)
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
FAMILIES = {"DiT": "none", "DTR": "dtr", "Switch-DiT": "switch"}
MODEL_NAMES = [f"{fam}-{size}/{p}" for fam in FAMILIES for size in SIZES for p in (2, 4, 8)]
MODEL_NAMES += [f"Remix-DiT-{size}/{p}" for size in SIZES for p in (2, 4, 8)]  # built by switch_dit.remix_dit
MODEL_NAMES += [f"DiffMoE-{size}/{p}" for size in SIZES for p in (2, 4, 8)]  # built by switch_dit.diffmoe
# How Switch-DiT's prior loss matches w_gate to w_prior (docs/design.md §1.4):
#   "matched"  the assignment solved off the critical path, one step behind, no host sync
#              (prior.AsyncAssignment); the default, on every backend;
#   "exact"    the reference's way: columns shuffled at random, a host solve every step.
PRIOR_MODES = ("matched", "exact")


class DiT(nn.Module):
    """Diffusion transformer; ``routing`` in {"none", "dtr", "switch"} (see module doc).

    forward(x (B, C, H, W), t (B,) int64 in [0, T), y (B,) int64) -> (B, C_out, H, W),
    C_out = 2C with learned sigma (epsilon first, then the variance interpolation).
    t may also be one timestep for the whole batch (a Python int or a 0-d tensor). With
    ``objective="flow"`` t is a float flow time in [0, 1] instead ((B,) or 0-d; switch_dit.flow).
    ``backend``: see ``switch_dit.layers``; ``prior``: Switch-DiT's prior matching, ``PRIOR_MODES``.
    """

    # The samplers of switch_dit.diffusion pass one 0-d timestep per step to models that say so.
    accepts_shared_timestep = True

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
        prior: str = "matched",
        objective: str = "diffusion",
    ):
        super().__init__()
        if objective not in ("diffusion", "flow"):
            raise ValueError(f"objective must be 'diffusion' or 'flow', got {objective!r}")
        if prior not in PRIOR_MODES:
            raise ValueError(f"prior must be one of {PRIOR_MODES}, got {prior!r}")
        if routing not in ("none", "dtr", "switch"):
            raise ValueError(f"routing must be 'none', 'dtr' or 'switch', got {routing!r}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        if hidden_size % 4 or hidden_size % num_heads:
            raise ValueError(
                f"hidden_size must be a multiple of 4 (2-D sin-cos embedding) and of num_heads={num_heads}, "
                f"got {hidden_size}"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.routing = routing
        self.objective = objective
        self.backend = check_backend(backend)
        self.prior_mode = prior
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

        add_embedders(self, input_size, patch_size, in_channels, hidden_size, num_classes, class_dropout_prob)

        if routing == "switch":
            self.routers = nn.ModuleList(
                [TimestepRouter(hidden_size, num_experts, top_k, backend) for _ in range(depth)]
            )
            self._matcher = prior_lib.AsyncAssignment()
            self.register_buffer(
                "w_prior", prior_lib.prior_table(num_timesteps, depth, num_experts, top_k), persistent=False
            )
        elif routing == "dtr":
            self.register_buffer(
                "dtr_mask", dtr_mask_table(num_timesteps, hidden_size, dtr_alpha, dtr_beta), persistent=False
            )
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, backend) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, backend)
        self.initialize_weights()

    def __getstate__(self) -> dict:
        # The matcher may hold a CUDA event and pinned buffers, which cannot be copied:
        # deepcopy (EMA) and pickle give the copy a fresh matcher instead.
        state = self.__dict__.copy()
        if "_matcher" in state:
            state["_matcher"] = prior_lib.AsyncAssignment()
        return state

    @property
    def prior_matcher(self) -> prior_lib.AsyncAssignment | None:
        """The fast path's assignment for the prior loss (Switch-DiT only, else None); its
        ``state_dict()`` belongs in training checkpoints for an exact resume."""
        return self.__dict__.get("_matcher")

    def set_backend(self, backend: str) -> "DiT":
        """Switch every block, router and the final layer to ``backend`` ("auto", "reference" or a strategy name)."""
        self.backend = check_backend(backend)
        for module in self.modules():
            if isinstance(module, (DiTBlock, TimestepRouter, FinalLayer)):
                module.backend = self.backend
        return self

    def initialize_weights(self) -> None:
        """DiT's initialisation; experts zero, so that m = 1 and Switch-DiT starts as DiT."""
        self.apply(init_linear)
        init_embedders_and_outputs(self)
        if self.routing == "switch":
            for router in self.routers:
                nn.init.zeros_(router.experts.w)
                nn.init.zeros_(router.experts.b)

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
        if self.objective == "flow":  # float flow times (switch_dit.flow); 1 is Heun's last point
            check_flow_time(
                t.reshape(1) if isinstance(t, torch.Tensor) and t.dim() == 0 else t,
                None if isinstance(t, torch.Tensor) and t.dim() == 0 else x.shape[0],
                closed=True,
            )
        elif isinstance(t, torch.Tensor) and t.dim() == 0:  # one timestep for the batch
            check_timesteps(t.reshape(1), self.num_timesteps)
        else:
            check_timesteps(t, self.num_timesteps, batch=x.shape[0])
        check_labels(y, self.y_embedder.embedding_table.num_embeddings, batch=x.shape[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), y (B,) labels; t (B,) timesteps, or one timestep for the whole batch
        (a Python int or a 0-d tensor, as in sampling): then the timestep is embedded once, and a
        Switch-DiT block mixes its k experts once and runs one dense GEMM (ops.shared_mix).
        Under torch.compile or CUDA-graph capture pass a 0-d tensor: an int is a constant of the
        graph (one recompilation per timestep)."""
        if isinstance(t, int):
            t = shared_timestep(t, self.num_timesteps, x)
        self._check_inputs(x, t, y)
        shared = t.dim() == 0
        t_emb = self.t_embedder(t.reshape(1) if shared else t)  # (B, D), or (1, D) when shared
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, L, D)
        c = t_emb + self.y_embedder(y, self.training)  # (B, D)
        # Each block runs its own adaLN linear. One GEMM for all N would need their (6D, D)
        # weights concatenated every step: for XL/2 an extra 446 MB copy in bf16 (~0.3 ms on
        # an H100) to save 27 launches of ~10 us, and nothing at all under CUDA graphs. The
        # gates are different: N * M rows in all, so they do run as one GEMM (gate_probs).
        if self.routing == "switch":
            if shared:
                topk_idx, topk_w = self.route(t_emb)  # (N, 1, k) each
                plan = None
            else:
                topk_idx, topk_w, plan = self.route_batch(t_emb)  # (N, B, k) each
            for i, (router, block) in enumerate(zip(self.routers, self.blocks)):
                if shared:
                    experts = router.experts
                    m = shared_expert_mask(h, experts.w, experts.b, topk_idx[i, 0], topk_w[i, 0])
                else:
                    groups = None if plan is None else routing_lib.block_groups(plan, i)
                    m = router(h, topk_idx[i], topk_w[i], groups)
                h = block(h, c, m)
        elif self.routing == "dtr":
            steps = self.timestep_index(t.expand(x.shape[0]) if shared else t)
            mask = self.dtr_mask[steps].unsqueeze(1).to(h.dtype)  # (B, 1, D)
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
        return guided_forward(self, x, t, y, cfg_scale, self.in_channels)

    def gate_probs(self, t_emb: torch.Tensor) -> torch.Tensor:
        """Gate probabilities of every block: (B, D) timestep embeddings -> (B, N, M), at least float32.

        The reference path runs each block's gate; the fused path runs all N gate linears
        as one GEMM (they read the same input).
        """
        if self.routing != "switch":
            raise ValueError(f"gate probabilities need a Switch-DiT model, this one has routing={self.routing!r}")
        gates = [router.f_gate for router in self.routers]
        return gate_probs_of_blocks(t_emb, gates, one_gemm=not runs_reference(self.backend, t_emb))

    def route(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts of every block for a batch: (N, B, k) int64 indices and (N, B, k) weights."""
        return route_top_k(self.gate_probs(t_emb).transpose(0, 1), self.top_k)  # from (N, B, M)

    def route_batch(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, routing_lib.RoutingPlan | None]:
        """``route`` plus, on the fast path, the batch's routing plan (docs/design.md §3): every
        block's top-k and its (sample, slot) pairs grouped by expert, in one launch of the
        extension's op (``switch_dit.routing.plan``) that the "grouped" strategy reads. The plan
        takes the (N, B, M) probabilities as its gate table with "timestep" b for sample b, so its
        top-k is ``route``'s (ties to the lower index) and its weights are differentiable. The
        reference path has no plan: (idx, w, None)."""
        if runs_reference(self.backend, t_emb):
            return (*self.route(t_emb), None)
        probs = self.gate_probs(t_emb).transpose(0, 1).contiguous()  # (N, B, M)
        samples = torch.arange(probs.shape[1], device=probs.device)
        plan = routing_lib.plan(probs, samples, self.top_k, check=False)  # in range by construction
        return plan.topk_idx, plan.topk_w, plan

    def timestep_index(self, t: torch.Tensor) -> torch.Tensor:
        """The integer timesteps that index DTR's masks and Switch-DiT's prior: t itself, or for a
        flow model the step of the same role (``switch_dit.flow.timestep_index``)."""
        return timestep_index(t, self.num_timesteps) if self.objective == "flow" else t

    def gate_table(self) -> torch.Tensor:
        """Gate probabilities of every block for every timestep: (T, N, M), at least float32.
        A flow model's row i is its gate at the flow time of step i (``switch_dit.flow.index_times``)."""
        dev = self.pos_embed.device
        if self.objective == "flow":
            t_all = index_times(self.num_timesteps, dev)
        else:
            t_all = torch.arange(self.num_timesteps, device=dev)
        return self.gate_probs(self.t_embedder(t_all))

    def prior_loss(self, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion prior loss L_dp for a batch's timesteps (B,) (a flow model's: its float flow
        times, read at ``timestep_index``); a zero scalar for DiT and DTR."""
        if self.routing != "switch":
            return torch.zeros((), device=self.pos_embed.device)
        if self.objective == "flow":  # float flow times: the prior's rows are integer timesteps
            check_flow_time(t, closed=True)
            t = timestep_index(t, self.num_timesteps)
        check_timesteps(t, self.num_timesteps)
        if self.prior_mode == "matched":
            # No host sync: the Hungarian matching is solved off the critical path.
            return prior_lib.prior_loss_matched(self.gate_table(), self.w_prior, t, self.top_k, self._matcher)
        return prior_lib.prior_loss(self.gate_table(), self.w_prior, t, self.top_k, generator=generator)


#################################################################################
#          What every family shares: DiT, DTR, Switch-DiT, Remix-DiT, DiffMoE     #
#################################################################################


def add_embedders(
    model: nn.Module,
    input_size: int,
    patch_size: int,
    in_channels: int,
    hidden_size: int,
    num_classes: int,
    class_dropout_prob: float,
) -> None:
    """Give ``model`` DiT's embedders, under DiT's names (state-dict keys): ``x_embedder``,
    ``t_embedder``, ``y_embedder`` (no label dropout with one class) and the ``pos_embed``
    buffer (1, L, D), filled by ``init_embedders_and_outputs``."""
    model.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
    model.t_embedder = TimestepEmbedder(hidden_size)
    class_dropout_prob = 0.0 if num_classes == 1 else class_dropout_prob
    model.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
    # Fixed sin-cos embedding, saved in the state dict as the reference does.
    model.register_buffer("pos_embed", torch.zeros(1, model.x_embedder.num_patches, hidden_size))


def init_linear(module: nn.Module) -> None:
    """DiT's ``_basic_init``, for ``model.apply``: xavier_uniform_ weight and zero bias of an nn.Linear."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


def init_embedders_and_outputs(model: nn.Module) -> None:
    """DiT's initialisation after xavier on the linears: the sin-cos ``pos_embed``, the patch
    embedding as a linear, N(0, 0.02) label and timestep embeddings, and zero adaLN and final
    linears (every block starts as the identity, adaLN-Zero). Draws in DiT's order."""
    pos = get_2d_sincos_pos_embed(model.hidden_size, model.x_embedder.grid_size)
    model.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


def shared_timestep(t: int, num_timesteps: int, x: torch.Tensor) -> torch.Tensor:
    """A Python int timestep -> a 0-d int64 tensor on x's device (a fill, not a host copy)."""
    if isinstance(t, bool) or not 0 <= t < num_timesteps:
        raise ValueError(f"t (timesteps) must be in [0, {num_timesteps}), got {t!r}")
    return torch.full((), t, dtype=torch.int64, device=x.device)


def guided_forward(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, channels: int
) -> torch.Tensor:
    """Classifier-free guidance of ``model`` on a batch whose second half carries the null label.

    x (B, C, H, W) -> (B, C_out, H, W): the first ``channels`` output channels are guided,
    uncond + cfg_scale * (cond - uncond), and the guided half is duplicated into both halves,
    as DiT does; the other channels are the model's own.
    """
    half = x[: len(x) // 2]
    out = model.forward(torch.cat([half, half], dim=0), t, y)
    eps, rest = out[:, :channels], out[:, channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


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
    num_experts: int | None = None,
    top_k: int = 2,
    num_timesteps: int = 1000,
    backend: str = "auto",
    **kwargs,
) -> DiT:
    """Build a model by name, e.g. ``create("Switch-DiT-XL/2")``; names in ``MODEL_NAMES``.

    Extra keyword arguments (hidden_size, depth, num_heads, mlp_ratio, dtr_alpha,
    dtr_beta) override the named size, for small test models; ``prior`` ("matched" or
    "exact", ``PRIOR_MODES``) sets Switch-DiT's prior matching. num_experts defaults to
    3 for Switch-DiT; Remix-DiT names go to ``switch_dit.remix_dit.create`` (num_experts
    20, plus num_basis and mixing; top_k does not apply). DiffMoE names build
    ``switch_dit.diffmoe.DiffMoE`` (num_experts 16, plus capacity, interleave, objective, ...).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if name.startswith("Remix-DiT-"):
        from . import remix_dit  # late: remix_dit builds on this module

        return remix_dit.create(
            name,
            input_size=input_size,
            in_channels=in_channels,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            class_dropout_prob=class_dropout_prob,
            num_experts=num_experts,
            num_timesteps=num_timesteps,
            backend=backend,
            **kwargs,
        )
    fam_size, patch = name.split("/")
    family, size = fam_size.rsplit("-", 1)
    common = dict(
        input_size=input_size,
        patch_size=int(patch),
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        num_timesteps=num_timesteps,
        backend=backend,
    )
    if family == "DiffMoE":
        from . import diffmoe  # late: the MoE model is a separate class

        hidden, depth, heads = diffmoe.SIZES[size]
        cfg = dict(hidden_size=hidden, depth=depth, num_heads=heads)
        cfg.update(kwargs)
        return diffmoe.DiffMoE(num_experts=16 if num_experts is None else num_experts, **common, **cfg)
    hidden, depth, heads = SIZES[size]
    cfg = dict(hidden_size=hidden, depth=depth, num_heads=heads)
    cfg.update(kwargs)
    num_experts = 3 if num_experts is None else num_experts
    return DiT(routing=FAMILIES[family], num_experts=num_experts, top_k=top_k, **common, **cfg)


def count_params(model: DiT) -> dict[str, int]:
    """Trainable parameters: ``total`` and ``activated`` (what one sample uses: k of the M
    experts of every block), the paper's Table 2 counts the activated ones. For DiffMoE,
    activated counts ``capacity`` experts per MoE layer (one at the published capacity 1); for
    Remix-DiT one mixed model (a DiT's parameters and one coefficient row)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    idle = 0
    if model.routing == "diffmoe":  # capacity c: a token passes c of the E experts on average
        for layer in model.moe_layers():
            per_expert = sum(p[0].numel() for p in (layer.fc1_weight, layer.fc1_bias, layer.fc2_weight, layer.fc2_bias))
            idle += round((layer.num_experts - layer.capacity) * per_expert)
    if model.routing == "switch":
        for router in model.routers:
            per_expert = router.experts.w[0].numel() + router.experts.b[0].numel()
            idle += (router.num_experts - router.top_k) * per_expert
    if model.routing == "remix":  # a sample runs one mixed model: one basis' worth, one coefficient row
        K = model.num_basis
        for block in model.blocks:
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                idle += (K - 1) * (layer.weight[0].numel() + layer.bias[0].numel())
        idle += (model.num_experts - 1) * K
    return {"total": total, "activated": total - idle}
