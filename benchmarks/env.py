"""Where a run happened: device name and slug, peak rates, software versions, git commit.

The floors of DESIGN.md §4 divide the work by the device's *measured* peak rates, not
the datasheet's: a kernel at 100% of a datasheet number is impossible, so a floor built
from it would hide how close a kernel really is. ``PEAKS`` holds one entry per device
family, matched by name; ``measure_peaks`` re-measures them on the spot (a large GEMM
and a large copy) and every run records both, so a table entry can be checked later.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Peaks:
    """Sustained rates: dense tensor-core FLOP/s per dtype and device-memory bytes/s."""

    flops: dict  # dtype name ("bf16", "fp16", "fp32") -> FLOP/s
    bytes_per_s: float
    source: str


# Matched in order against the lower-cased device name; the first hit wins, so the
# specific names (PCIe, NVL) come before the generic one.
PEAKS: list[tuple[str, Peaks]] = [
    ("h200", Peaks({"bf16": 790e12, "fp16": 790e12, "fp32": 51e12}, 4.3e12,
                   "estimate: H100 compute (same die), ~90% of the 4.8 TB/s datasheet memory rate")),
    ("h100 pcie", Peaks({"bf16": 600e12, "fp16": 600e12, "fp32": 40e12}, 1.8e12,
                        "estimate: ~80% of the PCIe datasheet rates")),
    ("h100", Peaks({"bf16": 790e12, "fp16": 790e12, "fp32": 51e12}, 3.0e12,
                   "measured on the project's lent H100 SXM machines (DESIGN.md §4)")),
    ("a100", Peaks({"bf16": 280e12, "fp16": 280e12, "fp32": 19e12}, 1.7e12,
                   "estimate: ~90% of the 312 TFLOP/s / ~85% of the 2.0 TB/s datasheet rates")),
]
# A nominal entry so that CPU smoke runs fill every field; its floors mean nothing.
CPU_PEAKS = Peaks({"bf16": 1e12, "fp16": 1e12, "fp32": 1e12}, 50e9, "nominal CPU placeholder (smoke runs only)")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({platform.processor() or 'unknown'})"


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def peaks_for(name: str, measured: Peaks | None = None) -> Peaks:
    """The table entry for a device name; a measured set for unknown GPUs; CPU_PEAKS on CPUs."""
    low = name.lower()
    for key, peaks in PEAKS:
        if key in low:
            return peaks
    if low.startswith("cpu"):
        return CPU_PEAKS
    if measured is not None:
        return Peaks(measured.flops, measured.bytes_per_s, "measured in this run (device not in the table)")
    return CPU_PEAKS


def measure_peaks(device: torch.device, seconds: float = 0.5) -> Peaks:
    """Quick sustained rates: a square bf16 GEMM and a device-to-device copy.

    Best of a few repeats, so one slow launch does not lower the estimate. On the CPU
    this uses small sizes and finishes in well under a second.
    """
    big = device.type == "cuda"
    n = 8192 if big else 256
    # On the CPU only fp32 is measured (bf16 matmuls there say nothing about anything).
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32} if big else {"fp32": torch.float32}
    out: dict = {}
    for name, dtype in dtypes.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out[name] = 2 * n**3 / _best_seconds(lambda: a @ b, device, seconds)
    out.setdefault("bf16", out["fp32"])
    out.setdefault("fp16", out["fp32"])
    m = (1 << 28) if big else (1 << 20)  # 1 GiB of fp32 on the GPU
    src = torch.randn(m, device=device)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * src.element_size() / _best_seconds(lambda: dst.copy_(src), device, seconds)
    return Peaks(out, bw, "measured in this run: best of a few repeats, 8192^3 GEMM and a 1 GiB copy")


def _best_seconds(fn, device: torch.device, budget: float) -> float:
    fn()  # warm-up (cuBLAS handle, allocator)
    best, spent = float("inf"), 0.0
    while spent < budget or best == float("inf"):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = (time.perf_counter() - t0) / 3
        best, spent = min(best, dt), spent + 3 * dt
    return best


def git_commit() -> dict:
    """HEAD commit and whether the working tree differs from it (None outside git)."""

    def git(*args):
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit = status = None
    if commit is None and os.environ.get("SWITCH_DIT_GIT_COMMIT"):
        # A copy of the tree without .git (a lent GPU machine): the commit, passed along.
        return {"commit": os.environ["SWITCH_DIT_GIT_COMMIT"], "dirty": None}
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "platform": platform.platform(),
    }


def device_info(device: torch.device) -> dict:
    name = device_name(device)
    info = {"name": name, "slug": slugify(name), "kind": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
        )
    return info


def peaks_record(peaks: Peaks) -> dict:
    return asdict(peaks)


def today() -> str:
    return _dt.date.today().isoformat()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
