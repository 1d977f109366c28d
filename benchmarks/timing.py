"""Timing, peak memory and host-sync counts for one callable.

GPU: CUDA events through ``triton.testing.do_bench`` (median with the 20th/80th
percentiles; do_bench also flushes the L2 cache before every call). Because that flush
gives the host a head start, a launch-bound callable looks faster under do_bench than
it is in a loop, so every row also carries ``wall_ms``: calls back to back, wall clock
between two synchronisations, divided by the count.
CPU (smoke mode): ``time.perf_counter`` around each call.

Callables take no arguments; inputs are rotated through several random sets inside
them (``rotate``), so no cache is warm with the exact data being timed.
"""

from __future__ import annotations

import itertools
import time
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

QUANTILES = (0.5, 0.2, 0.8)


def rotate(items: Sequence):
    """A function returning the items in turn, forever."""
    it = itertools.cycle(items)
    return lambda: next(it)


class Timer:
    """Times zero-argument callables on one device.

    warmup_ms / rep_ms: do_bench's budgets (GPU). cpu_warmup / cpu_iters: calls on the CPU.
    wall_iters: back-to-back calls for ``wall_ms``.
    """

    def __init__(
        self,
        device: torch.device,
        warmup_ms: int = 25,
        rep_ms: int = 100,
        cpu_warmup: int = 1,
        cpu_iters: int = 5,
        wall_iters: int = 20,
    ):
        self.device = device
        self.cuda = device.type == "cuda"
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.cpu_warmup, self.cpu_iters = cpu_warmup, cpu_iters
        self.wall_iters = wall_iters

    @property
    def method(self) -> str:
        return "triton.testing.do_bench (CUDA events)" if self.cuda else "time.perf_counter"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> dict:
        """{"median", "p20", "p80"} in milliseconds."""
        if self.cuda:
            from triton.testing import do_bench

            med, p20, p80 = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=list(QUANTILES))
            return {"median": float(med), "p20": float(p20), "p80": float(p80)}
        for _ in range(self.cpu_warmup):
            fn()
        samples = []
        for _ in range(self.cpu_iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return quantiles_ms(samples)

    def wall(self, fn: Callable[[], object], iters: int | None = None) -> float | None:
        """Mean milliseconds per call, calls issued back to back (host overhead included).

        None on the CPU, where every call is synchronous and ``time`` already says it.
        """
        if not self.cuda:
            return None
        iters = iters or self.wall_iters
        self.sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3 / iters

    def step_times(self, fn: Callable[[], object], iters: int) -> list[float]:
        """Milliseconds of each of ``iters`` back-to-back calls (CUDA events around each)."""
        if not self.cuda:
            out = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        self.sync()
        return [start.elapsed_time(end) for start, end in events]

    def memory_mib(self, fn: Callable[[], object]) -> tuple[float | None, float | None]:
        """(peak, before): allocated device memory (MiB) at its peak during one call and just
        before it (inputs, weights, retained graphs); (None, None) on the CPU."""
        if not self.cuda:
            return None, None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) / 2**20, before / 2**20

    def event_waits(self, fn: Callable[[], object], calls: int = 1) -> float | None:
        """Host waits on CUDA events or streams per call (the sync debug mode does not see them)."""
        if not self.cuda:
            return None
        return count_event_waits(fn, calls)

    def host_syncs(self, fn: Callable[[], object], calls: int = 1) -> float | None:
        """Synchronising CUDA operations per call, counted by torch's sync debug mode."""
        if not self.cuda:
            return None
        return count_host_syncs(fn, calls)


def quantiles_ms(samples: Sequence[float]) -> dict:
    arr = np.asarray(samples, dtype=np.float64)
    med, p20, p80 = (float(np.quantile(arr, q)) for q in QUANTILES)
    return {"median": med, "p20": p20, "p80": p80}


def count_host_syncs(fn: Callable[[], object], calls: int = 1) -> float:
    """Calls ``fn`` ``calls`` times under ``torch.cuda.set_sync_debug_mode("warn")``.

    Every synchronising operation (``.item()``, ``.tolist()``, ``nonzero``, a copy to
    the host...) raises a warning that is captured here and counted; the mean per call
    is returned. The mode is restored before the final synchronize, which is not counted.
    """
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    n = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return n / calls


def count_event_waits(fn: Callable[[], object], calls: int = 1) -> float:
    """Calls ``fn`` ``calls`` times counting Event.synchronize, Stream.synchronize and
    torch.cuda.synchronize: host waits that torch's sync debug mode does not report (the
    fast path's prior matcher waits on the previous step's event, normally long done)."""
    count = [0]
    patched = [(torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda, "synchronize")]
    saved = [getattr(owner, name) for owner, name in patched]

    def counting(original):
        def wrapper(*args, **kwargs):
            count[0] += 1
            return original(*args, **kwargs)

        return wrapper

    for (owner, name), original in zip(patched, saved):
        setattr(owner, name, counting(original))
    try:
        for _ in range(calls):
            fn()
    finally:
        for (owner, name), original in zip(patched, saved):
            setattr(owner, name, original)
    torch.cuda.synchronize()
    return count[0] / calls
