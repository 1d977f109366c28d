"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90), without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler: a kernel can pass every
interpreter test and still fail to compile (a dot shape the MMA cannot take, a type
mismatch, too much shared memory). So the ops are run once under the interpreter with
model-sized rows (D = 1152, XL) in bf16 and fp32, every kernel launch is recorded, and
each distinct launch is compiled by ``triton.compile`` for both targets (down to the
cubin, through ptxas) with the config a GPU would use: the routed linear's default
configs (``AUTOTUNE=0`` on a GPU), all its autotuning candidates with
SWITCH_DIT_PTXAS_CHECK=1.

Two subprocesses: the recording one forces TRITON_INTERPRET=1 and hides any GPU, the
compiling one must not interpret (there ``@triton.jit`` gives compilable kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_RECORD = r"""
import json, sys
import torch
import triton
import triton.runtime.interpreter as interp
from switch_dit import ops

records = []
_run = interp.InterpretedFunction.run

def encode(v):
    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
    if isinstance(v, triton.language.dtype):
        return {"tldtype": v.name}
    if isinstance(v, bool) or v is None:
        return {"value": v}
    if isinstance(v, int):
        return {"int": v}
    if isinstance(v, float):
        return {"float": v}
    raise TypeError(f"cannot record {type(v)}")

def run(self, *args, grid, warmup, **kwargs):
    if self.fn.__module__.startswith("switch_dit.kernels"):
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
        records.append({"module": self.fn.__module__, "kernel": self.fn.__name__,
                        "args": {k: encode(v) for k, v in bound.items()}, "options": options})
    return _run(self, *args, grid=grid, warmup=warmup, **kwargs)

interp.InterpretedFunction.run = run

torch.manual_seed(0)
# The routed linear's tiles are constants of the config, not of D: a small D is as good as
# XL's (and the interpreter's GEMM is slow). The norm kernels' row block is D's power of 2:
# XL's width, 1152.
B, L, M, k = 2, 3, 3, 2
for dtype in (torch.bfloat16, torch.float32):
    def rnd(*shape, requires_grad=True):
        return (torch.randn(*shape) * 0.1).to(dtype).requires_grad_(requires_grad)
    D = 48
    x = rnd(B, L, D)
    weight, bias = rnd(M, D, D), rnd(M, D)
    idx, w = torch.tensor([[0, 2], [1, 0]]), torch.rand(B, k).to(dtype).requires_grad_(True)
    for with_bias in (True, False):
        m, r0 = ops.expert_mask_and_apply(x, weight, bias if with_bias else None, idx, w, backend="triton")
        (m.float().sum() + r0.float().sum()).backward()
    ops.expert_mask(x, weight, bias, idx, w, backend="triton").float().sum().backward()
    w_out = rnd(M, D, 2 * D)  # D_in != D_out (Remix-DiT's fc1)
    ops.mixed_linear(x, w_out, None, idx, w, backend="triton").float().sum().backward()
    # M = 8 fills the register accumulators; M = 9 takes the read-modify-write fallback.
    for experts in (8, 9):
        ops.expert_mask(x, rnd(experts, D, D), rnd(experts, D), torch.tensor([[0, experts - 1], [3, 3]]), w,
                        backend="triton").float().sum().backward()

    D = 1152
    x, z, a, y = rnd(B, L, D), rnd(B, L, D), rnd(B, L, D), rnd(B, L, D)
    shift, scale, gate = rnd(B, D), rnd(B, D), rnd(B, D)
    for mask in (None, rnd(B, L, D), rnd(B, 1, D)):
        outs = ops.mask_ln_modulate(x, mask, shift, scale, return_r0=True, backend="triton")
        sum(o.float().sum() for o in outs).backward()
        ops.mask_ln_modulate(x, mask, shift, scale, backend="triton").float().sum().backward()
    zr, h = ops.residual_ln_modulate(z, x, a, gate, shift, scale, backend="triton")
    (zr.float().sum() + h.float().sum()).backward()
    ops.gated_residual(z, y, gate, backend="triton").float().sum().backward()

json.dump(records, sys.stdout)
"""

_COMPILE = r"""
import importlib, json, os, sys, tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget

full = os.environ.get("SWITCH_DIT_PTXAS_CHECK", "0") not in ("", "0")
records = json.loads(sys.stdin.read())
TL = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int64": "i64",
      "int32": "i32", "bool": "i1", "int8": "i8"}


def gpu_configs(rec, module):
    # The configs a GPU launch uses instead of the interpreter's fixed ones; fp32 products
    # both as TF32 MMAs (IEEE=0, what the trainer allows) and in true fp32 (IEEE=1).
    a, name = rec["args"], rec["kernel"]
    if name not in ("_mixed_matmul_kernel", "_mixed_wgrad_kernel"):
        return [dict(rec["options"])]
    first = "a_ptr" if name == "_mixed_matmul_kernel" else "x_ptr"
    dtype = getattr(torch, a[first]["tensor"])
    out = []
    for ieee in ((0, 1) if dtype == torch.float32 else (0,)):
        if name == "_mixed_matmul_kernel":
            fp32 = dtype == torch.float32
            cfgs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in module._fwd_configs(fp32)]
            out += [dict(c, IEEE=ieee) for c in (cfgs if full else [module._fwd_default(fp32)])]
        else:
            prec = module._wgrad_prec(dtype, ieee)
            bi, bo, n_acc = module._wgrad_plan(a["w_ptr"]["shape"][0], prec)
            tile = dict(BLOCK_I=bi, BLOCK_O=bo, N_ACC=n_acc if a["N_ACC"]["int"] else 0, IEEE=ieee)
            cfgs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                         **({"maxnreg": c.maxnreg} if c.maxnreg else {})) for c in module._wgrad_configs(prec)]
            out += [dict(tile, **c) for c in (cfgs if full else [module._wgrad_default(prec)])]
    return out


def signature(fn, args):
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = args[name]
        if param.is_constexpr:
            sig[name] = "constexpr"
            consts[name] = triton.language.dtype(v["tldtype"]) if "tldtype" in v else v.get("int", v.get("value"))
        elif "tensor" in v:
            sig[name] = "*" + TL[v["tensor"]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif "int" in v:
            n = v["int"]
            if n == 1:  # as the launcher: an int argument equal to 1 becomes a constant
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -2**31 <= n < 2**31 else "i64"
                if n % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif "float" in v:
            sig[name] = "fp32"
        else:
            raise ValueError(f"{name}: {v}")
    return sig, consts, attrs


seen, n = set(), 0
for rec in records:
    module = importlib.import_module(rec["module"])
    fn = getattr(module, rec["kernel"])
    for cfg in gpu_configs(rec, module):
        args = {**rec["args"], **{k: {"int": v} for k, v in cfg.items() if k in fn.arg_names}}
        options = {k: v for k, v in cfg.items() if k not in fn.arg_names}
        sig, consts, attrs = signature(fn, args)
        key = json.dumps([rec["kernel"], sig, consts, options], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        for arch in (80, 90):
            src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs={k: v for k, v in attrs.items()})
            try:
                ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            except Exception as e:
                print(f"FAILED {rec['kernel']} sm_{arch} {options} {consts}: {type(e).__name__}: {str(e)[:2000]}")
                sys.exit(1)
            assert ck.asm.get("cubin"), f"{rec['kernel']} sm_{arch}: no cubin"
            n += 1
print(json.dumps({"compiled": n, "kernels": sorted({r["kernel"] for r in records})}))
"""


def test_every_kernel_compiles_for_sm80_and_sm90():
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget  # noqa: F401  (triton 3.x layout)

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rec = subprocess.run([sys.executable, "-c", _RECORD], env={**env, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""},
                         capture_output=True, text=True, timeout=600)
    assert rec.returncode == 0, rec.stderr[-4000:]
    records = json.loads(rec.stdout)
    out = subprocess.run([sys.executable, "-c", _COMPILE], input=rec.stdout, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    kernels = {"_mixed_matmul_kernel", "_mixed_wgrad_kernel", "_mask_ln_mod_fwd_kernel", "_mask_ln_mod_bwd_kernel",
               "_res_ln_mod_fwd_kernel", "_res_ln_mod_bwd_kernel", "_gated_res_fwd_kernel", "_gated_res_bwd_kernel"}
    assert set(result["kernels"]) == kernels, result
    assert result["compiled"] >= 2 * len(kernels), result
    assert len(records) > 0 and triton.__version__
