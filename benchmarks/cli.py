"""``python -m benchmarks``: run the suites, write the results file, regenerate the report."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

SUITES = ("ops", "block", "step")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="only the cases behind the issue targets (GPU)")
    mode.add_argument(
        "--gpu",
        action="store_true",
        help="the plan of make gpu: every op strategy at the S, B, XL widths, blocks, S/2 and XL/2 "
        "steps (benchmarks/gpu.py runs it phase by phase)",
    )
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="CPU smoke run: tiny shapes, fp32, Triton interpreter; results go to a temp dir",
    )
    p.add_argument(
        "--only", default=",".join(SUITES), help="comma-separated suites to run, of: ops, block, step (default: all)"
    )
    p.add_argument(
        "--models", default=None, help="comma-separated model sizes for block/step, e.g. S/2,XL/2 (default: the mode's)"
    )
    p.add_argument(
        "--out", default=None, help=f"results folder (default: {_shown(RESULTS_DIR)}; a new temp dir with --smoke)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already 'ok' in today's results file for this device (in --out, else "
        "in benchmarks/results) and run the rest",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds after which no new case starts (default 540 on a GPU, none with --smoke)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timings per case (default 2 on a GPU, 1 in smoke mode)")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; aot_eager with --smoke, where inductor's "
        "C++ compilation would take minutes: aot_eager still traces with dynamo and AOTAutograd)",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        choices=("default", "max-autotune-no-cudagraphs"),
        help="torch.compile mode (CUDA-graph modes would overwrite the retained outputs that the bwd timings replay)",
    )
    p.add_argument("--no-report", action="store_true", help="do not regenerate README.md and the chart")
    p.add_argument("--list", action="store_true", help="print the cases that would run, and exit")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in args.only if x not in SUITES]
    if bad:
        p.error(f"--only: unknown suite(s) {', '.join(bad)}; choose from {', '.join(SUITES)}")
    return args


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it is under it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def main(argv=None) -> int:
    started = time.monotonic()  # --time-limit counts from here, imports included
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "gpu" if args.gpu else "full"
    if mode == "smoke":
        # Must precede any import of a Triton kernel module: @triton.jit reads it then.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch

    try:
        from switch_dit.kernels.routed_linear import tf32_matmul_allowed
    except ImportError as e:
        print(
            f"python -m benchmarks: switch_dit is not installed ({e}); run `pip install -e . "
            "--no-build-isolation` (or `make install`) first",
            file=sys.stderr,
        )
        return 2

    from . import env
    from .results import Results
    from .results import load as load_results
    from .runner import Context, run_cases
    from .settings import settings_for
    from .timing import Timer

    if mode != "smoke" and not torch.cuda.is_available() and not args.list:
        print("python -m benchmarks: no CUDA device here. Use --smoke for the CPU smoke run.", file=sys.stderr)
        return 2
    gpu = mode != "smoke" and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    s = settings_for(mode)
    if args.models:
        sizes = tuple(m.strip() for m in args.models.split(",") if m.strip())
        s.block_sizes = s.block_quick_sizes = s.step_sizes = s.step_quick_sizes = sizes
    if args.repeats:
        s.repeats = args.repeats
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if mode == "smoke" else "inductor"
    _raise_compile_limits(torch)

    if args.list:  # the plan only: nothing is built, so this works without a GPU
        ctx_for_list = Context(device=device, timer=None, results=None, run_id=0, peaks={})
        cases = _collect(s, ctx_for_list, args.only)
        for c in cases:
            print(f"{c.suite:6s} {c.bench:28s} {c.variant:18s} {c.dtype:22s} {','.join(c.modes):16s} {c.shape}")
        print(f"{len(cases)} cases ({mode} mode)")
        return 0

    from switch_dit.ops import compiled_reference

    compile_options = dict(compiled_reference.COMPILE_OPTIONS)  # restored at the end (main may run in-process)
    if args.compile_backend != "inductor":
        # The ops' own "compiled" strategy too: inductor's C++ compilation would take minutes on
        # the CPU (recorded in the run's settings).
        compiled_reference.COMPILE_OPTIONS["backend"] = args.compile_backend

    if device.type == "cuda":
        # As the official training script (DiT's train.py): TF32 for the fp32 matmuls and
        # convolutions that autocast leaves in fp32 (the official expert GEMMs use out=).
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True

    info = env.device_info(device)
    if args.out:
        out_dir = Path(args.out)
    elif mode == "smoke":
        out_dir = Path(tempfile.mkdtemp(prefix="switch-dit-bench-"))
    elif os.environ.get("OUT"):  # a lent machine: only $OUT comes back
        out_dir = Path(os.environ["OUT"]) / "benchmark-results"
    else:
        out_dir = RESULTS_DIR
    path = out_dir / f"{info['slug']}-{env.today()}.json"
    kept = sorted(RESULTS_DIR.glob(f"{info['slug']}-*.json"))  # dates in the names sort in time
    if args.resume and not path.exists() and kept:
        # On a lent machine results go to $OUT; the newest rows kept in the repository for
        # this device (copied back after an earlier call) seed the file, so --resume
        # continues them.
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kept[-1], path)
        print(
            f"--resume: continuing {kept[-1].name} "
            f"({sum(r['status'] == 'ok' for r in load_results(path)['rows'])} rows ok)"
        )
    timer = Timer(device, warmup_ms=s.warmup_ms, rep_ms=s.rep_ms, cpu_warmup=s.cpu_warmup, cpu_iters=s.cpu_iters)
    ctx = Context(
        device=device,
        timer=timer,
        results=None,
        run_id=0,
        peaks={},
        smoke=mode == "smoke",
        repeats=s.repeats,
        resume=args.resume,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
        heavy_margin_s=s.heavy_margin_s,
        light_margin_s=s.light_margin_s,
    )
    cases = _collect(s, ctx, args.only)

    limit = args.time_limit if args.time_limit is not None else (None if mode == "smoke" else 540.0)
    if limit is not None:
        ctx.deadline = started + limit
    # The floors use the rates measured now, on this card (benchmarks/README.md, Definitions).
    peaks = env.peaks_record(env.measure_peaks(device, seconds=0.3 if device.type == "cuda" else 0.05))
    datasheet = env.peaks_record(env.datasheet_for(info["name"]))
    git, versions = env.git_commit(), env.versions()
    results = Results(path, info, peaks, datasheet)
    _warn_mixed_commits(results, git)
    ctx.results, ctx.peaks, ctx.datasheet = results, peaks, datasheet
    ctx.provenance = {**git, "device": info["name"], "torch": versions["torch"], "triton": versions["triton"]}
    ctx.run_id = results.start_run(
        {
            "command": "python -m benchmarks "
            + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
            "mode": mode,
            "suites": args.only,
            "started": env.now(),
            "git": git,
            "versions": versions,
            "timer": timer.method,
            "measured_peaks": peaks,
            "datasheet_peaks": datasheet,
            "settings": {
                "op_dtype": str(s.op_dtype).replace("torch.", ""),
                "M": s.M,
                "k": s.k,
                "input_sets": s.input_sets,
                "repeats": s.repeats,
                "compile_backend": args.compile_backend,
                "compile_mode": args.compile_mode,
                "compiled_strategy_backend": _compiled_strategy_backend(),
                "tf32_matmul": tf32_matmul_allowed(),
                "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            },
        }
    )
    print(f"switch-dit benchmarks ({mode}) on {info['name']}: {len(cases)} cases -> {path}")
    threads = torch.get_num_threads()
    if mode == "smoke":
        # Tiny CPU ops gain nothing from threads, and on a busy machine OpenMP's barriers
        # turn microseconds into milliseconds; restored afterwards (main may run in-process).
        torch.set_num_threads(1)
    try:
        run_cases(ctx, cases)
    finally:
        torch.set_num_threads(threads)
        compiled_reference.COMPILE_OPTIONS.clear()
        compiled_reference.COMPILE_OPTIONS.update(compile_options)
    elapsed = time.monotonic() - started
    results.update_run(ctx.run_id, finished=env.now(), elapsed_s=round(elapsed, 1), counts=dict(ctx.counts))
    print(f"done in {elapsed:.0f} s: " + ", ".join(f"{v} {k}" for k, v in ctx.counts.items()))
    if ctx.counts["skipped"] and any(r["reason"] and r["reason"].startswith("time limit") for r in results.rows):
        print("some cases hit the time limit: run the same command again with --resume to finish them")

    if not args.no_report:
        from . import report

        written = report.regenerate(out_dir)
        print("report: " + ", ".join(str(p) for p in written))
        print()
        print(report.performance_section(out_dir))
    return 0


def _compiled_strategy_backend():
    from switch_dit.ops import compiled_reference

    return compiled_reference.COMPILE_OPTIONS.get("backend", "inductor")


def _warn_mixed_commits(results, git: dict) -> None:
    """Rows of another commit (or source digest) kept in the file this run adds to: say so."""
    here = (git.get("commit"), git.get("source_digest"))
    other = {(r["provenance"].get("commit"), r["provenance"].get("source_digest")) for r in results.rows}
    other.discard(here)
    if other:
        names = ", ".join(f"{(c or '?')[:10]} (source {d})" for c, d in sorted(other, key=str))
        print(
            f"WARNING: {results.path.name} already holds rows of other sources: {names}; this run is "
            f"{(here[0] or '?')[:10]} (source {here[1]}). The report marks every table that mixes them; "
            "use a fresh --out to keep them apart.",
            file=sys.stderr,
        )


def _collect(s, ctx, suites) -> list:
    """Every case of the chosen suites, the quick ones first; only those in quick and smoke mode."""
    from . import suite_block, suite_ops, suite_step

    makers = {"ops": suite_ops.cases, "block": suite_block.cases, "step": suite_step.cases}
    all_cases = [c for name in SUITES if name in suites for c in makers[name](s, ctx)]
    quick = [c for c in all_cases if c.quick]
    if s.mode in ("quick", "smoke"):
        return quick
    ordered = quick + [c for c in all_cases if not c.quick]
    if s.mode == "gpu":
        # make gpu: within the quick cases and within the rest, the eager ones before the compiled
        # ones (a whole-model compile costs a minute on a cold machine), and the ops at the targets'
        # width (XL) before the narrower ones, so that a phase's budget leaves the rows that decide
        # the targets (routed linear, norm ops, DiffMoE's expert MLP) measured first.
        xl = max((sh["D"] for sh in s.op_shapes), default=0)

        def narrower(c) -> bool:
            return c.suite == "ops" and c.shape.get("D", xl) < xl

        ordered.sort(key=lambda c: (not c.quick, c.compiled, narrower(c)))  # stable: the plan's order within
    return ordered


def _raise_compile_limits(torch) -> None:
    """Many shapes of one function are compiled in one process; the default limit of 8
    recompiles would silently fall back to eager and time the wrong thing."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 512)
