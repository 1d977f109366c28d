"""Drop-in: ``switch_dit.accelerate(model)`` runs a model built by the public reference code on our fast path.

For users of the public Switch-DiT implementation (byeongjun-park/Switch-DiT, its
``models/DiT/models.py`` and ``train.py``). One call, after the model is built and before
``torch.compile``::

    model = create_model(model_config=cfg.models, routing_config=cfg.routing)
    switch_dit.accelerate(model)            # in place; returns the model
    ema = deepcopy(model)                   # the EMA copy is accelerated too
    model = DDP(model.to(device), ...)      # wrapping later is fine

What changes: the *classes* of the model object, of its blocks and of its final layer are
swapped, in place, for subclasses whose ``forward`` runs the fused ops. No parameter,
buffer or submodule is added, replaced or renamed, so the parameters are the same tensor
objects (optimizers, EMA updates, DDP wrappers built before or after keep working) and
the state dict keys are unchanged. ``isinstance`` checks against the reference classes
still hold; ``deepcopy`` and ``pickle`` give accelerated copies.

Reference semantics kept:
  - forward(x, t, y) -> out in eval mode; (out, w_JSD * L_dp) in training mode for
    routing "DMoE", (out, 0) for the other routings (as the reference returns them).
  - The embedders, attention, MLP and unpatchify run the model's own modules and code;
    label dropout draws the same random numbers as the reference.
  - SMoE: the gate is softmax(f_gate(e_t)) over the M experts of each block, top-k, the
    gate weights are the top-k probabilities themselves (*not renormalised*), and
    m = 1 + sum_j g_j (x W_j + b_j) with experts.w stored (M, D_in, D_out) (docs/design.md §1).
  - The block: r = x * m; r += g_a attn(mod(LN r)); r += g_m mlp(mod(LN r)); out = r + (1-m) x,
    computed as out = x + a + f (identical up to rounding, docs/design.md §2.2). DTR's mask is
    each router's ``_unit_mapping[t]``.
  - L_dp = JSD(p_tot(t_b) / N || matched w_prior[t_b] / (k N)), averaged over the batch,
    through the model's own ``prior.compute_JSD_loss`` and ``prior._unit_mapping``.

Other methods of the model (``forward_with_cfg``, ``unpatchify``, ``initialize_weights``)
are the reference's, unchanged; ``forward_with_cfg`` runs the patched forward. Under
``torch.compile`` the eval forward traces as one graph; in training the prior's
Hungarian solve (host work) is a graph break.

Differences (documented, by design):
  - Routing without host syncs: all N gates are one GEMM, the k expert GEMMs are one
    mixed-weight GEMM; the routers' own ``forward`` is not called (so their hooks do not
    fire, and the attributes the reference sets during forward - ``active_task``,
    ``expert_size``, ``batch_index``, ``batch_gates``, ``active_mask`` - are not updated).
  - Ties in the top-k: the lower expert index wins (the reference's ``torch.topk`` leaves
    the order of equal values unspecified). Exact ties do not occur with trained weights.
  - The gate softmax runs in at least float32 (the reference runs it in the logits' dtype;
    the same under autocast and for float32 models).
  - In eval mode the timestep embedder runs on the batch's t only, not on all T timesteps
    (the reference embeds all T every call): same values up to rounding.
  - The prior's matching (``prior="matched"``, the default): the reference shuffles the
    columns of both binary maps with ``torch.rand`` every step and solves the Hungarian
    assignment on the host (a sync per step). We solve the *unshuffled* cost with the same
    solver (scipy), deterministically and off the critical path
    (``switch_dit.prior.AsyncAssignment``): the assignment lags the activation map by
    exactly one step, on every device (the paper reports the maps settle within ~500
    iterations), and the first call is one synchronous solve. Every optimal assignment has the same matching cost,
    but when several are optimal (ties) the loss value can differ from the one the
    reference's random shuffle picks on that step. ``prior="exact"`` calls the model's
    own ``DiffusionPrior`` instead (random shuffle and a host solve every step, exactly
    the reference's loss for the same random state).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import prior as prior_lib
from . import routing as routing_lib
from ._checks import check_timesteps
from .layers import adaln_zero_block, gate_probs_of_blocks, is_silu_linear, route_top_k
from .models import PRIOR_MODES
from .ops import expert_mask, mask_ln_modulate
from .ops.dispatch import backend_for, check_backend, runs_reference

__all__ = ["accelerate", "PRIOR_MODES"]

_EXPECTED = (
    "a DiT built by the Switch-DiT reference code (models/DiT/models.py): attributes x_embedder, "
    "t_embedder, y_embedder, pos_embed, blocks (DiTBlocks with norm1, attn, norm2, mlp, "
    "adaLN_modulation and forward(x, c, mask)), final_layer, unpatchify and routing_method; with "
    "routing_method 'DMoE' also routers (TaskMoE: f_gate, experts.w (M, D, D), experts.b (M, D), k, "
    "num_experts), prior (DiffusionPrior: _unit_mapping (T, N*M), compute_JSD_loss), the buffer "
    "full_time (T,) and w_JSD; with 'DTR' routers (TaskRouter: _unit_mapping (T, D))"
)


def accelerate(model: nn.Module, *, backend: str = "auto", prior: str = "matched") -> nn.Module:
    """Patch a reference-code Switch-DiT / DTR / DiT in place to run the fused fast path.

    model: the reference implementation's DiT (also inside DistributedDataParallel or
    DataParallel: its ``.module`` is patched). backend: "auto" (the ops choose their strategy
    on CUDA tensors; plain PyTorch on CPU), "reference" (plain PyTorch ops, still without host
    syncs in the routing) or a strategy name of ``switch_dit.ops.strategies`` such as "fused"
    (alias "triton"; CPU tensors need TRITON_INTERPRET=1). prior:
    "matched" (deterministic, sync-free matching) or "exact" (the model's own
    DiffusionPrior, random shuffle, host solve per step); see the module doc.
    Calling it again changes backend / prior. Returns ``model``. A Remix-DiT built by the
    published remix_dit.py is patched by ``switch_dit.remix_dit.accelerate_published``.
    Raises TypeError / ValueError naming what was expected when ``model`` is not such a model.
    """
    backend = check_backend(backend)
    if prior not in PRIOR_MODES:
        raise ValueError(f"prior must be one of {PRIOR_MODES}, got {prior!r}")
    target = _unwrap(model)
    from .remix_dit import accelerate_published, is_published_remix  # late: remix_dit builds on this module

    if is_published_remix(target):  # the published Remix-DiT (switch_dit/remix_dit.py); it has no prior modes
        accelerate_published(target, backend)
        return model
    routing = _check_reference_model(target, prior)
    for block in target.blocks:
        _patch(block, _AcceleratedBlock, backend)
    _patch(target.final_layer, _AcceleratedFinalLayer, backend)
    _patch(target, _AcceleratedDiT, backend)
    target._switch_dit_prior = prior
    target._switch_dit_routing = routing
    if routing == "DMoE":
        # One GEMM for every gate only when each f_gate is the reference's SiLU -> Linear.
        target._switch_dit_one_gate_gemm = all(is_silu_linear(r.f_gate) for r in target.routers)
    return model


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------


def _unwrap(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate() expects {_EXPECTED}; got a {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return _unwrap(model.module)
    if hasattr(model, "_orig_mod"):
        raise TypeError(
            "accelerate() must run before torch.compile: call switch_dit.accelerate(model), then compile it"
        )
    from .models import DiT as OwnDiT
    from .remix_dit import RemixDiT

    if isinstance(model, (OwnDiT, RemixDiT)):
        raise TypeError(
            "this is switch_dit's own DiT, which has the fast path built in: "
            "use model.set_backend(...) instead of accelerate()"
        )
    return model


def _problem(msg: str):
    return ValueError(f"accelerate() expects {_EXPECTED}.\nThis model does not fit: {msg}")


def _linear(module, d_in: int, d_out: int) -> bool:
    return isinstance(module, nn.Linear) and module.in_features == d_in and module.out_features == d_out


def _check_norm(norm, where: str, D: int) -> None:
    if not isinstance(norm, nn.LayerNorm) or norm.elementwise_affine or tuple(norm.normalized_shape) != (D,):
        raise _problem(f"{where} must be nn.LayerNorm({D}, elementwise_affine=False), got {norm!r}")


def _check_reference_model(model: nn.Module, prior: str) -> str:
    for name in (
        "x_embedder",
        "t_embedder",
        "y_embedder",
        "pos_embed",
        "blocks",
        "final_layer",
        "unpatchify",
        "routing_method",
    ):
        if not hasattr(model, name):
            raise _problem(f"it has no attribute {name!r} ({type(model).__name__})")
    blocks = model.blocks
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise _problem("blocks must be a non-empty nn.ModuleList")
    D = model.pos_embed.shape[-1]
    N = len(blocks)
    for i, block in enumerate(blocks):
        for name in ("norm1", "attn", "norm2", "mlp", "adaLN_modulation"):
            if not isinstance(getattr(block, name, None), nn.Module):
                raise _problem(f"blocks[{i}] has no submodule {name!r}")
        _check_norm(block.norm1, f"blocks[{i}].norm1", D)
        _check_norm(block.norm2, f"blocks[{i}].norm2", D)
        if block.norm1.eps != block.norm2.eps:
            raise _problem(f"blocks[{i}].norm1 and norm2 must share eps, got {block.norm1.eps} and {block.norm2.eps}")
        if not (is_silu_linear(block.adaLN_modulation) and _linear(block.adaLN_modulation[1], D, 6 * D)):
            raise _problem(f"blocks[{i}].adaLN_modulation must be Sequential(SiLU, Linear({D}, {6 * D}))")
    fl = model.final_layer
    for name in ("norm_final", "linear", "adaLN_modulation"):
        if not isinstance(getattr(fl, name, None), nn.Module):
            raise _problem(f"final_layer has no submodule {name!r}")
    _check_norm(fl.norm_final, "final_layer.norm_final", D)
    if not (is_silu_linear(fl.adaLN_modulation) and _linear(fl.adaLN_modulation[1], D, 2 * D)):
        raise _problem(f"final_layer.adaLN_modulation must be Sequential(SiLU, Linear({D}, {2 * D}))")

    routing = model.routing_method
    if routing == "DMoE":
        _check_dmoe(model, D, N, prior)
    elif routing == "DTR":
        routers = getattr(model, "routers", None)
        if not isinstance(routers, nn.ModuleList) or len(routers) != N:
            raise _problem(f"routing_method 'DTR' needs routers, an nn.ModuleList of {N} TaskRouters")
        for i, r in enumerate(routers):
            um = getattr(r, "_unit_mapping", None)
            if not isinstance(um, torch.Tensor) or um.dim() != 2 or um.shape[1] != D:
                raise _problem(f"routers[{i}]._unit_mapping must be a (T, {D}) tensor")
    return routing


def _check_dmoe(model: nn.Module, D: int, N: int, prior: str) -> None:
    routers = getattr(model, "routers", None)
    if not isinstance(routers, nn.ModuleList) or len(routers) != N:
        raise _problem(f"routing_method 'DMoE' needs routers, an nn.ModuleList of {N} TaskMoE")
    Ms, ks = set(), set()
    for i, r in enumerate(routers):
        experts = getattr(r, "experts", None)
        w, b = getattr(experts, "w", None), getattr(experts, "b", None)
        if (
            not isinstance(getattr(r, "f_gate", None), nn.Module)
            or not isinstance(w, torch.Tensor)
            or not isinstance(b, torch.Tensor)
        ):
            raise _problem(f"routers[{i}] must have f_gate, experts.w and experts.b")
        M, k = getattr(r, "num_experts", None), getattr(r, "k", None)
        if not isinstance(M, int) or not isinstance(k, int) or not 1 <= k <= M:
            raise _problem(f"routers[{i}] must have integers num_experts = M and 1 <= k <= M, got {M!r}, {k!r}")
        if tuple(w.shape) != (M, D, D) or tuple(b.shape) != (M, D):
            raise _problem(
                f"routers[{i}].experts.w must be (M, D, D) = {(M, D, D)} and experts.b (M, D) = {(M, D)}, "
                f"got {tuple(w.shape)} and {tuple(b.shape)}"
            )
        Ms.add(M)
        ks.add(k)
    if len(Ms) > 1 or len(ks) > 1:
        raise _problem(f"every router must have the same num_experts and k, got {sorted(Ms)} and {sorted(ks)}")
    M = Ms.pop()
    pr = getattr(model, "prior", None)
    um = getattr(pr, "_unit_mapping", None)
    full_time = getattr(model, "full_time", None)
    if (
        not isinstance(pr, nn.Module)
        or not callable(getattr(pr, "compute_JSD_loss", None))
        or not isinstance(um, torch.Tensor)
    ):
        raise _problem("routing_method 'DMoE' needs prior, a DiffusionPrior with _unit_mapping and compute_JSD_loss")
    if not isinstance(full_time, torch.Tensor) or full_time.dim() != 1:
        raise _problem("routing_method 'DMoE' needs the buffer full_time = arange(T)")
    T = full_time.shape[0]
    if tuple(um.shape) != (T, N * M):
        raise _problem(f"prior._unit_mapping must be (T, N*M) = {(T, N * M)}, got {tuple(um.shape)}")
    if getattr(pr, "depth", N) != N:
        raise _problem(f"prior.depth must equal the number of blocks {N}, got {pr.depth}")
    if not isinstance(getattr(model, "w_JSD", None), (int, float, torch.Tensor)):
        raise _problem("routing_method 'DMoE' needs w_JSD, the weight of the prior loss")
    if prior == "exact" and not callable(getattr(pr, "set_active_task", None)):
        raise _problem("prior='exact' needs prior.set_active_task (the reference's DiffusionPrior)")


# ---------------------------------------------------------------------------------------
# Class swapping
# ---------------------------------------------------------------------------------------

_CLASSES: dict[tuple[type, type], type] = {}
_TRANSIENT = ("_switch_dit_matcher",)  # never copied: holds CUDA events and pinned buffers


def _patched_class(original: type, mixin: type) -> type:
    """The subclass (mixin, original), one per pair, so every block shares a class."""
    key = (mixin, original)
    if key not in _CLASSES:
        name = f"Accelerated{original.__name__}"
        _CLASSES[key] = type(
            name, (mixin, original), {"_switch_dit_original": original, "__module__": original.__module__}
        )
    return _CLASSES[key]


def _patch(module: nn.Module, mixin: type, backend: str) -> None:
    if not isinstance(module, mixin):
        module.__class__ = _patched_class(type(module), mixin)
    module._switch_dit_backend = backend


def _rebuild(mixin: type, original: type) -> nn.Module:
    obj = original.__new__(original)
    obj.__class__ = _patched_class(original, mixin)
    return obj


class _Patched:
    """Base of the mixins: copies and pickles as (original class, mixin), so the dynamic
    subclass never has to be importable by name."""

    _switch_dit_original: type
    _switch_dit_mixin: type

    def __reduce_ex__(self, protocol):
        state = {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}
        return (_rebuild, (type(self)._switch_dit_mixin, type(self)._switch_dit_original), state)


class _AcceleratedBlock(_Patched):
    """forward(x, c, mask=None) of the reference DiTBlock, through the fused block ops."""

    def forward(self, x, c, mask=None):
        backend = self._switch_dit_backend
        if runs_reference(backend, x):
            return super().forward(x, c, mask)  # the reference code itself
        return adaln_zero_block(
            x, c, mask, self.adaLN_modulation, self.attn, self.mlp, eps=self.norm1.eps, backend=backend
        )


class _AcceleratedFinalLayer(_Patched):
    """forward(x, c) of the reference FinalLayer with LayerNorm + modulate fused."""

    def forward(self, x, c):
        backend = self._switch_dit_backend
        if runs_reference(backend, x):
            return super().forward(x, c)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        backend = backend_for("mask_ln_modulate", backend)
        return self.linear(mask_ln_modulate(x, None, shift, scale, eps=self.norm_final.eps, backend=backend))


class _AcceleratedDiT(_Patched):
    """forward(x, t, y) of the reference DiT with sync-free routing (see the module doc)."""

    def forward(self, x, t, y):
        routing = self._switch_dit_routing
        dmoe = routing == "DMoE"
        if routing in ("DMoE", "DTR"):
            T = self.full_time.shape[0] if dmoe else self.routers[0]._unit_mapping.shape[0]
            check_timesteps(t, T, batch=x.shape[0])
        t_all = None
        if dmoe and self.training:
            # The prior needs every timestep's gate: embed all T once, the batch gathers rows.
            t_all = self.t_embedder(self.full_time)  # (T, D)
            t_emb = t_all[t]
        else:
            t_emb = self.t_embedder(t)  # (B, D)
        h = self.x_embedder(x) + self.pos_embed  # (B, L, D)
        c = t_emb + self.y_embedder(y, self.training)  # (B, D)
        table = None
        if dmoe:
            if t_all is not None:
                table = self._switch_dit_gate_probs(t_all)  # (T, N, M)
                probs = None  # the batch's rows: table[t], read by the route
            else:
                probs = self._switch_dit_gate_probs(t_emb)  # (B, N, M)
            idx, w, plan = self._switch_dit_route(probs, table, t, h)  # (N, B, k) each; w not renormalised
            for i, (router, block) in enumerate(zip(self.routers, self.blocks)):
                backend = backend_for("expert_mask", self._switch_dit_backend)
                groups = None if plan is None else routing_lib.block_groups(plan, i)
                m = expert_mask(h, router.experts.w, router.experts.b, idx[i], w[i], backend=backend, groups=groups)
                h = block(h, c, m)
        elif routing == "DTR":
            for router, block in zip(self.routers, self.blocks):
                h = block(h, c, router._unit_mapping[t].unsqueeze(1))  # (B, 1, D)
        else:
            for block in self.blocks:
                h = block(h, c, None)
        out = self.unpatchify(self.final_layer(h, c))
        if not self.training:
            return out
        if not dmoe:
            return out, 0
        return out, self.w_JSD * self._switch_dit_prior_loss(table, t)

    def _switch_dit_route(self, probs, table, t, h):
        """Top-k of every block, (N, B, k) indices and weights, and on the fast path the batch's
        routing plan (one launch of the extension's op; "grouped" reads its grouping): from the
        (T, N, M) gate table and the timesteps where training has the table, else from the
        batch's (B, N, M) probabilities, sample b as "timestep" b. The reference path: no plan."""
        k = self.routers[0].k
        if runs_reference(self._switch_dit_backend, h):
            idx, w = route_top_k(table[t] if probs is None else probs, k)  # (B, N, k)
            return idx.transpose(0, 1), w.transpose(0, 1), None
        if table is not None:
            gate, rows = table.transpose(0, 1), t
        else:
            gate, rows = probs.transpose(0, 1), torch.arange(probs.shape[0], device=probs.device)
        plan = routing_lib.plan(gate.contiguous(), rows.long().contiguous(), k, check=False)  # t checked above
        return plan.topk_idx, plan.topk_w, plan

    def _switch_dit_gate_probs(self, t_emb: torch.Tensor) -> torch.Tensor:
        """(R, D) timestep embeddings -> (R, N, M) gate probabilities of every block, >= float32."""
        gates = [router.f_gate for router in self.routers]
        return gate_probs_of_blocks(t_emb, gates, one_gemm=self._switch_dit_one_gate_gemm)

    def _switch_dit_prior_loss(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_dp from the (T, N, M) gate table and the batch's timesteps (B,)."""
        N, k = table.shape[1], self.routers[0].k
        w_gate = prior_lib.activation_map(table, k)  # (T, N*M) 0/1, block-major as the reference
        probs = table.flatten(1)[t]  # (B, N*M)
        if self._switch_dit_prior == "exact":
            self.prior.set_active_task(t)
            return self.prior(probs, w_gate)
        w_prior = self.prior._unit_mapping.to(device=table.device, dtype=torch.float32)
        match = self._switch_dit_matcher_get()(prior_lib.matching_cost(w_gate, w_prior))
        target = w_prior[t][:, match]
        target = target / target.sum(-1, keepdim=True)
        return self.prior.compute_JSD_loss(probs / N, target.to(probs.dtype))

    def _switch_dit_matcher_get(self) -> prior_lib.AsyncAssignment:
        matcher: Optional[prior_lib.AsyncAssignment] = self.__dict__.get("_switch_dit_matcher")
        if matcher is None:
            matcher = self.__dict__["_switch_dit_matcher"] = prior_lib.AsyncAssignment()
        return matcher


for _mixin in (_AcceleratedBlock, _AcceleratedFinalLayer, _AcceleratedDiT):
    _mixin._switch_dit_mixin = _mixin
