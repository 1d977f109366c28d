"""Token grouping (switch_dit.grouping, csrc/token_grouping*) against an argsort statement."""

import pytest
import torch

from switch_dit import _extension, grouping

requires_cuda = pytest.mark.gpu
requires_ext = pytest.mark.skipif(not grouping._HAS_OP, reason="switch_dit._C without group_tokens")


def _argsort_groups(index, valid, block_m):
    """Another statement: a stable argsort of the pairs by (expert, invalid last)."""
    E, C = index.shape
    v = torch.ones_like(index, dtype=torch.bool) if valid is None else valid
    expert = torch.arange(E)[:, None].expand(E, C)
    key = torch.where(v, expert, E).reshape(-1)
    order = torch.argsort(key, stable=True)  # pair ids, valid ones first, by expert then slot
    n = int(v.sum())
    counts = v.sum(1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    pad = torch.full((E * C - n,), -1, dtype=torch.int64)
    tokens = torch.cat([index.reshape(-1)[order[:n]], pad])
    pair = torch.cat([order[:n], pad])
    row_expert = torch.cat([key[order[:n]], pad])
    position = torch.full((E * C,), -1, dtype=torch.int64)
    position[order[:n]] = torch.arange(n)
    tiles = [(e, int(offsets[e]) + j) for e in range(E) for j in range(0, int(counts[e]), block_m)]
    tiles += [(-1, -1)] * (grouping.max_tiles(E, C, block_m) - len(tiles))
    return (counts, offsets, tokens, pair, row_expert, position.view(E, C), torch.tensor(tiles, dtype=torch.int32))


def _cases(device="cpu"):
    g = torch.Generator().manual_seed(0)
    for E, C, S, block_m, kind in [
        (4, 6, 10, 2, "mask"),
        (16, 33, 64, 8, "prefix"),
        (3, 5, 5, 64, "none"),
        (5, 7, 9, 3, "empty-full"),
        (1, 1, 1, 1, "none"),
        (8, 300, 300, 16, "prefix"),
    ]:
        index = torch.stack([torch.randperm(S, generator=g)[:C] for _ in range(E)])
        if kind == "none":
            valid = None
        elif kind == "mask":
            valid = torch.rand(E, C, generator=g) < 0.5
        else:
            k = torch.randint(0, C + 1, (E,), generator=g)
            if kind == "empty-full":
                k[0], k[-1] = 0, C
            valid = torch.arange(C)[None] < k[:, None]
        yield index.to(device), (None if valid is None else valid.to(device)), block_m


@pytest.mark.parametrize("impl", ["extension", "torch"])
def test_matches_argsort_statement(impl):
    if impl == "extension" and not grouping._HAS_OP:
        pytest.skip("switch_dit._C without group_tokens")
    fn = torch.ops.switch_dit.group_tokens if impl == "extension" else torch.ops.switch_dit.group_tokens_torch
    for index, valid, block_m in _cases():
        got = fn(index, valid, block_m)
        want = _argsort_groups(index, valid, block_m)
        for name, a, b in zip(grouping.TokenGroups._fields, got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), (name, a, b)


def test_group_tokens_uses_the_extension_on_cpu():
    index, valid, block_m = next(_cases())
    got = grouping.group_tokens(index, valid, block_m)
    assert all(torch.equal(a, b) for a, b in zip(got, grouping.reference_groups(index, valid, block_m)))
    assert ("cpu" in grouping._EXT_DEVICES) == grouping._HAS_OP == _extension.available()


@pytest.mark.parametrize("op", ["group_tokens", "group_tokens_torch"])
def test_opcheck(op):
    if op == "group_tokens" and not grouping._HAS_OP:
        pytest.skip("switch_dit._C without group_tokens")
    for index, valid, block_m in list(_cases())[:3]:
        torch.library.opcheck(getattr(torch.ops.switch_dit, op), (index, valid, block_m))


def test_compile_fullgraph():
    index, valid, block_m = list(_cases())[1]

    def f(index, valid):
        g = grouping.group_tokens(index, valid, block_m)
        return g.tokens * 2, g.tiles

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(index, valid)
    want = f(index, valid)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("impl", ["extension", "torch"])
def test_no_expert_and_no_slot(impl):
    if impl == "extension" and not grouping._HAS_OP:
        pytest.skip("switch_dit._C without group_tokens")
    fn = torch.ops.switch_dit.group_tokens if impl == "extension" else torch.ops.switch_dit.group_tokens_torch
    out = fn(torch.zeros(0, 5, dtype=torch.int64), None, 4)
    assert out[1].tolist() == [0] and out[2].numel() == 0 and out[6].numel() == 0
    out = fn(torch.zeros(3, 0, dtype=torch.int64), None, 4)
    assert out[0].tolist() == [0, 0, 0] and out[1].tolist() == [0, 0, 0, 0] and (out[6] == -1).all()


def test_bad_input():
    with pytest.raises(ValueError, match="index must be an int64 tensor"):
        grouping.group_tokens(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="valid must be None or a bool"):
        grouping.group_tokens(torch.zeros(3, 4, dtype=torch.int64), torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_m"):
        grouping.group_tokens(torch.zeros(3, 4, dtype=torch.int64), block_m=0)
    if grouping._HAS_OP:
        with pytest.raises(ValueError, match="group_tokens: index must have shape"):
            torch.ops.switch_dit.group_tokens(torch.zeros(3, dtype=torch.int64), None, 4)


@requires_cuda
@requires_ext
def test_cuda_kernel_matches_cpu():
    assert "cuda" in grouping._EXT_DEVICES, "the extension was built without its CUDA kernels"
    for index, valid, block_m in _cases("cuda"):
        got = torch.ops.switch_dit.group_tokens(index, valid, block_m)
        want = _argsort_groups(index.cpu(), None if valid is None else valid.cpu(), block_m)
        for name, a, b in zip(grouping.TokenGroups._fields, got, want):
            assert torch.equal(a.cpu(), b), name
