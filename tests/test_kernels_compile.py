"""Static performance check (switch_dit.kernels.static_check): every Triton kernel launch the
ops make compiles for A100 (sm_80) and H100 (sm_90) without a GPU, without register spills,
with its main loop software-pipelined and on the tensor cores (docs/design.md §5).

The interpreter runs the kernels' Python, not Triton's compiler: a kernel can pass every
interpreter test and still fail to compile, spill, or run unpipelined. The launches are
recorded under the interpreter (model-sized norm rows, D = 1152), then compiled with the
configs a GPU would use (the routed linear's defaults; every autotuning candidate with
SWITCH_DIT_PTXAS_CHECK=1). A deliberately bad config must fail the same check.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402, F401  (triton 3.x layout)

from switch_dit.kernels import static_check as S  # noqa: E402

KERNELS = {
    "_mixed_matmul_kernel",
    "_mixed_wgrad_kernel",
    "_mask_ln_mod_fwd_kernel",
    "_mask_ln_mod_bwd_kernel",
    "_res_ln_mod_fwd_kernel",
    "_res_ln_mod_bwd_kernel",
    "_gated_res_fwd_kernel",
    "_gated_res_bwd_kernel",
    "_grouped_kernel",  # DiffMoE's expert MLP: fc1, fc2 and their backward
    "_grouped_wgrad_kernel",
}


@pytest.fixture(scope="module")
def records():
    return S.record_launches()


def test_every_kernel_passes_the_static_check(records):
    results = S.check(records=records)
    assert {r.kernel for r in results} == KERNELS
    assert {r.arch for r in results} == {80, 90}
    failing = [(r.kernel, r.arch, r.config, r.problems) for r in results if r.problems]
    assert not failing, failing
    # The criteria were read, not skipped: the MMA kernels report their instruction and loop.
    mma = [r for r in results if r.has_dot and not r.ieee]
    assert mma and all(r.mma == ("wgmma" if r.arch == 90 else "mma") and r.pipelined for r in mma)
    # The weight gradient keeps its wgmma in flight across its single loop over the rows.
    wgrad90 = [r for r in mma if r.kernel == "_mixed_wgrad_kernel" and r.arch == 90]
    assert wgrad90 and all(r.wgmma_in_flight for r in wgrad90)
    assert all(r.registers > 0 for r in results)


def test_a_bad_config_fails_the_check(records):
    """One stage (no software pipeline) and a 128x256 tile with 4 warps (spills) on sm_90."""
    rec = next(
        r for r in records if r["kernel"] == "_mixed_matmul_kernel" and r["args"]["a_ptr"]["tensor"] == "bfloat16"
    )
    bad = dict(BLOCK_L=128, BLOCK_N=256, BLOCK_K=64, num_warps=4, num_stages=1, IEEE=0)
    (res,) = S.run_jobs([(rec, bad, 90)])
    problems = S.failures_of(res)
    assert any("spills" in p for p in problems), problems
    assert any("not pipelined" in p for p in problems), problems


_LOOP = """
    %r:3 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z, %t0 = %a0, %t1 = %a1) -> (...) : i32 {{
      %w = ttg.async_wait %t0, %t1 {{num = {num} : i32}}
      %d = ttng.warp_group_dot %x, %y, %acc {{isAsync = true}}
      %e:3 = ttng.warp_group_dot_wait %d, %x, %y {{pendings = {pend} : i32}}
      %f = scf.if %c -> (tensor<64x64xf32>) {{
        %g = ttng.warp_group_dot_wait %e#0 {{pendings = 0 : i32}}
        scf.yield %g
      }} else {{
        scf.yield %e#0
      }}
      %c2 = ttg.async_copy_global_to_local %p, %buf
      scf.yield %f, %t1, %c2
    }}
"""


def test_pipelining_criterion_on_ttgir_text():
    assert S.read_pipelining(_LOOP.format(num=2, pend=1)) == (True, True)
    assert S.read_pipelining(_LOOP.format(num=0, pend=1)) == (False, True)  # every copy waited: no overlap
    assert S.read_pipelining(_LOOP.format(num=2, pend=0)) == (True, False)
    no_copy = _LOOP.format(num=2, pend=1).replace("ttg.async_copy_global_to_local", "tt.load")
    assert S.read_pipelining(no_copy)[0] is False
    assert S.read_pipelining("tt.func @k() { tt.return }") == (None, None)  # no dot loop
