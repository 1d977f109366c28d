"""Static performance check: every kernel launch the ops make, compiled for sm_90 and sm_80, read.

Without a GPU (docs/design.md §5, §6) the compiler's output still tells whether a kernel can be
fast. The ops are run once under the interpreter (``TRITON_INTERPRET=1``, CPU tensors) and
every launch of a ``switch_dit.kernels`` kernel is recorded; each distinct launch is then
compiled by ``triton.compile`` for ``GPUTarget("cuda", 90)`` and ``("cuda", 80)`` down to the
cubin with the configs a GPU would use (the routed linear's default configs; with
``SWITCH_DIT_PTXAS_CHECK=1`` every autotuning candidate too), and read:

- **registers and spills**: ``ptxas -v`` on the kernel's PTX (the flags Triton uses).
  Criterion: 0 bytes of spill stores and loads.
- **shared memory**: Triton's metadata (bytes per program).
- **MMA instruction**, from the PTX: ``wgmma`` (``wgmma.mma_async``, sm_90), ``mma``
  (``mma.sync``, sm_80 and sm_90 fallbacks) or ``fma`` (no tensor cores). Criterion: a kernel
  with a ``tl.dot`` uses wgmma on sm_90 and mma on sm_80, except true-fp32 products
  (``IEEE=1``: PyTorch's default fp32 precision, which tensor cores cannot give).
- **software pipelining**, from the TTGIR (the output of Triton's pipeliner, the same
  dialect on 3.6 and 3.8). The main loop is each ``scf.for`` that contains a dot. Its loads
  are pipelined when the loop body issues asynchronous copies to shared memory
  (``ttg.async_copy_global_to_local``, cp.async; or TMA copies) and waits for them with
  copies still in flight (``ttg.async_wait {num > 0}``, or an mbarrier wait with a
  multi-buffered ring), so the loads of later iterations overlap this iteration's MMA.
  Criterion: every main loop of a tensor-core kernel has pipelined loads.
  On sm_90 the report also says whether the wgmma itself stays in flight across iterations
  (the ``ttng.warp_group_dot_wait`` at the loop body's own level has ``pendings > 0``; a
  wait inside an ``scf.if`` only runs on that branch): with ``pendings = 0`` the warps wait
  for each MMA before the next tile's register work (the mix of expert tiles). Criterion:
  required for kernels not listed in ``SERIAL_WGMMA`` (each
  entry says why it cannot keep its MMA in flight).

Limits. A 2-stage pipeline waits with its only copy in flight (``num = 0``) and counts as
not pipelined: by this criterion a main loop needs 3 stages or more. The TMA / mbarrier form
is accepted but none of our kernels uses it yet (untested against real TTGIR).
The check reads what the compiler produced, not what the GPU does: it cannot see
bank conflicts, uncoalesced global accesses, occupancy beyond registers and shared memory,
or a pipeline that is present but too shallow for the latency. The loop criterion is read
from textual TTGIR (one loop level deep, by indentation); Triton's dialect names have been
stable from 3.2 to 3.8 but may move. Kernels without a dot (the norm/residual kernels,
memory-bound) are checked for spills only. ptxas is Triton's bundled one, for sm_90a.

Entry points: ``check(full=False) -> list[Result]`` and ``failures(results)``;
``python -m switch_dit.kernels.report`` prints the table.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

# Kernels whose sm_90 wgmma cannot stay in flight across iterations, and why.
SERIAL_WGMMA: dict[str, str] = {
    "_mixed_matmul_kernel": (
        "the mixed weight tile is computed in registers every K step and stored to one shared buffer; "
        "Triton keeps a wgmma in flight only when each shared operand is a multi-buffered load, so "
        "the next mix waits for the MMA (a separate mixing pass is the bmm strategy)"
    ),
}

# --------------------------------------------------------------------------- recording

RECORD_SCRIPT = r"""
import inspect, json, sys
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
        params = inspect.signature(self.fn).parameters
        const = [n for n, p in params.items() if "constexpr" in str(p.annotation)]
        records.append({"module": self.fn.__module__, "kernel": self.fn.__name__, "constexprs": const,
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
    # M = 4: the most registers of the 64x64 plan; M = 8 fills the register accumulators;
    # M = 9 takes the read-modify-write fallback.
    for experts in (4, 8, 9):
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

    # DiffMoE's expert MLPs, training (forward kernels with the pre-activation kept, backward
    # kernels) and evaluation (the score in fc2's epilogue).
    # The bfloat16 pass runs them in float16 (the interpreter refuses bf16 for them: its bf16 dot
    # is wrong) and records the launches as bfloat16 ones, which is what a GPU compiles.
    from switch_dit.ops.expert_mlp import expert_mlp
    first = len(records)
    half = torch.float16 if dtype == torch.bfloat16 else dtype
    S, D, H, E = 24, 32, 48, 4
    def rnd_half(*shape):
        return (torch.randn(*shape) * 0.1).to(half).requires_grad_(True)
    xs = rnd_half(S, D)
    gating, index = torch.topk(torch.rand(E, S), 8, dim=1)
    gating = gating.to(half).requires_grad_(True)
    ws = [rnd_half(E, H, D), rnd_half(E, H), rnd_half(E, D, H), rnd_half(E, D)]
    expert_mlp(xs, index, gating, *ws, backend="fused").float().sum().backward()
    with torch.no_grad():
        expert_mlp(xs, index, gating, *ws, backend="fused")
    if dtype == torch.bfloat16:
        for rec in records[first:]:
            for arg in rec["args"].values():
                if arg.get("tensor") == "float16":
                    arg["tensor"] = "bfloat16"

json.dump(records, sys.stdout)
"""


def record_launches() -> list[dict]:
    """Every kernel launch of a small run of the ops, recorded under the interpreter (a subprocess)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", RECORD_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"recording the kernel launches failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


# --------------------------------------------------------------------------- configs


def gpu_configs(rec: dict, full: bool) -> list[dict]:
    """The configs a GPU launch uses for a recorded (interpreter) launch.

    Routed linear: its default configs (all autotuning candidates with ``full``), and fp32
    both as TF32 MMAs (IEEE=0, what the trainer allows) and in true fp32 (IEEE=1). The norm
    kernels: the recorded launch with the ROWS of an XL launch on an H100.
    """
    a, name = rec["args"], rec["kernel"]
    if rec["module"].endswith("norm_modulate"):
        # ROWS as a GPU launch at XL (B = 32, L = 256) on 132 SMs; the interpreter's is 4
        from switch_dit.kernels.norm_modulate import rows_per_program

        return [dict(rec["options"], ROWS=rows_per_program(32, 256, 132, name.endswith("_bwd_kernel")))]
    if rec["module"].endswith("expert_mlp"):  # the GPU's tiles (the interpreter's are smaller)
        from switch_dit.kernels.expert_mlp import GPU_BLOCKS, IEEE_WGRAD_ROWS

        wgrad = name == "_grouped_wgrad_kernel"
        fp32 = a["g_ptr" if wgrad else "a_ptr"]["tensor"] == "float32"
        out = []
        for ieee in (0, 1) if fp32 else (0,):
            blocks = dict(GPU_BLOCKS)
            if wgrad:  # the launcher's rows per reduction step
                rows = blocks.pop("BLOCK_M")
                blocks["BLOCK_R"] = min(rows, IEEE_WGRAD_ROWS) if ieee else rows
            out.append(dict(rec["options"], **blocks, IEEE=ieee))
        return out
    if name not in ("_mixed_matmul_kernel", "_mixed_wgrad_kernel"):
        return [dict(rec["options"])]
    module = importlib.import_module(rec["module"])
    import torch

    first = "a_ptr" if name == "_mixed_matmul_kernel" else "x_ptr"
    fp32 = a[first]["tensor"] == "float32"
    out = []
    for ieee in (0, 1) if fp32 else (0,):
        prec = module._wgrad_prec(torch.float32 if fp32 else torch.bfloat16, ieee)
        if name == "_mixed_matmul_kernel":
            cfgs = module._fwd_configs(prec) if full else []
            cfgs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in cfgs]
            out += [dict(c, IEEE=ieee) for c in [module._fwd_default(prec), *cfgs]]
        else:
            bi, bo, n_acc = module._wgrad_plan(a["w_ptr"]["shape"][0], prec)
            tile = dict(BLOCK_I=bi, BLOCK_O=bo, N_ACC=n_acc if a["N_ACC"]["int"] else 0, IEEE=ieee)
            cfgs = module._wgrad_configs(prec) if full else []
            cfgs = [
                dict(
                    c.kwargs,
                    num_warps=c.num_warps,
                    num_stages=c.num_stages,
                    **({"maxnreg": c.maxnreg} if c.maxnreg else {}),
                )
                for c in cfgs
            ]
            out += [dict(tile, **c) for c in [module._wgrad_default(prec), *cfgs]]
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


# --------------------------------------------------------------------------- compiling and reading

_TL = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "float32": "fp32",
    "float64": "fp64",
    "int64": "i64",
    "int32": "i32",
    "bool": "i1",
    "int8": "i8",
}


def _signature(fn, args: dict):
    """Triton signature, constexprs and divisibility attributes of a recorded launch, as the launcher sees it."""
    import triton

    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = args[name]
        if param.is_constexpr:
            sig[name] = "constexpr"
            consts[name] = triton.language.dtype(v["tldtype"]) if "tldtype" in v else v.get("int", v.get("value"))
        elif "tensor" in v:
            sig[name] = "*" + _TL[v["tensor"]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif "int" in v:
            n = v["int"]
            if n == 1:  # as the launcher: an int argument equal to 1 becomes a constant
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -(2**31) <= n < 2**31 else "i64"
                if n % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif "float" in v:
            sig[name] = "fp32"
        else:
            raise ValueError(f"{name}: {v}")
    return sig, consts, attrs


@dataclass
class Result:
    kernel: str
    arch: int
    config: dict
    constants: dict
    dtype: str = ""  # of the first tensor argument
    registers: int = 0
    spill_bytes: int = 0  # stores + loads
    shared: int = 0
    has_dot: bool = False
    mma: str = "-"  # "wgmma", "mma", "fma" or "-" (no dot)
    pipelined: bool | None = None  # None: no dot loop
    wgmma_in_flight: bool | None = None  # sm_90 MMA kernels only
    error: str = ""
    problems: list = field(default_factory=list)

    @property
    def ieee(self) -> bool:
        return bool(self.config.get("IEEE", self.constants.get("IEEE", 0)))


def _loops(ttgir: str) -> list[str]:
    """Text of every scf.for loop body (one entry per loop, nested loops inside their parent's)."""
    lines = ttgir.splitlines()
    out = []
    for i, line in enumerate(lines):
        if "scf.for" in line and line.rstrip().endswith("{"):
            indent = len(line) - len(line.lstrip())
            body = [line]
            for nxt in lines[i + 1 :]:
                body.append(nxt)
                if nxt.strip().startswith("}") and len(nxt) - len(nxt.lstrip()) == indent:
                    break
            out.append("\n".join(body))
    return out


_DOT = re.compile(r"\b(tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma)\b")


def read_pipelining(ttgir: str) -> tuple[bool | None, bool | None]:
    """(loads pipelined, wgmma in flight) over the innermost loops that contain a dot; None: no such loop."""
    dot_loops = [body for body in _loops(ttgir) if _DOT.search(body)]
    # innermost: a dot loop that contains no other dot loop
    inner = [b for b in dot_loops if not any(o is not b and o in b for o in dot_loops)]
    if not inner:
        return None, None
    loads = True
    wgmma = None
    for body in inner:
        async_copy = re.search(r"ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local", body)
        waits = [int(n) for n in re.findall(r"ttg\.async_wait[^\n]*\{num = (\d+)", body)]
        barrier_ring = "ttng.wait_barrier" in body
        loads = loads and bool(async_copy) and (any(n > 0 for n in waits) or barrier_ring)
        if "ttng.warp_group_dot " in body:
            # The waits at the loop body's own level (a wait inside an scf.if, such as the
            # weight gradient's per-sample flush, runs only on that branch).
            lines = body.splitlines()
            level = len(lines[1]) - len(lines[1].lstrip())
            pend = [
                int(m.group(1))
                for line in lines
                if len(line) - len(line.lstrip()) == level
                for m in [re.search(r"warp_group_dot_wait[^\n]*pendings = (\d+)", line)]
                if m
            ]
            ok = bool(pend) and min(pend) > 0
            wgmma = ok if wgmma is None else wgmma and ok
    return loads, wgmma


def _ptxas(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` with the flags Triton uses."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [path, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o", src + ".o"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spill


def compile_one(job: tuple) -> Result:
    """Compile one (record, config, arch) job and read it. Runs in a non-interpreting process."""
    rec, cfg, arch = job
    import triton
    from triton.backends.compiler import GPUTarget

    module = importlib.import_module(rec["module"])
    fn = getattr(module, rec["kernel"])
    args = {**rec["args"], **{k: {"int": v} for k, v in cfg.items() if k in fn.arg_names}}
    options = {k: v for k, v in cfg.items() if k not in fn.arg_names}
    sig, consts, attrs = _signature(fn, args)
    res = Result(
        rec["kernel"],
        arch,
        cfg,
        {k: str(v) if not isinstance(v, int) else v for k, v in consts.items() if k.isupper()},
        dtype=next(v["tensor"] for v in rec["args"].values() if "tensor" in v),
    )
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        if not ck.asm.get("cubin"):
            raise RuntimeError("no cubin")
        res.registers, res.spill_bytes = _ptxas(ck.asm["ptx"], arch)
    except Exception as e:  # reported as a failure of this config
        res.error = f"{type(e).__name__}: {str(e)[:1500]}"
        return res
    meta = ck.metadata
    res.shared = int(meta["shared"] if isinstance(meta, dict) else meta.shared)
    ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
    res.has_dot = bool(_DOT.search(ttgir))
    if res.has_dot:
        res.mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "fma"
        res.pipelined, res.wgmma_in_flight = read_pipelining(ttgir)
    return res


def failures_of(r: Result) -> list[str]:
    """What a result breaks of the module docstring's criteria."""
    if r.error:
        return [f"does not compile: {r.error}"]
    out = []
    if r.spill_bytes:
        out.append(f"spills {r.spill_bytes} bytes ({r.registers} registers)")
    if r.has_dot and not r.ieee:
        want = "wgmma" if r.arch == 90 else "mma"
        if r.mma != want:
            out.append(f"uses {r.mma}, not {want}")
        if not r.pipelined:
            out.append("main loop loads not pipelined (no async copies in flight across iterations)")
        if r.arch == 90 and r.mma == "wgmma" and not r.wgmma_in_flight and r.kernel not in SERIAL_WGMMA:
            out.append("wgmma waited with pendings = 0 in the main loop (MMA not overlapped)")
    return out


# The arguments that shape a kernel's main loop; the others only change its epilogue (what
# is added and stored after the loop). By default one launch per main loop is compiled: the
# one with the most epilogue flags set (the heaviest epilogue); ``full`` compiles every one.
MAIN_LOOP_ARGS = {"_mixed_matmul_kernel": ("a_ptr", "w_ptr", "TOPK", "s_ak", "s_al", "s_wk", "s_wn")}
EPILOGUE_FLAGS = {"_mixed_matmul_kernel": ("HAS_BIAS", "ADD_ONE", "HAS_ADDEND", "STORE_Y", "STORE_Z")}


def jobs_for(records: list[dict], full: bool, archs=(90, 80)) -> list[tuple]:
    """(record, config, arch) for every distinct compilation: launches that differ only in
    run-time integers that specialise alike (== 1, divisible by 16) compile to the same code."""
    chosen: dict[str, tuple] = {}
    for rec in records:
        epilogue = () if full else EPILOGUE_FLAGS.get(rec["kernel"], ())
        weight = sum(bool(rec["args"][f].get("int", rec["args"][f].get("value"))) for f in epilogue)
        for cfg in gpu_configs(rec, full):
            spec = {}
            main = None if full else MAIN_LOOP_ARGS.get(rec["kernel"])
            for name, v in rec["args"].items():
                if name in cfg or (main is not None and name not in main):
                    continue
                if "tensor" in v:
                    spec[name] = v["tensor"]  # compiled code depends on the dtype only
                elif name in rec["constexprs"] or "int" not in v:
                    spec[name] = v
                else:
                    n = v["int"]
                    spec[name] = (n == 1, n % 16 == 0, -(2**31) <= n < 2**31)
            key = json.dumps([rec["kernel"], spec, cfg], sort_keys=True, default=str)
            if key not in chosen or weight > chosen[key][0]:
                chosen[key] = (weight, rec, cfg)
    return [(rec, cfg, arch) for _, rec, cfg in chosen.values() for arch in archs]


def run_jobs(jobs: list[tuple], workers: int | None = None) -> list[Result]:
    """Compile jobs in ``workers`` subprocesses that do not interpret (Triton reads the flag at import)."""
    if not jobs:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from switch_dit.kernels.static_check import _worker; _worker()"
    shards = [jobs[i::workers] for i in range(workers)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in shards
    ]
    outs = [p.communicate(json.dumps(shard)) for p, shard in zip(procs, shards)]
    results: list[list[Result]] = []
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"a compile worker failed:\n{err[-4000:]}")
        results.append([Result(**r) for r in json.loads(out.strip().splitlines()[-1])])
    # back in job order
    return [results[i % workers][i // workers] for i in range(len(jobs))]


def _worker() -> None:
    """Compile the JSON list of jobs on stdin; one JSON list of results on stdout."""
    jobs = json.loads(sys.stdin.read())
    print(json.dumps([asdict(compile_one(tuple(job))) for job in jobs], default=str))


def check(full: bool | None = None, records: list[dict] | None = None) -> list[Result]:
    """Record, compile and read every default launch (every autotuning candidate with ``full``,
    default: SWITCH_DIT_PTXAS_CHECK=1); each Result's ``problems`` lists its failures."""
    if full is None:
        full = os.environ.get("SWITCH_DIT_PTXAS_CHECK", "0") not in ("", "0")
    results = run_jobs(jobs_for(records if records is not None else record_launches(), full))
    for r in results:
        r.problems = failures_of(r)
    return results


def as_json(results: list[Result]) -> str:
    return json.dumps([asdict(r) for r in results], default=str)
