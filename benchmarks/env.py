"""Where a run happened: device name and slug, peak rates, software versions, provenance.

Two sets of peak rates, both recorded (benchmarks/README.md, "Definitions"):
  - measured: ``measure_peaks`` times an 8192^3 bf16 matmul (and fp16, fp32) and a 1 GiB
    device-to-device copy in the same run. The floors of docs/design.md §5 and the
    "MFU (measured peak)" use these: a kernel cannot beat what cuBLAS reaches on this card today.
  - datasheet: ``DATASHEET``, the vendor's dense (no sparsity) tensor-core rates and memory
    bandwidth, matched by device name. "MFU (datasheet)" uses them. An unknown device has none:
    its rows carry the measured figures only.
Nothing here is claimed as measured unless the run measured it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
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
    """Rates: dense tensor-core FLOP/s per dtype and device-memory bytes/s."""

    flops: dict  # dtype name ("bf16", "fp16", "fp32") -> FLOP/s
    bytes_per_s: float
    source: str


# Vendor datasheets, dense rates (the sparsity figures are twice these). fp32 is the plain
# (non-TF32) rate. Matched in order against the lower-cased device name; the first hit wins,
# so the specific names (NVL, PCIe) come before the generic ones.
DATASHEET: list[tuple[str, Peaks]] = [
    ("h200 nvl", Peaks({"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}, 4.8e12, "NVIDIA H200 NVL datasheet")),
    ("h200", Peaks({"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 4.8e12, "NVIDIA H200 SXM datasheet")),
    ("h100 nvl", Peaks({"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}, 3.9e12, "NVIDIA H100 NVL datasheet")),
    ("h100 pcie", Peaks({"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}, 2.0e12, "NVIDIA H100 PCIe datasheet")),
    ("h100", Peaks({"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 3.35e12, "NVIDIA H100 SXM datasheet")),
    (
        "a100 80gb pcie",
        Peaks({"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 1.935e12, "NVIDIA A100 80GB PCIe datasheet"),
    ),
    (
        "a100-sxm4-80gb",
        Peaks({"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 2.039e12, "NVIDIA A100 80GB SXM datasheet"),
    ),
    ("a100", Peaks({"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 1.555e12, "NVIDIA A100 40GB datasheet")),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({platform.processor() or 'unknown'})"


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def datasheet_for(name: str) -> Peaks | None:
    """The datasheet entry of a device name; None for an unknown device (and for CPUs)."""
    low = name.lower()
    for key, peaks in DATASHEET:
        if key in low:
            return peaks
    return None


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
        out[name] = 2 * n**3 / _best_seconds(lambda a=a, b=b: a @ b, device, seconds)
    out.setdefault("bf16", out["fp32"])
    out.setdefault("fp16", out["fp32"])
    m = (1 << 28) if big else (1 << 20)  # 1 GiB of fp32 on the GPU
    src = torch.randn(m, device=device)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * src.element_size() / _best_seconds(lambda: dst.copy_(src), device, seconds)
    what = "8192^3 matmul and a 1 GiB copy" if big else "256^3 fp32 matmul and a 4 MiB copy (CPU)"
    return Peaks(out, bw, f"measured in this run: best of a few repeats of a {what}")


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


# What the results' provenance counts as source: an untracked file of these kinds makes the tree dirty.
SOURCE_SUFFIXES = (".py", ".cu", ".cpp", ".h", ".toml", ".txt", ".cfg", ".yaml", ".yml")
SOURCE_NAMES = ("Makefile", "CMakeLists.txt")
RESULTS_PREFIX = "benchmarks/results/"


def _is_source(path: str) -> bool:
    return path.endswith(SOURCE_SUFFIXES) or path.rsplit("/", 1)[-1] in SOURCE_NAMES


def source_digest(root: Path | None = None) -> str:
    """sha256 (16 hex digits) of the package, kernel, C++ and benchmark sources: the same on any
    copy of the same tree, .git or not (a lent GPU machine gets the tree without .git)."""
    root = REPO_ROOT if root is None else root
    h = hashlib.sha256()
    for folder in ("switch_dit", "kernels", "csrc", "benchmarks"):
        for p in sorted((root / folder).rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_symlink() or not p.is_file() or not _is_source(rel) or "__pycache__" in rel:
                continue
            if rel.startswith(RESULTS_PREFIX):
                continue
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_commit() -> dict:
    """HEAD commit, whether the tree differs from it, and the source digest.

    dirty: a tracked file is modified, or an untracked source file (not ignored) exists;
    the results folder does not count (a run writes its own file there). None outside git.
    """

    def git(*args):
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout if r.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=all")
    except (OSError, subprocess.SubprocessError):
        commit = status = None
    digest = source_digest()
    if commit is None:
        # A copy of the tree without .git (a lent GPU machine): the commit, when passed along.
        return {"commit": os.environ.get("SWITCH_DIT_GIT_COMMIT"), "dirty": None, "source_digest": digest}
    dirty = None
    if status is not None:
        changed = []
        for line in status.splitlines():
            code, path = line[:2], line[3:].strip().strip('"')
            if path.startswith(RESULTS_PREFIX) or (code == "??" and not _is_source(path)):
                continue
            changed.append(path)
        dirty = bool(changed)
    return {"commit": commit.strip(), "dirty": dirty, "source_digest": digest}


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


def peaks_record(peaks: Peaks | None) -> dict | None:
    return None if peaks is None else asdict(peaks)


def today() -> str:
    return _dt.date.today().isoformat()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
