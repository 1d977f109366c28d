"""``make gpu``: every number the project needs from one lent GPU machine, in under 8 minutes.

(Just over 600 lines: the phases, their budgets and the summary are one command, and each
part is short.)

    python -m benchmarks.gpu          # on the GPU machine (make gpu)
    python -m benchmarks.gpu --dry    # the same phases and files on the CPU: tiny shapes, the
                                      # Triton interpreter (make gpu DRY=1, run by .ci/run)

GPU time comes 15 minutes at a time, the machine's start included, so the command is a chain
of phases, each in its own process under its own budget; a phase still running at its budget
is killed, and what it measured so far is kept (the results file is written after every row;
a killed case stays as a "did not finish" row). The phases, in order:

  build  the C++/CUDA extension for this device's architecture, with every core; no download
  tests  pytest -m gpu: every CUDA-only test (the interpreter tests are not selected)
  ops    every strategy of every op (``switch_dit.ops.strategies``) at the S, B and XL widths
         (DiffMoE's expert MLP at XL only, last), with the dense cuBLAS floors and the baselines
         (eager, compiled, max-autotune, official)
  block  1-block models: fast vs reference Switch-DiT, dense DiT
  step   S/2 and XL/2 training steps, the patched reference-code model included

Each phase prints its estimated cost (``estimate``) beside its budget before it starts. The
estimates are first-principles guesses until a GPU run has measured them: every row keeps
its first-call and set-up seconds, which is what to calibrate ``COSTS`` with.

Output, in ``$OUT`` when it is set (a lent machine returns only that folder), else
benchmarks/results/ (``--out`` overrides), at most 8 files:
  <device>-<date>.json  the results (benchmarks/results.py), every row with its provenance
  pytest.log, junit.xml the GPU tests
  make-gpu.log          every phase's output
  summary.md            phases (estimate, budget, time, status), the targets with pass/fail,
                        and every measured row beside the analytic model's prediction
  chart.png             (when matplotlib is installed)
The summary is printed at the end. Exit status: 0 when every phase passed; 1 when a phase
failed, a row errored or the results lack a field the report needs (``missing_fields``);
in the dry run a phase that overruns its budget fails too, so the command cannot rot.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
WALL_BUDGET_S = 480  # the whole command on the GPU machine (issue: 8 minutes)
DRY_WALL_BUDGET_S = 300  # the dry run on 2 CPU cores (CI)
FILES = ("pytest.log", "junit.xml", "make-gpu.log", "summary.md", "chart.png")  # + the results JSON


@dataclass
class Phase:
    name: str
    what: str
    budget_s: float  # on the GPU machine
    dry_budget_s: float  # on 2 CPU cores
    # filled in by run_phase
    estimate_s: float | None = None
    took_s: float | None = None
    status: str = "not run"
    detail: str = ""
    rc: int | None = None


def phases() -> list[Phase]:
    # The GPU budgets add up to 455 s, leaving 25 s of the 480 for start-up and the report. The
    # dry build's budget allows a CPU build from scratch (a fresh tree, the rehearsal); in CI
    # `make test` has built it and the phase only checks it (seconds), so the dry run stays
    # under its 300 s.
    return [
        Phase("build", "the extension for this device's arch, every core", 70, 150),
        Phase("tests", "pytest -m gpu (CUDA-only tests)", 70, 60),
        Phase("ops", "every op strategy at the S, B, XL widths, dense floor, baselines", 140, 80),
        Phase("block", "1-block models, fast vs reference, dense DiT", 65, 60),
        Phase("step", "S/2 and XL/2 training steps, patched reference-code rows", 110, 70),
    ]


# ------------------------------------------------------------------ estimates

# Seconds per case, by kind, on a cold H200 (compile caches empty) and on 2 CPU cores in the
# dry run. Guesses from first principles until measured: a fused Triton op compiles one kernel
# per pass and autotunes a few configs; inductor's default compile of a small function takes
# ~10 s, of a whole model ~30 s (S/2) to ~60 s (XL/2); max-autotune benchmarks every GEMM's
# candidates (~4x default). Timed work is small beside these: do_bench runs 50 ms per timing.
COSTS = {
    "gpu": {
        "eager": 1.0,
        "fused": 6.0,
        "auto": 4.0,
        "compile": 12.0,
        "max-autotune": 45.0,
        "model_eager": 4.0,
        "model_fused": 10.0,
        "model_compile_small": 30.0,
        "model_compile_large": 60.0,
        "model_max-autotune": 150.0,
        "build": 60.0,
        "tests": 60.0,
        "startup": 8.0,
    },
    "dry": {
        "eager": 0.3,
        "fused": 8.0,
        "auto": 1.0,
        "compile": 4.0,
        "max-autotune": 4.0,
        "model_eager": 1.5,
        "model_fused": 15.0,
        "model_compile_small": 10.0,
        "model_compile_large": 10.0,
        "model_max-autotune": 8.0,
        "build": 5.0,
        "tests": 40.0,
        "startup": 6.0,
    },
}


def case_cost(case, costs: dict) -> float:
    """Estimated seconds of one benchmark case (see COSTS)."""
    variant = case.variant
    compiled = variant.partition("+")[2]
    if case.suite == "ops":
        if compiled:
            return costs["max-autotune" if compiled == "max-autotune" else "compile"]
        if variant in ("fused", "triton", "fast"):
            return costs["fused"]
        return costs["auto"] if variant == "auto" else costs["eager"]
    large = case.shape.get("D", 0) * case.shape.get("depth", 1) >= 12 * 768
    if compiled == "max-autotune":
        return costs["model_max-autotune"]
    if compiled:
        return costs["model_compile_large" if large else "model_compile_small"]
    return costs["model_fused" if variant.startswith(("fast", "patched")) else "model_eager"]


def estimate(phase: str, dry: bool) -> tuple[float, str]:
    """(seconds, how) for a phase, from its plan of cases and COSTS."""
    costs = COSTS["dry" if dry else "gpu"]
    if phase in ("build", "tests"):
        return costs[phase], "fixed guess"
    import torch

    from . import cli
    from .runner import Context
    from .settings import settings_for

    s = settings_for("smoke" if dry else "gpu")
    ctx = Context(device=torch.device("cpu"), timer=None, results=None, run_id=0, peaks={})
    cases = cli._collect(s, ctx, [phase])
    total = costs["startup"] + sum(case_cost(c, costs) for c in cases)
    return total, f"{len(cases)} cases"


# ------------------------------------------------------------------ running a phase


def _stream(proc, sinks) -> None:
    for line in iter(proc.stdout.readline, ""):
        for sink in sinks:
            sink.write(line)
            sink.flush()


GRACE_S = 8.0  # between the interrupt at the budget and the kill


def run_command(cmd: list[str], budget_s: float, log, extra_log=None, env=None) -> tuple[int | None, float]:
    """Run ``cmd`` from the repository root, its output to ``log`` (and stdout). At ``budget_s`` its
    whole process group gets SIGINT, so that pytest still writes its summary and junit XML and the
    benchmarks their results; ``GRACE_S`` later, SIGTERM and SIGKILL. Returns (exit status, or None
    when it was stopped at the budget, and seconds)."""
    t0 = time.monotonic()
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,
    )
    sinks = [log, sys.stdout] + ([extra_log] if extra_log else [])
    reader = threading.Thread(target=_stream, args=(proc, sinks), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, budget_s - GRACE_S))
    except subprocess.TimeoutExpired:
        _kill(proc)
        rc = None
    reader.join(timeout=10)
    return rc, time.monotonic() - t0


def _kill(proc) -> None:
    for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _extension_is_current() -> bool:
    """A built switch_dit._C newer than every csrc source."""
    built = list((ROOT / "switch_dit").glob("_C*.so"))
    if not built:
        return False
    newest_source = max(p.stat().st_mtime for p in (ROOT / "csrc").iterdir())
    return min(p.stat().st_mtime for p in built) > newest_source


def build_phase(phase: Phase, dry: bool, out: Path, log) -> None:
    py = sys.executable
    check = [
        py,
        "-c",
        "from switch_dit import _extension as e; import sys, torch; "
        "ok = e.available() and (not torch.cuda.is_available() "
        "or e.has_kernel('switch_dit::routing_plan', 'cuda')); "
        "print('extension:', 'loaded' if ok else (e.load_error or 'no CUDA kernel')); sys.exit(0 if ok else 1)",
    ]
    if _extension_is_current():
        rc, took = run_command(check, phase_budget(phase, dry), log)
        if rc == 0:
            phase.status, phase.detail, phase.took_s, phase.rc = "passed", "already built for these sources", took, 0
            return
    env = {"MAX_JOBS": str(os.cpu_count() or 2)}
    if not dry:
        import torch

        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this device only: one target to compile
    t0 = time.monotonic()
    rc, _ = run_command([py, "setup.py", "build_ext", "--inplace"], phase_budget(phase, dry), log, env=env)
    if rc == 0:
        rc, _ = run_command(check, max(10.0, phase_budget(phase, dry) - (time.monotonic() - t0)), log)
    phase.took_s, phase.rc = time.monotonic() - t0, rc
    phase.status = "passed" if rc == 0 else ("stopped at budget" if rc is None else "failed")
    phase.detail = f"built with {env}"


def tests_phase(phase: Phase, dry: bool, out: Path, log) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        f"--junitxml={out / 'junit.xml'}",
        "tests",
    ]
    with open(out / "pytest.log", "w") as plog:
        rc, took = run_command(cmd, phase_budget(phase, dry), plog, extra_log=log)
    phase.took_s, phase.rc = took, rc
    # pytest: 0 all passed, 5 nothing collected (no test carries the marker: that is a failure too)
    phase.status = "passed" if rc == 0 else ("stopped at budget" if rc is None else "failed")
    phase.detail = "pytest.log, junit.xml"


def bench_phase(phase: Phase, dry: bool, out: Path, log) -> None:
    budget = phase_budget(phase, dry)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--smoke" if dry else "--gpu",
        "--only",
        phase.name,
        "--out",
        str(out),
        "--no-report",
        "--time-limit",
        str(max(5.0, budget - GRACE_S - 4.0)),
    ]
    rc, took = run_command(cmd, budget, log)
    phase.took_s, phase.rc = took, rc
    phase.status = "passed" if rc == 0 else ("stopped at budget" if rc is None else "failed")


RUNNERS = {"build": build_phase, "tests": tests_phase, "ops": bench_phase, "block": bench_phase, "step": bench_phase}


def phase_budget(phase: Phase, dry: bool) -> float:
    return phase.dry_budget_s if dry else phase.budget_s


# ------------------------------------------------------------------ the check of the results


def missing_fields(data: dict) -> list[str]:
    """Every field of a results file that the report, the targets or the summary need and that
    is missing (empty list: complete). Checked at the end of make gpu and by the tests."""
    from .results import PROVENANCE_FIELDS, ROW_FIELDS

    miss = []
    for key in ("name", "kind", "slug"):
        if key not in data.get("device", {}):
            miss.append(f"device.{key}")
    peaks = data.get("peaks") or {}
    if "bf16" not in peaks.get("flops", {}) or "bytes_per_s" not in peaks:
        miss.append("peaks.flops.bf16 / peaks.bytes_per_s")
    if "datasheet" not in data:
        miss.append("datasheet")
    for run in data.get("runs", []):
        for key in ("commit", "dirty", "source_digest"):
            if key not in run.get("git", {}):
                miss.append(f"runs[{run.get('id')}].git.{key}")
        for key in ("torch", "triton", "cuda"):
            if key not in run.get("versions", {}):
                miss.append(f"runs[{run.get('id')}].versions.{key}")
        if "measured_peaks" not in run or "datasheet_peaks" not in run:
            miss.append(f"runs[{run.get('id')}].measured_peaks / datasheet_peaks")
    rows = data.get("rows", [])
    for i, r in enumerate(rows):
        where = f"rows[{i}] ({r.get('suite')}/{r.get('bench')}/{r.get('variant')})"
        miss += [f"{where}.{k}" for k in ROW_FIELDS if k not in r]
        miss += [f"{where}.provenance.{k}" for k in PROVENANCE_FIELDS if k not in r.get("provenance", {})]
        if "role" not in r.get("extra", {}):
            miss.append(f"{where}.extra.role")
        if r.get("status") != "ok":
            continue
        shape = r.get("shape", {})
        need = {
            "ops": ("B", "L", "D") if r["bench"] != "routing_plan" else ("N", "T", "B"),
            "block": ("model", "B"),
            "step": ("model", "B", "depth"),
        }.get(r["suite"], ())
        miss += [f"{where}.shape.{k}" for k in need if k not in shape]
        if r["suite"] == "step":
            for k in ("images_per_s", "mfu_measured_peak", "mfu_datasheet", "first_step_s"):
                if k not in r["extra"]:
                    miss.append(f"{where}.extra.{k}")
    # The rows every target reads (any status: a skipped row still says why it is missing).
    present = {(r["suite"], r["bench"], r["variant"]) for r in rows}
    roles = {(r["suite"], r["bench"], r["extra"].get("role")) for r in rows}
    for suite, bench, variant in (
        ("ops", "routed_linear", "dense_linear"),
        ("ops", "routed_linear", "reference"),
        ("ops", "routed_linear", "reference+compile"),
        ("ops", "routed_linear", "official"),
        ("ops", "expert_mlp", "dense_mlp"),
        ("block", "Switch-DiT block", "reference"),
        ("block", "DiT block", "reference"),
        ("step", "train_step", "reference"),
        ("step", "train_step", "reference+compile"),
        ("step", "train_step", "patched"),
    ):
        if (suite, bench, variant) not in present:
            miss.append(f"a {suite}/{bench}/{variant} row")
    for suite, bench in (
        ("ops", "routed_linear"),
        ("ops", "mask_ln_modulate"),
        ("ops", "gated_residual_ln_modulate"),
        ("ops", "expert_mlp"),
        ("block", "Switch-DiT block"),
        ("step", "train_step"),
    ):
        if (suite, bench, "strategy") not in roles:
            miss.append(f"a fast-path (role strategy) {suite}/{bench} row")
    return miss


# ------------------------------------------------------------------ summary


def summary(data: dict | None, run_phases: list[Phase], dry: bool, wall_s: float, json_name: str | None) -> str:
    from . import report

    lines = []
    dev = data["device"]["name"] if data else "?"
    head = (
        "make gpu DRY=1 (CPU dry run: checks the command and its files, says nothing about speed)"
        if dry
        else "make gpu"
    )
    lines += [f"# {head} on {dev}", ""]
    if data and data["runs"]:
        run = data["runs"][-1]
        g, v = run["git"], run["versions"]
        lines.append(
            f"Commit {g.get('commit') or '? (no .git: pass SWITCH_DIT_GIT_COMMIT)'}"
            f"{' (dirty)' if g.get('dirty') else ''}, source digest {g.get('source_digest')}; "
            f"torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')}, "
            f"python {v.get('python')}. Results: `{json_name}`."
        )
        lines.append("")
    budget = DRY_WALL_BUDGET_S if dry else WALL_BUDGET_S
    lines += [
        f"Wall time {wall_s:.0f} s of {budget} s.",
        "",
        "## Phases",
        "",
        "| phase | what | estimate s | budget s | took s | status |",
        "|---|---|---|---|---|---|",
    ]
    for p in run_phases:
        est = "–" if p.estimate_s is None else f"{p.estimate_s:.0f}"
        took = "–" if p.took_s is None else f"{p.took_s:.0f}"
        status = p.status + (f" ({p.detail})" if p.detail else "")
        lines.append(f"| {p.name} | {p.what} | {est} | {phase_budget(p, dry):.0f} | {took} | {status} |")
    lines.append("")
    if data is None:
        return "\n".join(lines + ["No results file was written."]) + "\n"
    rows = data["rows"]
    lines += [
        "## Targets",
        "",
        "Definitions: benchmarks/README.md. *not measured*: a row it needs is missing (see Not run).",
        "",
        report.targets_table(rows),
    ]
    lines += predictions_table(data, dry)
    lines += steps_table(rows)
    lines += not_run_table(rows)
    lines += [
        "## What to do with this output",
        "",
        "Copy the results JSON into `benchmarks/results/` of the checkout, run "
        "`python -m benchmarks.report --section` (rebuilds benchmarks/results/README.md and chart.png and "
        "the README's performance section), and commit the JSON with them. Rows cut by a budget: "
        "`python -m benchmarks --gpu --resume --only PHASE` on the next GPU call.",
        "",
    ]
    return "\n".join(lines)


def predictions_table(data: dict, dry: bool) -> list[str]:
    from . import report

    # The analytic model covers CUDA GPUs; the dry run shows its prediction for the H200 so that
    # the column is exercised (its ratio to CPU times means nothing).
    device = "NVIDIA H200" if dry or data["device"]["kind"] != "cuda" else data["device"]["name"]
    out = [
        "## Measured against the analytic model",
        "",
        f"*predicted*: `switch_dit.perf_model.estimate` for {device} (datasheet peaks), where it models the "
        "strategy; *floor*: max(FLOPs, bytes) over the peaks measured in the run (docs/design.md §5).",
        "",
        "| suite | bench | shape | dtype | mode | variant | measured ms | predicted ms | bound | floor ms | "
        "measured / predicted |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if r["status"] != "ok":
            continue
        pred, note = report.prediction_ms(r, device)
        ms = r["ms"]["median"]
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items() if k not in ("depth",))
        out.append(
            f"| {r['suite']} | {r['bench']} | {shape} | {r['dtype']} | {r['mode']} | {r['variant']} | "
            f"{ms:.4g} | {'–' if pred is None else f'{pred:.4g}'} | {note if pred is not None else '–'} | "
            f"{'–' if r['floor_ms'] is None else format(r['floor_ms'], '.4g')} | "
            f"{'–' if pred is None else f'{ms / pred:.2f}'} |"
        )
    return out + [""]


def steps_table(rows) -> list[str]:
    steps = [r for r in rows if r["status"] == "ok" and r["suite"] == "step"]
    if not steps:
        return []
    out = [
        "## Training steps: model FLOP utilisation",
        "",
        "| model | precision | variant | step ms | img/s | MFU (datasheet) | MFU (measured peak) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in steps:
        ex = r["extra"]
        out.append(
            f"| {r['shape']['model']} | {r['dtype']} | {r['variant']} | {r['ms']['median']:.4g} | "
            f"{ex['images_per_s']:.1f} | {_pct(ex.get('mfu_datasheet'))} | "
            f"{_pct(ex.get('mfu_measured_peak'))} |"
        )
    return out + [""]


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def not_run_table(rows) -> list[str]:
    groups: dict = {}
    for r in rows:
        if r["status"] != "ok":
            key = (r["status"], r["suite"], r["bench"], r["variant"], r["reason"])
            groups[key] = groups.get(key, 0) + 1
    if not groups:
        return []
    out = ["## Not run", "", "| status | suite | bench | variant | rows | reason |", "|---|---|---|---|---|---|"]
    for (status, suite, bench, variant, reason), n in groups.items():
        out.append(f"| {status} | {suite} | {bench} | {variant} | {n} | {str(reason).replace('|', '/')[:200]} |")
    return out + [""]


# ------------------------------------------------------------------ entry


def out_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return RESULTS_DIR


def main(argv=None) -> int:
    started = time.monotonic()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dry", action="store_true", help="CPU dry run: tiny shapes, the interpreter (CI)")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    p.add_argument(
        "--phases", default=",".join(ph.name for ph in phases()), help="comma-separated phases to run (default: all)"
    )
    args = p.parse_args(argv)
    dry = args.dry
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # the phases inherit it: kernels run on CPU tensors
    import torch

    if not dry and not torch.cuda.is_available():
        print("make gpu: no CUDA device here; `make gpu DRY=1` runs the same phases on the CPU", file=sys.stderr)
        return 2
    out = out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [x.strip() for x in args.phases.split(",") if x.strip()]
    run_phases = [ph for ph in phases() if ph.name in wanted]
    unknown = set(wanted) - {ph.name for ph in phases()}
    if unknown:
        p.error(f"--phases: unknown {sorted(unknown)}; choose from {[ph.name for ph in phases()]}")

    total_budget = sum(phase_budget(ph, dry) for ph in run_phases)
    print(
        f"make gpu{' (dry run)' if dry else ''}: {len(run_phases)} phases, budgets {total_budget:.0f} s "
        f"of {DRY_WALL_BUDGET_S if dry else WALL_BUDGET_S} s; output in {out}"
    )
    with open(out / "make-gpu.log", "a") as log:
        log.write(f"\n===== make gpu{' --dry' if dry else ''} started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        for ph in run_phases:
            try:
                ph.estimate_s, how = estimate(ph.name, dry)
            except Exception as exc:  # noqa: BLE001 - an estimate must not stop the measurement
                ph.estimate_s, how = None, f"no estimate ({type(exc).__name__}: {exc})"
            budget = phase_budget(ph, dry)
            over = " OVER BUDGET: the cases at its end will be cut" if (ph.estimate_s or 0) > budget else ""
            est = "?" if ph.estimate_s is None else f"{ph.estimate_s:.0f}"
            banner = f"\n=== phase {ph.name}: {ph.what}; estimate {est} s ({how}), budget {budget:.0f} s{over}"
            print(banner)
            log.write(banner + "\n")
            log.flush()
            RUNNERS[ph.name](ph, dry, out, log)
            line = f"=== phase {ph.name}: {ph.status} in {ph.took_s or 0:.0f} s"
            print(line)
            log.write(line + "\n")

    files = sorted(out.glob("*.json"), key=lambda q: q.stat().st_mtime)
    from .results import load

    data = load(files[-1]) if files else None
    json_name = files[-1].name if files else None
    wall = time.monotonic() - started
    text = summary(data, run_phases, dry, wall, json_name)
    (out / "summary.md").write_text(text)
    from . import report

    if data is not None:
        report.chart(out, out / "chart.png")
    print()
    print(text)

    problems = []
    for ph in run_phases:
        if ph.status == "failed" or (dry and ph.status != "passed"):
            problems.append(f"phase {ph.name} {ph.status}")
    if data is not None:
        errors = [r for r in data["rows"] if r["status"] == "error"]
        problems += [f"{len(errors)} rows errored (see Not run)"] if errors else []
        missing = missing_fields(data) if {"ops", "block", "step"} <= set(wanted) else []
        problems += [f"the results lack {len(missing)} fields: {', '.join(missing[:8])}"] if missing else []
    elif {"ops", "block", "step"} & set(wanted):
        problems.append("no results file")
    budget = DRY_WALL_BUDGET_S if dry else WALL_BUDGET_S
    if wall > budget:
        problems.append(f"took {wall:.0f} s, over the {budget} s budget")
    for problem in problems:
        print(f"make gpu: {problem}", file=sys.stderr)
    print(f"make gpu: {len(list(out.iterdir()))} files in {out}; {'FAILED' if problems else 'passed'} in {wall:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
