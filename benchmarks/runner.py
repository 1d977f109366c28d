"""Runs benchmark cases one by one, turning each into result rows.

A ``Case`` is one implementation (variant) of one benchmark at one shape and dtype; its
``build`` does the set-up (inputs, model, torch.compile wrapper) and returns a function
``mode -> zero-argument callable``. Failures never stop the run: ``Unavailable`` becomes
a skipped row, any other exception an error row with the exception's last line, and the
next case runs. The results file is saved after every row, and a time limit skips
whatever would start too late, so one command always leaves a usable file.
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapters import Unavailable
from .results import Results, make_row, row_key
from .timing import Timer


@dataclass
class Case:
    suite: str
    bench: str
    variant: str
    shape: dict
    dtype: str
    modes: tuple
    build: Callable[[], Callable[[str], Callable[[], object]]]
    work: Callable[[str], dict]
    quick: bool = True
    heavy: bool = False  # compiles a large graph or trains a large model: needs more time left
    compiled: bool = False  # reset dynamo afterwards, so compiled graphs do not pile up
    measure: Callable | None = None  # (ctx, fn, case, mode) -> row fields; default: op timing
    note: str = ""
    role: str = "baseline"  # "strategy" (the fast path), "auto", "baseline" or "floor": recorded in extra.role

    def key(self, mode: str) -> tuple:
        return row_key(
            {
                "suite": self.suite,
                "bench": self.bench,
                "variant": self.variant,
                "mode": mode,
                "shape": self.shape,
                "dtype": self.dtype,
            }
        )


@dataclass
class Context:
    device: torch.device
    timer: Timer
    results: Results
    run_id: int
    peaks: dict  # measured in this run: the floors
    datasheet: dict | None = None  # the device's datasheet rates (None: unknown device)
    provenance: dict = field(default_factory=dict)  # results.PROVENANCE_FIELDS, stamped on every row
    smoke: bool = False
    repeats: int = 1
    deadline: float = float("inf")  # time.monotonic() after which nothing new starts
    heavy_margin_s: float = 120.0
    light_margin_s: float = 15.0
    resume: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    log: Callable[[str], None] = print
    counts: dict = field(default_factory=lambda: {"ok": 0, "skipped": 0, "error": 0, "resumed": 0})


# A case's rows are written with this reason before it runs, and replaced when it ends: a
# case killed mid-run (the device's per-command limit, a hang) leaves this row behind.
UNFINISHED = "did not finish: the process was killed or timed out during this case"


def run_cases(ctx: Context, cases: list[Case]) -> None:
    for case in cases:
        modes = [m for m in case.modes if not (ctx.resume and ctx.results.has_ok(case.key(m)))]
        ctx.counts["resumed"] += len(case.modes) - len(modes)
        if not modes:
            continue
        if ctx.resume and any(ctx.results.reason(case.key(m)).startswith(UNFINISHED) for m in modes):
            # Killed once already: running it again would likely take the whole call again.
            for mode in modes:
                _record(
                    ctx,
                    case,
                    mode,
                    status="skipped",
                    reason=f"{UNFINISHED} in an earlier run; not retried by --resume "
                    "(run it alone with --only / --models and a longer --time-limit)",
                )
            continue
        margin = ctx.heavy_margin_s if case.heavy else ctx.light_margin_s
        if time.monotonic() + margin > ctx.deadline:
            for mode in modes:
                _record(
                    ctx,
                    case,
                    mode,
                    status="skipped",
                    reason="time limit reached before this case (rerun with --resume to continue)",
                )
            continue
        for mode in modes:
            _record(ctx, case, mode, count=False, status="error", reason=UNFINISHED)
        _run_case(ctx, case, modes)


def _run_case(ctx: Context, case: Case, modes: list[str]) -> None:
    label = f"{case.suite}/{case.bench} {case.variant} {_shape_text(case.shape)} {case.dtype}"
    t0 = time.perf_counter()
    try:
        runner = case.build()
    except Unavailable as exc:
        for mode in modes:
            _record(ctx, case, mode, status="skipped", reason=str(exc))
        ctx.log(f"  skip  {label}: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - any failure of one variant is a row, not a crash
        for mode in modes:
            _record(ctx, case, mode, status="error", reason=_reason(exc))
        ctx.log(f"  ERROR {label}: {_reason(exc)}")
        _cleanup(case)
        return
    setup_s = time.perf_counter() - t0
    try:
        for mode in modes:
            try:
                fn = runner(mode)
                fields = (case.measure or measure_op)(ctx, fn, case, mode)
                fields.setdefault("extra", {})["setup_s"] = round(setup_s, 3)
                row = _record(ctx, case, mode, **fields)
                ctx.log(
                    f"  ok    {label} {mode}: {row['ms']['median']:.4g} ms"
                    + (f" ({row['over_floor']:.2f}x floor)" if row["over_floor"] else "")
                )
            except Unavailable as exc:
                _record(ctx, case, mode, status="skipped", reason=str(exc))
                ctx.log(f"  skip  {label} {mode}: {exc}")
            except Exception as exc:  # noqa: BLE001
                _record(ctx, case, mode, status="error", reason=_reason(exc))
                ctx.log(f"  ERROR {label} {mode}: {_reason(exc)}")
            finally:
                fn = None
    finally:
        runner = None
        _cleanup(case)


def measure_op(ctx: Context, fn: Callable[[], object], case: Case, mode: str) -> dict:
    """First call (compilation, autotuning), then timing, re-timings, wall clock, memory, syncs."""
    timer = ctx.timer
    t0 = time.perf_counter()
    fn()
    timer.sync()
    first_s = time.perf_counter() - t0
    ms = timer.time(fn)
    reruns = [timer.time(fn)["median"] for _ in range(ctx.repeats - 1)]
    peak, before = timer.memory_mib(fn)
    return {
        "ms": ms,
        "reruns_ms": reruns,
        "wall_ms": timer.wall(fn),
        "peak_mem_mib": peak,
        "host_syncs": timer.host_syncs(fn),
        "extra": {"first_call_s": round(first_s, 3), "mem_before_call_mib": before},
    }


def _record(ctx: Context, case: Case, mode: str, count: bool = True, **fields) -> dict:
    row = make_row(
        suite=case.suite,
        bench=case.bench,
        variant=case.variant,
        mode=mode,
        shape=case.shape,
        dtype=case.dtype,
        work=_safe_work(case, mode),
        peaks=ctx.peaks,
        run=ctx.run_id,
        provenance=ctx.provenance,
        **fields,
    )
    if case.note:
        row["extra"].setdefault("note", case.note)
    row["extra"].setdefault("role", case.role)
    ctx.results.add(row)
    if count:
        ctx.counts[row["status"]] += 1
    return row


def _safe_work(case: Case, mode: str) -> dict:
    try:
        return case.work(mode)
    except Exception:  # noqa: BLE001 - a work formula must not lose a timing
        return {"flops": 0.0, "bytes": 0.0}


def _reason(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return (last[:400] + where) or type(exc).__name__


def _cleanup(case: Case) -> None:
    if case.compiled:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _shape_text(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())
