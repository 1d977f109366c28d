"""How ``backend="auto"`` chooses a strategy (docs/design.md §3).

The rule, per op call:
  1. CPU tensors run "reference". The Triton kernels need a GPU (on the CPU only the
     interpreter runs them, a test tool orders of magnitude slower), and the other strategies
     exist to save GPU memory traffic and launches; ATen's eager CPU kernels are the fastest
     thing we have there, and exact.
  2. Only one supported candidate (e.g. float64 on a GPU, which the kernels do not take):
     it runs.
  3. On a GPU, the first call with a new key (device, torch/triton versions, op, the shapes
     and dtypes of the tensor arguments (so M and k), whether gradients are needed) times every
     tunable strategy that supports the inputs, forward plus backward when gradients are needed,
     keeps the fastest, and caches the choice in memory and on disk
     (``$SWITCH_DIT_CACHE_DIR/strategies.json``, default ``~/.cache/switch_dit``), as Triton's
     autotuner does. Later processes read it back.
  4. No timing inside CUDA-graph capture, while torch.compile traces, with
     ``SWITCH_DIT_AUTOTUNE=0``, or in deterministic mode
     (``torch.use_deterministic_algorithms(True)``). Under capture a choice already cached for
     the key is used (the eager warm-up before a capture has timed it); otherwise the shipped
     table ``switch_dit.ops.strategy_table`` decides, whose entries say whether they were
     measured: always while torch.compile traces (the tracer follows this code, so there it is
     dictionary lookups only), with ``SWITCH_DIT_AUTOTUNE=0`` and in deterministic mode (where
     the choice must not depend on a timing).

Timing uses the real arguments; ``torch.autograd.grad`` gives the backward without touching
any ``.grad``. ``_measure`` is the one clock, ``_on_gpu`` the one device test (tests replace
them with fakes).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from switch_dit.ops import dispatch, strategy_table
from switch_dit.ops.dispatch import REFERENCE, Strategy

__all__ = ["choose", "cache_path", "clear_memory_cache", "timing_allowed"]

log = logging.getLogger("switch_dit.ops")

_MEMORY: dict[str, str] = {}  # key -> measured fastest strategy, this process and the disk cache
_FROM_TABLE: dict[str, str] = {}  # key -> the shipped table's choice (made once per key, then logged)
_DECIDED: dict[tuple, str] = {}  # (op, device, grad, shapes and dtypes) -> measured choice: the per-call lookup
_DECIDED_BY_TABLE: dict[tuple, str] = {}  # the same, for SWITCH_DIT_AUTOTUNE=0 and deterministic mode
_DISK_LOADED = False
_CACHE_VERSION = 1


def cache_path() -> Path:
    """Where measured choices are kept: $SWITCH_DIT_CACHE_DIR/strategies.json (default ~/.cache/switch_dit)."""
    root = os.environ.get("SWITCH_DIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "switch_dit")
    return Path(root) / "strategies.json"


def clear_memory_cache() -> None:
    """Forget this process's choices (the disk cache is read again on the next choice)."""
    global _DISK_LOADED
    _MEMORY.clear()
    _FROM_TABLE.clear()
    _DECIDED.clear()
    _DECIDED_BY_TABLE.clear()
    _DISK_LOADED = False


# --------------------------------------------------------------------------- when timing is allowed


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _autotune_env() -> bool:
    return os.environ.get("SWITCH_DIT_AUTOTUNE", "1") not in ("", "0")


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def _table_only() -> Optional[str]:
    """Why only the shipped table may decide (the choice must not depend on a timing), or None."""
    if not _autotune_env():
        return "SWITCH_DIT_AUTOTUNE=0"
    if _deterministic():
        return "deterministic mode"
    return None


def timing_allowed() -> Optional[str]:
    """None when "auto" may time candidates now, else why it may not."""
    if _table_only():
        return _table_only()
    if _capturing():
        return "inside CUDA-graph capture"
    if _compiling():
        return "while torch.compile traces"
    return None


# --------------------------------------------------------------------------- the key and the disk cache


@functools.lru_cache(maxsize=None)
def _versions() -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"torch {torch.__version__}, triton {triton_version}"


_DEVICE_NAMES: dict[torch.device, str] = {}


def _device_name(device: torch.device) -> str:
    if device not in _DEVICE_NAMES:
        _DEVICE_NAMES[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return _DEVICE_NAMES[device]


def _key(op: str, device: torch.device, tensors: list[Tensor], grad: bool) -> str:
    name = _device_name(device)
    shapes = ";".join(f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}" for t in tensors)
    return f"{name} | {_versions()} | {op} | {shapes} | grad={int(grad)}"


def _read_disk() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("choices"), dict):
        return {}
    return data["choices"]


def _load_disk_once() -> None:
    global _DISK_LOADED
    if not _DISK_LOADED:
        _DISK_LOADED = True
        for key, entry in _read_disk().items():
            if isinstance(entry, dict) and isinstance(entry.get("strategy"), str):
                _MEMORY.setdefault(key, entry["strategy"])


def _write_disk(key: str, entry: dict) -> None:
    """Merge one choice into the cache file; atomic (temp file + rename), so readers never see half a file."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        choices = _read_disk()
        choices[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".strategies.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _CACHE_VERSION, "choices": choices}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:  # a read-only home must not stop training: the choice stays in memory
        log.warning("switch_dit: could not write the strategy cache %s: %s", path, err)


# --------------------------------------------------------------------------- timing


def _on_gpu(device: torch.device) -> bool:
    return dispatch.on_gpu(device)


def _measure(strategy: Strategy, fn: Callable[[], object], repeat: int = 5) -> float:
    """Median seconds of fn() (one run of ``strategy``) on the current CUDA stream, after one
    warm-up call (which also runs Triton's own autotuning and compiles)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _run_once(strategy: Strategy, args, kw, grad_inputs: list[Tensor]) -> Callable[[], object]:
    def run():
        out = strategy.impl(*args, **kw)
        if not grad_inputs:
            return out
        outs = out if isinstance(out, (tuple, list)) else (out,)
        outs = [o for o in outs if isinstance(o, Tensor) and o.requires_grad]
        return torch.autograd.grad(outs, grad_inputs, [torch.ones_like(o) for o in outs], allow_unused=True)

    return run


# --------------------------------------------------------------------------- the choice


def _candidates(table: dict[str, Strategy], args, kw) -> list[Strategy]:
    """The tunable strategies that support these inputs, and always the reference."""
    found = [s for s in table.values() if s.tunable and s.why_not(args, kw) is None]
    return found if table[REFERENCE] in found else [*found, table[REFERENCE]]


def _from_table(op: str, candidates: list[Strategy], device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The shipped table's choice among the candidates, and where it came from."""
    # A device first seen while torch.compile traces has no name yet (asking CUDA is not
    # traceable): it takes the table's "*" row.
    name = _DEVICE_NAMES.get(device, "") if _compiling() else _device_name(device)
    return strategy_table.lookup(name, op, dtype, [s.name for s in candidates])


def choose(op: str, table: dict[str, Strategy], args, kw) -> tuple[Strategy, str]:
    """The strategy "auto" runs for this call, and why (see the module doc)."""
    tensors = [a for a in (*args, *kw.values()) if isinstance(a, Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    if not _on_gpu(device):
        return table[REFERENCE], f"auto: {device.type} tensors run the reference (the kernels need a GPU)"
    if _compiling():
        # torch.compile traces this code: only dictionary lookups here, no timing, no files, no logging.
        name, source = _from_table(op, _candidates(table, args, kw), device, tensors[0].dtype)
        return table[name], f"auto: shipped table ({source}); no timing: while torch.compile traces"
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # The hot path of every later call with this signature: one tuple, one dict lookup.
    signature = (op, device, grad, tuple((t.shape, t.dtype) for t in tensors))
    table_only = _table_only()
    if table_only is None and signature in _DECIDED:
        return table[_DECIDED[signature]], f"auto: measured fastest earlier, cached ({cache_path()})"
    if table_only is not None and signature in _DECIDED_BY_TABLE:
        return table[_DECIDED_BY_TABLE[signature]], f"auto: shipped table; no timing: {table_only}"
    candidates = _candidates(table, args, kw)
    if len(candidates) == 1:
        return candidates[0], "auto: the only strategy that supports these inputs"
    key = _key(op, device, tensors, grad)
    forbidden = timing_allowed()
    if table_only is None:
        _load_disk_once()
        cached = _MEMORY.get(key)
        if cached in table and table[cached] in candidates:
            _DECIDED[signature] = cached
            return table[cached], f"auto: measured fastest earlier, cached ({cache_path()})"
    if forbidden is not None:
        name, source = _from_table(op, candidates, device, tensors[0].dtype)
        if _FROM_TABLE.get(key) != name:
            _FROM_TABLE[key] = name
            log.debug("switch_dit: auto chose %r for %s from the shipped table (%s)", name, key, source)
        if table_only is not None:  # (capture is a passing state: not remembered)
            _DECIDED_BY_TABLE[signature] = name
        return table[name], f"auto: shipped table ({source}); no timing: {forbidden}"
    grad_inputs = [t for t in tensors if t.requires_grad] if grad else []
    with dispatch.on_device(tensors[0]):
        times = {s.name: _measure(s, _run_once(s, args, kw, grad_inputs)) for s in candidates}
    best = min(times, key=times.get)
    _MEMORY[key] = best
    _DECIDED[signature] = best
    _write_disk(key, {"strategy": best, "seconds": times})
    shown = ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in sorted(times.items(), key=lambda item: item[1]))
    log.debug("switch_dit: auto chose %r for %s (%s)", best, key, shown)
    return table[best], f"auto: measured fastest ({shown})"
