"""``python -m switch_dit.kernels.report``: the static performance check as a table.

One row per compiled (kernel, config, arch): registers, spill bytes, shared memory, whether
the main loop's loads are pipelined (and, on sm_90, whether the wgmma stays in flight), the
MMA instruction, and the analytic model's time for the op's step at the reference shape
(bf16 or fp32 as compiled, XL: B = 32, L = 256, D = 1152, M = 3, k = 2, on an H100 SXM; see
``switch_dit.perf_model``). Exit status 1 when any row breaks a criterion of
``switch_dit.kernels.static_check`` (the problems are listed under the table).

Options: ``--full`` (every autotuning candidate, as SWITCH_DIT_PTXAS_CHECK=1), ``--json PATH``
(the rows, for the benchmarks' records), ``--device NAME`` (the model's device).
"""

from __future__ import annotations

import argparse
import sys

from switch_dit.kernels import static_check as S

XL = dict(B=32, L=256, D=1152, M=3, k=2)
# kernel -> (op, mode, step name in the model) of the model's estimate column
_MODEL_STEP = {
    "_mixed_matmul_kernel": ("mixed_linear", "fwd", "mixed_matmul"),
    "_mixed_wgrad_kernel": ("mixed_linear", "bwd", "mixed_wgrad"),
    "_mask_ln_mod_fwd_kernel": ("mask_ln_modulate", "fwd", None),
    "_mask_ln_mod_bwd_kernel": ("mask_ln_modulate", "bwd", None),
    "_res_ln_mod_fwd_kernel": ("residual_ln_modulate", "fwd", None),
    "_res_ln_mod_bwd_kernel": ("residual_ln_modulate", "bwd", None),
    "_gated_res_fwd_kernel": ("gated_residual", "fwd", None),
    "_gated_res_bwd_kernel": ("gated_residual", "bwd", None),
}


def model_us(r: S.Result, device: str) -> str:
    """The model's time (us) of this kernel's step at XL, or '-'."""
    import torch

    from switch_dit import perf_model as P

    op, mode, step = _MODEL_STEP.get(r.kernel, (None, None, None))
    if op is None:
        return "-"
    dtype = torch.float32 if r.dtype == "float32" else torch.bfloat16
    tf32 = not r.ieee
    est = P.estimate(op, "fused", XL, dtype, device, mode=mode, tf32=tf32)
    first = next(s for s in est.steps if step is None or s.name == step)
    dev = P.device_peaks(device)
    t = P._run([first], dev, dev.rate(dtype, tf32), "").time_s
    return f"{t * 1e6:.0f}"


def _config_text(r: S.Result) -> str:
    c = dict(r.config)
    parts = []
    if "BLOCK_L" in c and "BLOCK_N" in c:
        parts.append(f"{c.pop('BLOCK_L')}x{c.pop('BLOCK_N')}x{c.pop('BLOCK_K')}")
    elif "BLOCK_I" in c:
        parts.append(f"{c.pop('BLOCK_I')}x{c.pop('BLOCK_O')}x{c.pop('BLOCK_L', '?')} acc={c.pop('N_ACC', '?')}")
    elif "BLOCK_M" in c or "BLOCK_R" in c:  # the expert MLP's grouped GEMM (rows) and reduction (rows per step)
        rows = c.pop("BLOCK_M", None) or f"r{c.pop('BLOCK_R')}"
        parts.append(f"{rows}x{c.pop('BLOCK_N')}x{c.pop('BLOCK_K')}")
    for key, short in (("num_warps", "w"), ("num_stages", "s"), ("maxnreg", "maxnreg=")):
        if key in c:
            parts.append(f"{short}{c.pop(key)}")
    if c.pop("IEEE", 0):
        parts.append("ieee")
    names = ("TOPK", "ROWS", "HAS_M", "DM_MODE", "NEED_DW", "NEED_DG", "GATHER", "GELU", "GELU_GRAD", "SCALE_G")
    flags = {k: v for k, v in r.constants.items() if k in names}
    parts += [f"{k}={v}" for k, v in flags.items()]
    return " ".join(parts)


def table(results: list[S.Result], device: str = "h100") -> str:
    head = ("kernel", "sm", "config", "regs", "spill", "smem", "pipelined", "mma", "model us")
    rows = []
    for r in results:
        pipe = "-" if r.pipelined is None else ("yes" if r.pipelined else "NO")
        if r.wgmma_in_flight is not None:
            pipe += ", mma in flight" if r.wgmma_in_flight else ", mma waited"
        rows.append(
            (
                r.kernel.strip("_").replace("_kernel", ""),
                str(r.arch),
                _config_text(r),
                str(r.registers),
                str(r.spill_bytes),
                f"{r.shared // 1024}K",
                pipe,
                r.mma,
                model_us(r, device),
            )
        )
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in rows)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m switch_dit.kernels.report", description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every autotuning candidate too")
    ap.add_argument("--json", help="write the rows as JSON to this path")
    ap.add_argument("--device", default="h100", help="the analytic model's device (default: h100)")
    args = ap.parse_args(argv)
    results = S.check(full=args.full or None)
    print(table(results, args.device))
    if args.json:
        with open(args.json, "w") as f:
            f.write(S.as_json(results))
    bad = [r for r in results if r.problems]
    for r in bad:
        print(f"FAIL {r.kernel} sm_{r.arch} {_config_text(r)}: {'; '.join(r.problems)}")
    notes = sorted({r.kernel for r in results if r.wgmma_in_flight is False and r.kernel in S.SERIAL_WGMMA})
    for k in notes:
        print(f"note: {k}: wgmma waited each step: {S.SERIAL_WGMMA[k]}")
    print(f"{len(results)} compilations, {len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
