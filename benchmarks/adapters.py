"""How the benchmarks reach the ops, their strategies and the plain-PyTorch twins.

Every lookup of ``switch_dit`` is here, so that a renamed op is fixed in one place. A
variant that cannot run here raises ``Unavailable``; the harness records it as skipped
with the reason instead of stopping.

The op sweep times every strategy that ``switch_dit.ops.strategies(op)`` lists (the fused
Triton kernels, the cuBLAS compositions, the reference twin...), each called with
``backend=<strategy>``:
  ops.expert_mask(x, weight, bias, topk_idx, topk_w, *, backend) -> m (B, L, D)
  ops.mask_ln_modulate(x, m, shift, scale, *, backend) -> modulate(LN(x * m))
  ops.residual_ln_modulate(z, r0, a, gate, shift, scale, *, backend)
      -> (z + gate * a, modulate(LN(r0 + gate * a)))
  routing.plan(gate_probs (N, T, M), timesteps (B,), top_k, *, seq_len) -> RoutingPlan
"""

from __future__ import annotations

import torch


class Unavailable(Exception):
    """A variant that cannot run here (no GPU, extension built CPU-only...): recorded as skipped."""


# The strategies every op had before ``switch_dit.ops.strategies`` existed.
LEGACY_STRATEGIES = ("reference", "triton")


def strategies(op: str) -> tuple[str, ...]:
    """The strategy names of an op, as ``switch_dit.ops.strategies`` lists them (``auto`` excluded:
    the sweep times it as its own variant)."""
    from switch_dit import ops

    listed = getattr(ops, "strategies", None)
    names = LEGACY_STRATEGIES if listed is None else tuple(listed(op))
    return tuple(n for n in names if n not in ("auto", None))


def op_fn(op: str, strategy: str):
    """``switch_dit.ops.<op>`` bound to ``backend=strategy``."""
    from switch_dit import ops

    fn = getattr(ops, op)
    return lambda *args: fn(*args, backend=strategy)


def routing_plan():
    """plan(gate_probs, timesteps, k, L): the tile schedule for L tokens per sample included."""
    from switch_dit import _extension, routing

    if torch.cuda.is_available() and not _extension.has_kernel("switch_dit::routing_plan", "cuda"):
        # Otherwise plan() falls back to its PyTorch twin, and "fast" would time that.
        raise Unavailable(f"switch_dit._C has no CUDA kernel here ({_extension.load_error or 'built CPU-only'})")
    return lambda gate_probs, timesteps, top_k, seq_len: routing.plan(gate_probs, timesteps, top_k, seq_len=seq_len)


# ----------------------------------------------------------- plain PyTorch twins


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
