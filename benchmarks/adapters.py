"""How the benchmarks reach the fast path, and the plain-PyTorch twins they compare it with.

The fused ops land in ``switch_dit.ops`` / ``switch_dit.routing`` from other issues.
Every lookup is here, so that a renamed op or a changed signature is fixed in one
place. A lookup that fails raises ``Unavailable``; the harness then records the variant
as skipped with the reason instead of stopping.

Assumed signatures (from the issues; adjust here when the ops land):
  ops.expert_mask(x, weight, bias, topk_idx, topk_w, *, backend) -> m (B, L, D)
  ops.mask_ln_modulate(x, m, shift, scale, *, backend) -> modulate(LN(x * m))
  ops.residual_ln_modulate(z, r0, a, gate, shift, scale, *, backend)
      -> (z + gate * a, modulate(LN(r0 + gate * a)))
  routing.plan(gate_probs (N, T, M), timesteps (B,), top_k, *, seq_len) -> RoutingPlan
The "reference" variants call the same ops with backend="reference" (the project's
reference twins); before an op exists they fall back to the local twins below.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F


class Unavailable(Exception):
    """A variant that cannot run here (op not landed yet, no GPU...): recorded as skipped."""


def _lookup(module: str, names: tuple[str, ...]):
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # an import error of a half-landed module is a skip, not a crash
        raise Unavailable(f"{module} not importable: {type(exc).__name__}: {exc}") from None
    for name in names:
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn
    raise Unavailable(f"{module} has none of {', '.join(names)} yet")


def expert_mask(backend: str = "triton"):
    """The routed linear; backend "reference" falls back to the local twin before the op exists."""
    try:
        fn = _lookup("switch_dit.ops", ("expert_mask",))
    except Unavailable:
        if backend == "reference":
            return ref_expert_mask
        raise
    return lambda x, w, b, idx, g: fn(x, w, b, idx, g, backend=backend)


def mask_ln_modulate(backend: str = "triton"):
    try:
        fn = _lookup("switch_dit.ops", ("mask_ln_modulate", "mask_layernorm_modulate", "masked_ln_modulate"))
    except Unavailable:
        if backend == "reference":
            return ref_mask_ln_modulate
        raise
    return lambda x, m, shift, scale: fn(x, m, shift, scale, backend=backend)


def gated_residual_ln_modulate(backend: str = "triton"):
    try:
        fn = _lookup("switch_dit.ops", ("residual_ln_modulate", "gated_residual_ln_modulate"))
    except Unavailable:
        if backend == "reference":
            return ref_gated_residual_ln_modulate
        raise
    return lambda z, r0, a, gate, shift, scale: fn(z, r0, a, gate, shift, scale, backend=backend)


def routing_plan():
    """plan(gate_probs, timesteps, k, L): the tile schedule for L tokens per sample included."""
    fn = _lookup("switch_dit.routing", ("plan",))
    from switch_dit import _extension

    if torch.cuda.is_available() and not (
            _extension.available() and torch._C._dispatch_has_kernel_for_dispatch_key("switch_dit::routing_plan", "CUDA")):
        # Otherwise plan() falls back to its PyTorch twin, and "fast" would time that.
        raise Unavailable(f"switch_dit._C has no CUDA kernel here ({_extension.load_error or 'built CPU-only'})")
    return lambda gate_probs, timesteps, top_k, seq_len: fn(gate_probs, timesteps, top_k, seq_len=seq_len)


def fast_model_path() -> None:
    """Raise Unavailable unless a fused model path can exist (the routed-linear op landed).

    ``models.create(..., backend="triton")`` is accepted before the fast path exists and
    then runs the reference code, which would make "fast" rows silently equal to the
    reference ones; this check keeps them out until the op is there.
    """
    _lookup("switch_dit.ops", ("expert_mask",))


# ----------------------------------------------------------- plain PyTorch twins


def ref_expert_mask(x, w, b, idx, g):
    """m = 1 + sum_j g_j (x @ W[idx_j] + b[idx_j]), one gathered bmm per slot."""
    m = 1.0
    for j in range(idx.shape[1]):
        m = m + g[:, j, None, None].to(x.dtype) * (torch.bmm(x, w[idx[:, j]]) + b[idx[:, j]][:, None, :])
    return m


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def ref_mask_ln_modulate(x, m, shift, scale):
    """modulate(LN(x * m)), LayerNorm without affine, eps 1e-6 (DiT's block input)."""
    r = x * m
    return modulate(F.layer_norm(r, (r.shape[-1],), eps=1e-6), shift, scale)


def ref_gated_residual_ln_modulate(z, r0, a, gate, shift, scale):
    """(z + gate * a, modulate(LN(r0 + gate * a))): DESIGN.md §2b, the residual stream and
    the MLP branch input after the attention branch."""
    ga = gate.unsqueeze(1) * a
    h = r0 + ga
    return z + ga, modulate(F.layer_norm(h, (h.shape[-1],), eps=1e-6), shift, scale)


def ref_routing(gate_probs: torch.Tensor, timesteps: torch.Tensor, top_k: int, seq_len: int = 0):
    """What the reference model does per step: every block's top-k of its gate rows."""
    from switch_dit.prior import topk_indices

    out = []
    for probs in gate_probs:  # (T, M) per block
        rows = probs[timesteps]
        idx = topk_indices(rows, top_k)
        out.append((idx, rows.gather(-1, idx)))
    return out


def official_routing(gate_probs: torch.Tensor, timesteps: torch.Tensor, top_k: int, seq_len: int = 0):
    """What the official code does per step: per block top-k, then the grouping by expert
    (``nonzero``, sort, counts) that syncs with the host."""
    from .official import group_by_expert

    out = []
    for probs in gate_probs:
        w, idx = probs[timesteps].topk(top_k, dim=1)
        out.append(group_by_expert(idx, w, probs.shape[-1]))
    return out
