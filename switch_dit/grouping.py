"""Token grouping for expert choice: the chosen (expert, token) pairs packed by expert.

DiffMoE's experts each choose tokens from the pool (docs/design.md §6): expert e holds the
pairs ``index[e, c]`` (token ids) for the slots c with ``valid[e, c]`` (all slots in training;
the first k_e of a ranking at evaluation, k_e on the device). The grouped GEMMs want the valid
pairs as contiguous rows per expert. :func:`group_tokens` gives, without a host sync and with
sizes that depend only on (E, C):

  counts      (E,) int64     valid pairs of each expert
  offsets     (E + 1,) int64 exclusive prefix sum: expert e owns packed rows offsets[e]:offsets[e+1]
  tokens      (E * C,) int64 token id of each packed row; -1 past offsets[E]
  pair        (E * C,) int64 pair id e * C + c of each packed row; -1 past offsets[E]
  row_expert  (E * C,) int64 expert of each packed row; -1 past offsets[E]
  position    (E, C) int64   packed row of each pair, -1 for invalid pairs (the inverse of pair)
  tiles       (T_max, 2) int32 tile schedule, rows (expert, first packed row) for every block of
              ``block_m`` rows of every expert, experts in order; T_max = ceil(E*C/block_m) + E
              bounds the count for any k, unused rows are -1.

Within an expert the packed rows keep slot order (c ascending).

Op ``torch.ops.switch_dit.group_tokens`` comes from the compiled extension (``csrc/
token_grouping*``: a CPU kernel, and two CUDA launches). Where it is missing (not built, or
built before this op existed), ``torch.ops.switch_dit.group_tokens_torch``, built on
:func:`reference_groups` (cumsum and scatter), computes the same and one
:class:`~switch_dit._extension.ExtensionFallbackWarning` says so. Both ops have fake kernels,
so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from switch_dit import _extension

__all__ = ["TokenGroups", "group_tokens", "reference_groups", "max_tiles"]

_OP = "switch_dit::group_tokens"
_TORCH_OP = "switch_dit::group_tokens_torch"

Tensor = torch.Tensor


class TokenGroups(NamedTuple):
    counts: Tensor
    offsets: Tensor
    tokens: Tensor
    pair: Tensor
    row_expert: Tensor
    position: Tensor
    tiles: Tensor


def max_tiles(num_experts: int, capacity: int, block_m: int) -> int:
    """Rows of TokenGroups.tiles: a bound on sum_e ceil(counts[e] / block_m) for any counts."""
    return -(-num_experts * capacity // block_m) + num_experts


def _check(index: Tensor, valid: Optional[Tensor], block_m: int) -> None:
    if not isinstance(index, Tensor) or index.dim() != 2 or index.dtype != torch.int64:
        got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, Tensor) else type(index).__name__
        raise ValueError(f"index must be an int64 tensor (E, C), got {got}")
    if valid is not None and (
        not isinstance(valid, Tensor)
        or valid.dtype != torch.bool
        or valid.shape != index.shape
        or valid.device != index.device
    ):
        raise ValueError(f"valid must be None or a bool tensor of shape {tuple(index.shape)} on {index.device}")
    if not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"block_m must be a positive int, got {block_m!r}")


def reference_groups(index: Tensor, valid: Optional[Tensor] = None, block_m: int = 64) -> TokenGroups:
    """The grouping in plain PyTorch: the fallback, and a second statement for the tests."""
    _check(index, valid, block_m)
    E, C = index.shape
    dev = index.device
    v = torch.ones_like(index, dtype=torch.bool) if valid is None else valid
    vi = v.to(torch.int64)
    counts = vi.sum(1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    rank = vi.cumsum(1) - 1
    position = torch.where(v, offsets[:-1, None] + rank, -1)
    dump = torch.where(v, position, E * C).reshape(-1)  # invalid pairs land in one extra row

    def packed(values: Tensor) -> Tensor:
        out = torch.full((E * C + 1,), -1, dtype=torch.int64, device=dev)
        return out.scatter_(0, dump, values.reshape(-1))[: E * C]

    tokens = packed(index)
    pair = packed(torch.arange(E * C, device=dev))
    row_expert = packed(torch.arange(E, device=dev)[:, None].expand(E, C))

    n_tiles = max_tiles(E, C, block_m)
    per_expert = (counts + block_m - 1) // block_m
    tile_end = per_expert.cumsum(0)  # inclusive
    t = torch.arange(n_tiles, device=dev)
    e_of_t = torch.searchsorted(tile_end, t, right=True)  # E past the last tile
    used = e_of_t < E
    e_safe = e_of_t.clamp(max=E - 1)
    first = offsets[e_safe] + (t - (tile_end[e_safe] - per_expert[e_safe])) * block_m
    tiles = torch.stack([torch.where(used, e_safe, -1), torch.where(used, first, -1)], 1).to(torch.int32)
    return TokenGroups(counts, offsets, tokens, pair, row_expert, position, tiles)


def _fake(index, valid, block_m):
    _check(index, valid, block_m)
    E, C = index.shape
    i64 = dict(dtype=torch.int64)
    return (
        index.new_empty((E,), **i64),
        index.new_empty((E + 1,), **i64),
        index.new_empty((E * C,), **i64),
        index.new_empty((E * C,), **i64),
        index.new_empty((E * C,), **i64),
        index.new_empty((E, C), **i64),
        index.new_empty((max_tiles(E, C, block_m), 2), dtype=torch.int32),
    )


@torch.library.custom_op(_TORCH_OP, mutates_args=())
def _groups_torch(
    index: Tensor, valid: Optional[Tensor], block_m: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(t.clone() for t in reference_groups(index, valid, block_m))


_groups_torch.register_fake(_fake)
_HAS_OP = _extension.available() and hasattr(torch.ops.switch_dit, "group_tokens")
_EXT_DEVICES = frozenset(d for d in ("cpu", "cuda") if _HAS_OP and _extension.has_kernel(_OP, d))


def group_tokens(index: Tensor, valid: Optional[Tensor] = None, block_m: int = 64) -> TokenGroups:
    """Pack the valid (expert, slot) pairs of ``index`` (E, C) by expert (module doc).

    index (E, C) int64 contiguous; valid (E, C) bool or None; block_m rows per tile.
    No tensor values are read on the host."""
    _check(index, valid, block_m)
    index = index.contiguous()
    valid = None if valid is None else valid.contiguous()
    if index.device.type in _EXT_DEVICES:
        return TokenGroups(*torch.ops.switch_dit.group_tokens(index, valid, block_m))
    if not torch.compiler.is_compiling():
        why = (
            f"switch_dit._C has no group_tokens kernel for device {index.device.type!r}"
            if _HAS_OP
            else f"the compiled extension lacks group_tokens ({_extension.load_error or 'built before it'})"
        )
        _extension.warn_fallback("switch_dit.grouping.group_tokens", why)
    return TokenGroups(*torch.ops.switch_dit.group_tokens_torch(index, valid, block_m))


# The fake kernel of the compiled op is registered by switch_dit.routing: the op library names
# that module as its Python home (csrc/binding.cpp).
from switch_dit import routing as _routing  # noqa: E402,F401
