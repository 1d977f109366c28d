"""The weight-gradient kernel's single loop over (sample, L tile) steps: P_b flushed at every
sample boundary, across several L tiles per sample (the last one partial), several samples per
chunk and several chunks, for the register accumulators and the read-modify-write fallback."""

import pytest
import torch

from tests.test_routed_linear import DEV, TOL32, K, make, mixed_linear, ref64, rel  # noqa: F401 (K: interpreter set)


@pytest.mark.parametrize("M,n_acc", [(3, None), (9, None), (3, 0)], ids=["accumulators", "fallback-M9", "fallback"])
@pytest.mark.parametrize("chunks", [1, 2])
def test_wgrad_flushes_at_sample_boundaries(M, n_acc, chunks):
    B, L, Din, Dout, k = 5, 37, 24, 40, 2  # 37 rows = 3 L tiles of 16, the last one partial
    x, w, b, idx, g = make(B, L, Din, M, k, Dout=Dout)
    gy = torch.randn(B, L, Dout, device=DEV)
    cfg = dict(BLOCK_I=16, BLOCK_O=32, BLOCK_L=16)
    if n_acc is not None:
        cfg["N_ACC"] = n_acc
    _, want = ref64(mixed_linear, x, w, b, idx, g, [gy])
    got = K.mixed_linear_backward(gy, None, x, None, w, b, idx, g, need_dx=False, chunks=chunks, config_wgrad=cfg)
    for name, gt, ref in zip(("weight", "bias", "topk_w"), got[1:], want[1:]):
        assert rel(gt.cpu(), ref) < TOL32, name
    # only the gate gradient (no weight gradient): the per-sample loop without accumulators
    got = K.mixed_linear_backward(
        gy, None, x, None, w, b, idx, g, need_dx=False, need_dw=False, need_db=False, chunks=chunks, config_wgrad=cfg
    )
    assert rel(got[3].cpu(), want[3]) < TOL32
