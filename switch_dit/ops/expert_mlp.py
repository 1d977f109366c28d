"""Expert MLPs over chosen tokens (DiffMoE's expert choice), with several strategies.

E experts, each a DiT MLP (D -> H -> D, tanh GELU), weights stacked:
  w1 (E, H, D), b1 (E, H), w2 (E, D, H), b2 (E, D)   (nn.Linear's (out, in) layout per expert)
Expert e processes the tokens ``index[e, :]`` of the pool x (S, D), each output scaled by its
gate score ``gating[e, :]``; a token's output is the sum over the experts that chose it:

  y[s] = sum over (e, c) with index[e, c] = s and valid[e, c] of gating[e, c] * mlp_e(x[s])

``valid`` (E, C) bool, or None for all: in training every expert takes exactly C tokens (fixed
capacity); at evaluation expert e takes its first k_e tokens of a per-expert ranking
(valid[e, c] = c < k_e), with k_e on the device (docs/design.md §6, DiffMoE).
Index rows must not repeat a token within one expert (topk and argsort guarantee it).

Strategies (all compute the same function; autograd flows to x, gating and the weights):
  "reference"  a Python loop over experts, boolean selection (host syncs): the ground truth.
  "bmm"        gather (E, C, D), two batched GEMMs, combine. Every slot is computed, so it fits
               fixed capacity (training); at evaluation it costs C = S rows per expert.
  "grouped"    the valid pairs packed by expert (``switch_dit.grouping``), two grouped GEMMs
               (``torch._grouped_mm``) over the packed rows, combine. Sizes are bounds known on
               the host (E * C rows), the counts stay on the device: no host sync, CUDA-graph
               capturable. Where ``torch._grouped_mm`` cannot run (float64, misaligned
               strides) "bmm" stands in on CUDA, and on the CPU a per-expert loop over the
               same packed rows (host reads).
  "fused"      the Triton kernels of ``switch_dit.kernels.expert_mlp`` over the same packing,
               forward and backward: gathers fused into the GEMMs' loads, bias + GELU (and its
               derivative) and the score scaling in the epilogues, the weight gradients as
               per-expert reductions over the packed rows; launched over the static tile
               schedule of ``group_tokens`` (CUDA-graph capturable), no float atomics.
The combine is deterministic in every strategy (no float atomics): each token gathers its E
candidate rows, zero where an expert did not choose it, and sums them over the experts in
expert order, as the public code's (E*S, D) scatter-and-sum does. The gather of the chosen
tokens has the same sum as its backward (``_GatherRows``): x's gradient sums in a fixed order too.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from switch_dit import grouping
from switch_dit.ops import dispatch
from switch_dit.ops.expert_grouped import native_grouped_mm

__all__ = ["STRATEGIES", "expert_mlp", "expert_mlp_reference", "check_expert_mlp_args"]

Tensor = torch.Tensor
STRATEGIES = ("reference", "bmm", "grouped", "fused")


def check_expert_mlp_args(x, index, gating, valid, w1, b1, w2, b2) -> None:
    """Shapes, dtypes and devices (no tensor values are read)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (S, D), got shape {tuple(x.shape)}")
    S, D = x.shape
    if w1.dim() != 3 or w1.shape[2] != D:
        raise ValueError(f"w1 must be (E, H, D) with D = {D}, got {tuple(w1.shape)}")
    E, H, _ = w1.shape
    want = {"b1": (b1, (E, H)), "w2": (w2, (E, D, H)), "b2": (b2, (E, D))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if index.dim() != 2 or index.shape[0] != E:
        raise ValueError(f"index must be (E, C) with E = {E}, got {tuple(index.shape)}")
    if index.dtype != torch.int64:
        raise ValueError(f"index must be int64, got {index.dtype}")
    if tuple(gating.shape) != tuple(index.shape):
        raise ValueError(f"gating must have the shape of index {tuple(index.shape)}, got {tuple(gating.shape)}")
    if valid is not None and (tuple(valid.shape) != tuple(index.shape) or valid.dtype != torch.bool):
        raise ValueError(
            f"valid must be None or bool of shape {tuple(index.shape)}, got {valid.dtype} {tuple(valid.shape)}"
        )
    if index.shape[1] > S:
        raise ValueError(f"index has C = {index.shape[1]} slots per expert but the pool has only S = {S} tokens")
    for name, t in (("index", index), ("gating", gating), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def expert_mlp_reference(x, index, gating, w1, b1, w2, b2, valid=None) -> Tensor:
    """The plainest form: one expert at a time, as the public code's loop."""
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        idx, g = index[e], gating[e]
        if valid is not None:
            idx, g = idx[valid[e]], g[valid[e]]
        y = y.index_add(0, idx, g.unsqueeze(-1).to(x.dtype) * _mlp(x[idx], w1[e], b1[e], w2[e], b2[e]))
    return y


def _combine(rows: Tensor, slot: Tensor) -> Tensor:
    """rows (R, D) expert outputs; slot (E, S) int64 row of (expert, token) or -1 -> (S, D).

    Gather-and-sum over experts: deterministic, no atomics (the gather's backward is a
    scatter of distinct rows)."""
    padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return padded[torch.where(slot >= 0, slot, rows.shape[0])].sum(0)


class _GatherRows(torch.autograd.Function):
    """x[rows] (R, D), with a backward that sums each token's rows by ``_combine`` (fixed order, no
    atomics) instead of index_put's scatter-add, which uses float atomics on CUDA whenever a token
    was chosen by several experts. slot (E, S): the gathered row of (expert, token), or -1; a row
    missing from slot must get a zero gradient (an unused or invalid row: its score is 0)."""

    @staticmethod
    def forward(ctx, x, rows, slot):
        ctx.save_for_backward(slot)
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (slot,) = ctx.saved_tensors
        return _combine(grad, slot), None, None


def _bmm(x, index, gating, w1, b1, w2, b2, valid=None) -> Tensor:
    E, C = index.shape
    rows = torch.arange(E * C, device=x.device).view(E, C)
    if valid is not None:
        rows = torch.where(valid, rows, -1)
    slot = torch.full((E, x.shape[0]), -1, dtype=torch.int64, device=x.device).scatter_(1, index, rows)
    xg = _GatherRows.apply(x, index.reshape(-1), slot).view(E, C, -1)  # (E, C, D)
    h = F.gelu(torch.baddbmm(b1.unsqueeze(1), xg, w1.transpose(1, 2)), approximate="tanh")
    o = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))  # (E, C, D)
    g = gating if valid is None else torch.where(valid, gating, 0)
    o = o * g.unsqueeze(-1).to(o.dtype)
    return _combine(o.reshape(E * C, -1), slot)


def _native(x: Tensor, w1: Tensor) -> bool:
    """torch._grouped_mm runs both GEMMs (D -> H, H -> D) without a host sync."""
    return native_grouped_mm(x.dtype, x.device, w1.shape[2], w1.shape[1])[0]


def _grouped_linear(a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Rows of a (R, K) packed by group, group g = rows offs[g-1]:offs[g] -> a @ w[g].T (R, N).

    w (G, N, K). Rows past offs[-1] come back as zeros."""
    wt = w.transpose(1, 2)  # (G, K, N), a view: _grouped_mm takes the transposed layout
    if native_grouped_mm(a.dtype, a.device, w.shape[2], w.shape[1])[0]:
        out = torch._grouped_mm(a, wt, offs=offs.to(torch.int32))
        rows = torch.arange(a.shape[0], device=a.device)
        return torch.where((rows < offs[-1]).unsqueeze(-1), out, 0)
    # Fallback: a loop with the group bounds read on the host (float64 tests, odd widths).
    out = a.new_zeros(a.shape[0], w.shape[1])
    bounds = [0] + offs.tolist()
    parts = [a[lo:hi] @ wt[g] for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return torch.cat(parts + [out[bounds[-1] :]]) if parts else out


def _grouped(x, index, gating, w1, b1, w2, b2, valid=None) -> Tensor:
    if x.is_cuda and not _native(x, w1):
        # No sync-free grouped GEMM here: the padded batched GEMMs, still without a host sync.
        return _bmm(x, index, gating, w1, b1, w2, b2, valid)
    E, C = index.shape
    plan = grouping.group_tokens(index, valid)
    tok = plan.tokens.clamp(min=0)  # (E*C,) packed token ids; the unused tail gathers token 0
    used = plan.tokens >= 0
    eid = plan.row_expert.clamp(min=0)  # expert of each packed row
    # The GEMMs leave rows past offsets[E] unwritten, forward and backward: the selects keep
    # them out of every result and gradient (a select drops, where a product would keep, NaN).
    slot = torch.full((E, x.shape[0]), -1, dtype=torch.int64, device=x.device)
    slot = slot.scatter_(1, index, plan.position)  # position is -1 for invalid pairs
    rows_used = used.unsqueeze(-1)
    xs = torch.where(rows_used, _GatherRows.apply(x, tok, slot), 0)
    h = F.gelu(_grouped_linear(xs, w1, plan.offsets[1:]) + b1[eid], approximate="tanh")
    h = torch.where(rows_used, h, 0)
    o = _grouped_linear(h, w2, plan.offsets[1:]) + b2[eid]
    g = torch.where(used, gating.reshape(-1)[plan.pair.clamp(min=0)], 0)
    o = o * g.unsqueeze(-1).to(o.dtype)
    return _combine(o, slot)


def _fused_plan(index: Tensor, valid: Optional[Tensor], gating: Tensor, x: Tensor, kern):
    """The packing, each packed row's gate score (0 past the used rows) and the (E, S) slots."""
    plan = grouping.group_tokens(index, valid, block_m=kern.BLOCK_M)
    used = plan.tokens >= 0
    scale = torch.where(used, gating.reshape(-1)[plan.pair.clamp(min=0)], 0).to(x.dtype)
    slot = torch.full((index.shape[0], x.shape[0]), -1, dtype=torch.int64, device=x.device)
    return plan, used, scale, slot.scatter_(1, index, plan.position)


# The "fused" strategy: the Triton kernels, forward and backward (no float atomics anywhere),
# as two torch.library custom ops with fake kernels, so that torch.compile(fullgraph=True) and
# CUDA graphs see one op each way (as the routed linear's and the norm ops' kernels):
#
#   forward   a = x[tok] w1^T + b1 (kept), h = gelu(a) (kept)      fc1_gelu, gather in the prologue
#             z = h w2^T + b2 (kept), o = gating * z               fc2_scale (unscaled), then one multiply
#             y = sum over experts of o, per token                 _combine (gather and sum)
#   backward  dgating[pair(r)] = <dy[tok r], z_r>                  a row dot
#             da = gating * (dy[tok] w2) * gelu'(a)                fc2_backward (dy[tok] packed once)
#             dw2[e] = sum_r (gating dy[tok])_r^T h_r, db2         weight_grad, the score in the loads
#             dw1[e] = sum_r da_r^T x[tok r], db1                  weight_grad (x[tok] packed)
#             dx = sum over experts of da w1                       fc1_backward, then _combine
#
# Evaluation (``keep`` false) keeps nothing and scales by the gate score in fc2's epilogue.

_KEPT = ("tokens", "pair", "offsets", "tiles", "used", "scale", "slot", "pre", "h", "z")


@torch.library.custom_op("switch_dit::expert_mlp_fused", mutates_args=())
def _fused_op(
    x: Tensor,
    index: Tensor,
    gating: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    valid: Optional[Tensor],
    keep: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, then the _KEPT tensors for the backward: empty unless ``keep``)."""
    kern = dispatch.kernels("expert_mlp")
    x, w1, b1, w2, b2 = (t.contiguous() for t in (x, w1, b1, w2, b2))
    plan, used, scale, slot = _fused_plan(index, valid, gating, x, kern)
    with dispatch.on_device(x):
        if not keep:
            h = kern.fc1_gelu(x, plan.tokens, w1, b1, plan.tiles, plan.offsets)
            o = kern.fc2_scale(h, w2, b2, scale, plan.tiles, plan.offsets)
            return (_combine(o, slot), *(x.new_empty(0) for _ in _KEPT))
        pre = torch.empty(plan.tokens.shape[0], w1.shape[1], device=x.device, dtype=x.dtype)
        h = kern.fc1_gelu(x, plan.tokens, w1, b1, plan.tiles, plan.offsets, pre=pre)
        z = kern.fc2_scale(h, w2, b2, None, plan.tiles, plan.offsets)
    o = torch.where(used.unsqueeze(-1), z * scale.unsqueeze(-1), 0)  # rows past the packing unwritten
    y = _combine(o, slot)
    if valid is not None:
        # Rows past the packing exist only with invalid pairs (every pair is valid in training);
        # zero them so that the op's outputs are determined (torch.compile compares them).
        for t in (pre, h, z):
            t.masked_fill_(~used.unsqueeze(-1), 0)
    return y, plan.tokens, plan.pair, plan.offsets, plan.tiles, used, scale, slot, pre, h, z


@_fused_op.register_fake
def _(x, index, gating, w1, b1, w2, b2, valid, keep):
    (S, D), (E, C), H = x.shape, index.shape, w1.shape[1]
    y = x.new_empty(S, D)
    if not keep:
        return (y, *(x.new_empty(0) for _ in _KEPT))
    R = E * C
    tiles = grouping.max_tiles(E, C, dispatch.kernels("expert_mlp").BLOCK_M)
    i64 = dict(dtype=torch.int64, device=x.device)
    return (
        y,
        torch.empty(R, **i64),
        torch.empty(R, **i64),
        torch.empty(E + 1, **i64),
        torch.empty(tiles, 2, dtype=torch.int32, device=x.device),
        torch.empty(R, dtype=torch.bool, device=x.device),
        x.new_empty(R),
        torch.empty(E, S, **i64),
        x.new_empty(R, H),
        x.new_empty(R, H),
        x.new_empty(R, D),
    )


@torch.library.custom_op("switch_dit::expert_mlp_fused_backward", mutates_args=())
def _fused_backward_op(
    dy: Tensor,
    x: Tensor,
    gating: Tensor,
    w1: Tensor,
    w2: Tensor,
    tokens: Tensor,
    pair: Tensor,
    offsets: Tensor,
    tiles: Tensor,
    used: Tensor,
    scale: Tensor,
    slot: Tensor,
    pre: Tensor,
    h: Tensor,
    z: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dgating, dw1, db1, dw2, db2), each in its input's dtype."""
    kern = dispatch.kernels("expert_mlp")
    x, w1, w2 = (t.contiguous() for t in (x, w1, w2))
    tok = tokens.clamp(min=0)
    # The rows packed once (the weight gradients' reductions pipeline only over packed rows).
    dy_p = dy.to(x.dtype)[tok].contiguous()  # (R, D): each packed row's output gradient
    with dispatch.on_device(x):
        da = kern.fc2_backward(dy_p, w2, scale, pre, tiles, offsets)
        dw2, db2 = kern.weight_grad(dy_p, scale, h, offsets, dtype=w2.dtype)
        dw1, db1 = kern.weight_grad(da, None, x[tok].contiguous(), offsets, dtype=w1.dtype)
        dx = _combine(torch.where(used.unsqueeze(-1), kern.fc1_backward(da, w1, tiles, offsets), 0), slot)
    ds = torch.where(used, (dy_p.float() * z.float()).sum(-1), 0)  # rows past the packing: garbage z
    E, C = gating.shape
    dgating = ds.new_zeros(E * C + 1).scatter_(0, torch.where(used, pair, E * C), ds)[: E * C]
    return dx.to(x.dtype), dgating.view(E, C).to(gating.dtype), dw1, db1, dw2, db2


@_fused_backward_op.register_fake
def _(dy, x, gating, w1, w2, tokens, pair, offsets, tiles, used, scale, slot, pre, h, z):
    E, H = w1.shape[0], w1.shape[1]
    return (
        x.new_empty(x.shape),
        gating.new_empty(gating.shape),
        w1.new_empty(w1.shape),
        w1.new_empty(E, H),
        w2.new_empty(w2.shape),
        w2.new_empty(E, w2.shape[1]),
    )


def _fused_setup(ctx, inputs, output):
    x, _, gating, w1, _, w2, _, _, keep = inputs
    ctx.keep = keep
    ctx.save_for_backward(x, gating, w1, w2, *output[1:])
    ctx.mark_non_differentiable(*output[1:])  # the kept tensors are the backward's, not outputs


def _fused_backward(ctx, dy, *_):
    if not ctx.keep:  # (``_fused`` keeps whenever a gradient may be asked for)
        raise RuntimeError("switch_dit::expert_mlp_fused ran with keep=False: nothing was kept for a backward")
    dx, dgating, dw1, db1, dw2, db2 = _fused_backward_op(dy, *ctx.saved_tensors)
    return dx, None, dgating, dw1, db1, dw2, db2, None, None


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def _fused(x, index, gating, w1, b1, w2, b2, valid=None) -> Tensor:
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gating, w1, b1, w2, b2))
    return _fused_op(x, index, gating, w1, b1, w2, b2, valid, keep)[0]


def _fused_unsupported(x, index, gating, w1, b1, w2, b2, valid=None):
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        # The interpreter's bf16 tl.dot is wrong, not merely inexact (relative error ~1e10 measured
        # on these kernels with Triton 3.8): refuse rather than return garbage.
        return "cannot run bfloat16 under the Triton interpreter (its bf16 dot is wrong): use float32 or float16"
    return dispatch.kernels_unavailable("expert_mlp", (torch.float16, torch.bfloat16, torch.float32), x)


dispatch.register("expert_mlp", "reference", expert_mlp_reference)
dispatch.register("expert_mlp", "bmm", _bmm)
dispatch.register("expert_mlp", "grouped", _grouped)
dispatch.register("expert_mlp", "fused", _fused, supports=_fused_unsupported)
dispatch.kernels("expert_mlp")  # imported now, not while torch.compile traces a first call


def expert_mlp(
    x: Tensor,
    index: Tensor,
    gating: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    valid: Optional[Tensor] = None,
    *,
    backend: Optional[str] = "reference",
) -> Tensor:
    """y (S, D) = sum over chosen (e, c) of gating[e, c] * mlp_e(x[index[e, c]]) (module doc).

    x (S, D); index (E, C) int64; gating (E, C); weights as the module doc; valid (E, C) bool
    or None; backend: a strategy of STRATEGIES, or "auto"/None (``switch_dit.ops.dispatch``).
    Under autocast, x and the weights take the autocast dtype (as F.linear's do); y comes back in it.
    """
    check_expert_mlp_args(x, index, gating, valid, w1, b1, w2, b2)
    # Like F.linear under autocast: x and the weights in the autocast dtype (the kernels and grouped
    # GEMMs need one dtype), gating as it is; the strategies then run without autocast, so that each
    # sees, and differentiates, the same dtypes.
    x, w1, b1, w2, b2 = dispatch.autocast_inputs(x, w1, b1, w2, b2)
    with dispatch.no_autocast(x.device.type):
        return dispatch.call("expert_mlp", backend, x, index, gating, w1, b1, w2, b2, valid)
