"""Tables, chart and the README's performance section, from the kept results files.

(Over 600 lines: one module renders every view of the kept results, the tables, the chart and
the targets, from the same rows, so they cannot disagree.)

    python -m benchmarks.report [FOLDER]             # rewrite FOLDER/README.md and FOLDER/chart.png
    python -m benchmarks.report --section            # and update the performance section of README.md
    python -m benchmarks.report --section --readme X # ... of the file X instead

FOLDER defaults to benchmarks/results. Everything is derived from the JSON files there;
nothing is measured here, so this runs anywhere (the chart needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .results import load, result_files

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_README = Path(__file__).resolve().parent.parent / "README.md"
CHART = "chart.png"
TABLE = "README.md"

# The targets (H100/H200, bf16), checked by ``targets``; definitions in benchmarks/README.md.
TARGETS = {
    "routed_vs_dense": 1.25,  # routed linear fwd+bwd / dense linear fwd+bwd, at most
    "routed_vs_reference": 4.0,  # reference / fast, at least
    "block_vs_dense_dit": 1.0,  # fast Switch-DiT block / reference DiT block, below
    "block_vs_reference": 1.5,  # reference Switch-DiT block / fast, at least
    "xl_mfu": 0.55,
    "xl_vs_compile": 1.3,
    "s_vs_compile": 2.0,
    "moe_vs_dense_mlp": 1.3,  # DiffMoE expert MLP fwd+bwd / dense MLP of equal activated size, at most
}


# ------------------------------------------------------------------ lookups


def _ok(rows):
    return [r for r in rows if r["status"] == "ok"]


def _find(rows, **want):
    """The first ok row whose fields (and shape entries, given as shape={...}) match."""
    shape = want.pop("shape", {})
    for r in _ok(rows):
        if all(r.get(k) == v for k, v in want.items()) and all(r["shape"].get(k) == v for k, v in shape.items()):
            return r
    return None


def _ms(row):
    return None if row is None else row["ms"]["median"]


def _best(rows, variants, **want):
    """Fastest ok row among ``variants`` (e.g. fast eager vs fast compiled)."""
    found = [r for v in variants if (r := _find(rows, variant=v, **want)) is not None]
    return min(found, key=_ms) if found else None


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _fmt(x, spec=".3g", none="–"):
    return none if x is None else format(x, spec)


def _ms_cell(row):
    ms = row["ms"]
    return f"{ms['median']:.4g} ({ms['p20']:.4g}–{ms['p80']:.4g})"


def _rerun(row):
    """Largest relative difference of a re-timing from the median: below it, differences are noise."""
    if not row["reruns_ms"]:
        return "–"
    med = row["ms"]["median"]
    return f"{100 * max(abs(r - med) for r in row['reruns_ms']) / med:.1f}%"


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if k not in ("model", "depth"))


# ------------------------------------------------------------------ tables


def file_section(path: Path, data: dict) -> str:
    dev, peaks, rows = data["device"], data["peaks"], data["rows"]
    out = [f"## {dev['name']} — `{path.name}`", ""]
    sheet = data.get("datasheet")
    out.append(
        f"Peaks of the floors, measured in the newest run: {peaks['flops']['bf16'] / 1e12:.0f} TFLOP/s bf16, "
        f"{peaks['bytes_per_s'] / 1e12:.2f} TB/s ({peaks['source']}). Datasheet: "
        + (
            f"{sheet['flops']['bf16'] / 1e12:.0f} TFLOP/s bf16, {sheet['bytes_per_s'] / 1e12:.2f} TB/s "
            f"({sheet['source']})."
            if sheet
            else "none for this device (MFU against the measured peak only)."
        )
    )
    commits = _commits(data)
    if len(commits) > 1:
        out += [
            "",
            "**This file mixes rows of "
            + str(len(commits))
            + " sources: "
            + ", ".join(
                f"commit {(c or '?')[:10]} (source {d}): runs "
                + ", ".join(
                    str(i) for i in sorted({r["run"] for r in _ok(rows) if r["provenance"].get("source_digest") == d})
                )
                for c, d in commits
            )
            + ". Compare rows of one source only (the run column of each row says which).**",
        ]
    out.append("")
    out.append("| run | command | mode | commit | torch | triton | CUDA | timer | measured peaks |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for run in data["runs"]:
        v, g, mp = run["versions"], run["git"], run.get("measured_peaks") or {}
        commit = (
            (g.get("commit") or "?")[:10]
            + (" (dirty)" if g.get("dirty") else "")
            + (f" src {g['source_digest']}" if g.get("source_digest") else "")
        )
        meas = (
            f"{mp['flops']['bf16'] / 1e12:.3g} TFLOP/s, {mp['bytes_per_s'] / 1e12:.3g} TB/s" if mp.get("flops") else "–"
        )
        out.append(
            f"| {run['id']} | `{run['command']}` | {run['mode']} | {commit} | {v.get('torch')} | "
            f"{v.get('triton')} | {v.get('cuda')} | {run['timer']} | {meas} |"
        )
    out.append("")
    out += _ops_table(rows) + _block_table(rows) + _step_table(rows) + _problems_table(rows)
    return "\n".join(out)


def _ops_table(rows) -> list[str]:
    ops = [r for r in _ok(rows) if r["suite"] == "ops"]
    if not ops:
        return []
    out = [
        "### Ops",
        "",
        "Time in ms: median (p20–p80). *vs ref*: reference time / this time (higher is faster). "
        "*× floor*: time over max(FLOPs, bytes) at the peak rates. TFLOP/s counts the op's least work "
        "(one dense GEMM for the routed linear). *rerun*: the second timing's distance from the median "
        "(differences below it are noise). *wall ms*: back-to-back calls, host overhead included.",
        "",
        "| op | shape | dtype | mode | variant | ms | rerun | vs ref | × floor | TFLOP/s | GB/s | wall ms | syncs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ops:
        ref = _find(
            rows, suite="ops", bench=r["bench"], variant="reference", mode=r["mode"], dtype=r["dtype"], shape=r["shape"]
        )
        out.append(
            f"| {r['bench']} | {_shape_text(r['shape'])} | {r['dtype']} | {r['mode']} | {r['variant']} | "
            f"{_ms_cell(r)} | {_rerun(r)} | {_fmt(_ratio(_ms(ref), _ms(r)), '.2f')} | "
            f"{_fmt(r['over_floor'], '.2f')} | "
            f"{_fmt(r['tflops'], '.1f')} | {_fmt(r['gbps'], '.0f')} | {_fmt(r['wall_ms'], '.4g')} | "
            f"{_fmt(r['host_syncs'], '.0f')} |"
        )
    return out + [""]


def _block_table(rows) -> list[str]:
    blocks = [r for r in _ok(rows) if r["suite"] == "block"]
    if not blocks:
        return []
    out = [
        "### Blocks",
        "",
        "1-block models (embedders, one block, final layer). *vs ref*: the same family's reference "
        "time / this time; *vs DiT ref*: the reference dense DiT block's time / this time.",
        "",
        "| block | model | dtype | mode | variant | ms | rerun | vs ref | vs DiT ref | × floor | peak MiB | syncs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in blocks:
        ref = _find(
            rows,
            suite="block",
            bench=r["bench"],
            variant="reference",
            mode=r["mode"],
            dtype=r["dtype"],
            shape={"model": r["shape"]["model"], "B": r["shape"]["B"]},
        )
        dense = _find(
            rows,
            suite="block",
            bench="DiT block",
            variant="reference",
            mode=r["mode"],
            dtype=r["dtype"],
            shape={"model": "DiT-" + r["shape"]["model"].rsplit("-", 1)[1], "B": r["shape"]["B"]},
        )
        out.append(
            f"| {r['bench']} | {r['shape']['model']} B={r['shape']['B']} | {r['dtype']} | {r['mode']} | "
            f"{r['variant']} | {_ms_cell(r)} | {_rerun(r)} | {_fmt(_ratio(_ms(ref), _ms(r)), '.2f')} | "
            f"{_fmt(_ratio(_ms(dense), _ms(r)), '.2f')} | {_fmt(r['over_floor'], '.2f')} | "
            f"{_fmt(r['peak_mem_mib'], '.0f')} | {_fmt(r['host_syncs'], '.0f')} |"
        )
    return out + [""]


def _step_table(rows) -> list[str]:
    steps = [r for r in _ok(rows) if r["suite"] == "step"]
    if not steps:
        return []
    out = [
        "### Training step",
        "",
        "Forward, loss with the prior, backward, AdamW, EMA. *vs best ref*: the best reference Switch-DiT "
        "variant (eager, compiled, max-autotune) in the same precision / this time. MFU: model FLOPs "
        "(benchmarks/README.md) over the datasheet peak / over the peak measured in the run.",
        "",
        "| model | precision | variant | step ms | img/s | MFU sheet | MFU meas. | vs best ref | × floor | peak GiB "
        "| syncs/step | first step s | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in steps:
        model = r["shape"]["model"]
        base = _best(
            rows,
            REFERENCE_VARIANTS,
            suite="step",
            dtype=r["dtype"],
            shape={"model": "Switch-DiT-" + model.rsplit("-", 1)[1], "B": r["shape"]["B"]},
        )
        ex = r["extra"]
        peak = None if r["peak_mem_mib"] is None else r["peak_mem_mib"] / 1024
        out.append(
            f"| {model} B={r['shape']['B']} | {r['dtype']} | {r['variant']} | {_ms_cell(r)} | "
            f"{_fmt(ex.get('images_per_s'), '.1f')} | {_pct(ex.get('mfu_datasheet')) or '–'} | "
            f"{_pct(ex.get('mfu_measured_peak')) or '–'} | "
            f"{_fmt(_ratio(_ms(base), _ms(r)), '.2f')} | {_fmt(r['over_floor'], '.2f')} | "
            f"{_fmt(peak, '.1f')} | {_fmt(r['host_syncs'], '.1f')} | {_fmt(ex.get('first_step_s'), '.1f')} | "
            f"{r['run']} |"
        )
    return out + [""]


def _pct(x):
    return None if x is None else f"{100 * x:.1f}%"


def _problems_table(rows) -> list[str]:
    bad = [r for r in rows if r["status"] != "ok"]
    if not bad:
        return []
    # One line per (status, suite, bench, variant, reason): the same skip repeats per shape and mode.
    groups: dict = {}
    for r in bad:
        key = (r["status"], r["suite"], r["bench"], r["variant"], r["reason"])
        groups[key] = groups.get(key, 0) + 1
    out = [
        "### Skipped and failed",
        "",
        "| status | suite | bench | variant | rows | reason |",
        "|---|---|---|---|---|---|",
    ]
    for (status, suite, bench, variant, reason), n in groups.items():
        out.append(f"| {status} | {suite} | {bench} | {variant} | {n} | {reason.replace('|', '/')} |")
    return out + [""]


def markdown(folder: Path) -> str:
    files = [(p, load(p)) for p in result_files(folder)]
    out = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks.report` from every results file in this folder "
        "(newest first); it is rebuilt from them, so do not edit it by hand. How to run: ../README.md.",
        "",
    ]
    if (Path(folder) / CHART).exists():
        out += [f"![benchmarks]({CHART})", ""]
    if not files:
        out.append("No results yet: run `python -m benchmarks` on a GPU.")
    for path, data in reversed(files):
        out += [file_section(path, data), ""]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------ chart


def chart(folder: Path, path: Path) -> bool:
    """One row of three panels per device (its newest file): routed linear fwd+bwd, block
    fwd+bwd, training-step throughput. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("chart skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return False
    if not result_files(folder):
        return False  # nothing to draw
    newest: dict = {}
    for p in result_files(folder):
        data = load(p)
        newest[data["device"]["slug"]] = data
    devices = list(newest.values())[-3:]
    fig, axes = plt.subplots(len(devices), 3, figsize=(16, 4.2 * len(devices)), squeeze=False)
    for row_axes, data in zip(axes, devices):
        rows, title = _ok(data["rows"]), data["device"]["name"]
        _bars(
            row_axes[0],
            [r for r in rows if r["bench"] == "routed_linear" and r["mode"] == "fwd+bwd"],
            lambda r: f"D={r['shape']['D']}",
            "ms",
            f"{title}\nrouted linear fwd+bwd (ms, log)",
            log=True,
        )
        _bars(
            row_axes[1],
            [r for r in rows if r["suite"] == "block" and r["mode"] == "fwd+bwd"],
            lambda r: f"{r['bench'].split()[0]}\n{r['shape']['model'].rsplit('-', 1)[1]}",
            "ms",
            "block fwd+bwd (ms, log)",
            log=True,
        )
        _bars(
            row_axes[2],
            [r for r in rows if r["suite"] == "step"],
            lambda r: f"{r['shape']['model']}\n{r['dtype'].split('-')[0]}",
            "images_per_s",
            "training step (images/s)",
            log=False,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _bars(ax, rows, group_of, metric, title, log):
    ax.set_title(title, fontsize=10)
    if not rows:
        ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return
    groups = list(dict.fromkeys(group_of(r) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs, ys = [], []
        for j, g in enumerate(groups):
            match = [r for r in rows if r["variant"] == v and group_of(r) == g]
            if match:
                r = match[0]
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(r["ms"]["median"] if metric == "ms" else r["extra"].get(metric, 0.0))
        ax.bar(xs, ys, width, label=v)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


# ------------------------------------------------------------------ README section


def performance_section(folder: Path = RESULTS_DIR) -> str:
    """Markdown for the top-level README: the targets against the newest GPU results (the
    newest file of any kind when no GPU file exists, marked as a smoke run)."""
    files = [(p, load(p)) for p in result_files(folder)]
    gpu = [(p, d) for p, d in files if d["device"]["kind"] == "cuda"]
    pick = gpu[-1] if gpu else (files[-1] if files else None)
    lines = ["## Performance", ""]
    if pick is None:
        return (
            "\n".join(lines + ["No benchmark results yet: run `make gpu` on a GPU machine (see benchmarks/README.md)."])
            + "\n"
        )
    path, data = pick
    run = data["runs"][-1]
    v = run["versions"]
    commands = ", ".join(dict.fromkeys(f"`{r['command']}`" for r in data["runs"]))
    lines.append(
        f"Measured on {data['device']['name']} with {commands} (torch {v.get('torch')}, "
        f"triton {v.get('triton')}, CUDA {v.get('cuda')}, {_sources_text(data)}); every figure, with "
        f"its spread and baselines, is in benchmarks/results/ (`{path.name}`)."
    )
    if data["device"]["kind"] != "cuda":
        lines.append("")
        lines.append("*These are CPU smoke-run numbers: they check the harness and say nothing about speed.*")
    lines += ["", targets_table(data["rows"])]
    return "\n".join(lines) + "\n"


def _sources_text(data) -> str:
    commits = _commits(data)
    if len(commits) <= 1:
        ((commit, digest),) = commits or [(None, None)]
        return f"commit {(commit or '?')[:10]}"
    return "**rows of " + ", ".join(f"commit {(c or '?')[:10]} (source {d})" for c, d in commits) + "**"


def _commits(data) -> list:
    """The (commit, source digest) pairs of a file's ok rows."""
    return sorted(
        {(r["provenance"].get("commit"), r["provenance"].get("source_digest")) for r in _ok(data["rows"])}, key=str
    )


# ------------------------------------------------------------------ targets
#
# Definitions (benchmarks/README.md): "fast" is the best row of the fast path (role "strategy"
# or "auto", the reference strategy excluded); a baseline is the best of its eager and compiled
# variants (default and max-autotune-no-cudagraphs).

REFERENCE_VARIANTS = ("reference", "reference+compile", "reference+max-autotune")
OFFICIAL_VARIANTS = ("official", "official+compile", "official+max-autotune")


def _is_fast(row) -> bool:
    role = row["extra"].get("role")
    if role is None:  # rows of schema 1
        return row["variant"].startswith("fast")
    return role in ("strategy", "auto") and row["variant"] != "reference"


def _best_fast(rows, **want):
    shape = want.pop("shape", {})
    found = [
        r
        for r in _ok(rows)
        if _is_fast(r)
        and all(r.get(k) == v for k, v in want.items())
        and all(r["shape"].get(k) == v for k, v in shape.items())
    ]
    return min(found, key=_ms) if found else None


def targets(rows) -> list[dict]:
    """Every target: {"what", "measured" (text), "target" (text), "values" (list), "passed" (True,
    False, or None when not measured)}; a target with several shapes passes when all do."""
    out = []

    checks = {"<=": lambda x, t: x <= t, ">=": lambda x, t: x >= t, "<": lambda x, t: x < t}

    def add(what, pairs, op, threshold, percent=False):
        """pairs: [(label, value or None)], each compared with ``threshold`` by ``op``."""
        show = _pct if percent else (lambda x: None if x is None else f"{x:.2f}x")
        values = [x for _, x in pairs]
        measured = [x for x in values if x is not None]
        if any(not checks[op](x, threshold) for x in measured):
            passed = False
        else:
            passed = True if measured and len(measured) == len(values) else None
        out.append(
            {
                "what": what,
                "values": values,
                "passed": passed,
                "measured": ", ".join(f"{label}: {show(x) or '–'}" for label, x in pairs) or "not measured",
                "target": f"{op} {threshold:.0%}" if percent else f"{op} {threshold}x",
            }
        )

    Ds = sorted({r["shape"]["D"] for r in _ok(rows) if r["bench"] == "routed_linear"})

    def per_D(num, den):
        pairs = []
        for D in Ds:
            a = num(D)
            b = den(D)
            pairs.append((f"D={D}", _ratio(_ms(a), _ms(b))))
        return pairs

    def fast_rl(D):
        return _best_fast(rows, bench="routed_linear", mode="fwd+bwd", shape={"D": D})

    def best_rl(variants):
        return lambda D: _best(rows, variants, bench="routed_linear", mode="fwd+bwd", shape={"D": D})

    add(
        "routed linear fwd+bwd: fast time / one dense D×D linear",
        per_D(fast_rl, best_rl(("dense_linear",))),
        "<=",
        TARGETS["routed_vs_dense"],
    )
    add(
        "routed linear fwd+bwd: speed-up over the best reference variant",
        per_D(best_rl(REFERENCE_VARIANTS), fast_rl),
        ">=",
        TARGETS["routed_vs_reference"],
    )
    official = per_D(best_rl(OFFICIAL_VARIANTS), fast_rl)
    out.append(
        {
            "what": "routed linear fwd+bwd: speed-up over the best official variant (no target)",
            "values": [x for _, x in official],
            "passed": None,
            "target": "–",
            "measured": ", ".join(f"{label}: {_fmt(x, '.2f')}x" for label, x in official) or "not measured",
        }
    )

    # DiffMoE: E experts at capacity 1 process S rows, the dense MLP's activated work
    moe_Ds = sorted({r["shape"]["D"] for r in _ok(rows) if r["bench"] == "expert_mlp"})
    moe = dict(bench="expert_mlp", mode="fwd+bwd")
    add(
        "DiffMoE expert MLP fwd+bwd: fast time / one dense MLP of equal activated size",
        [
            (
                f"D={D}",
                _ratio(
                    _ms(_best_fast(rows, **moe, shape={"D": D})),
                    _ms(_find(rows, variant="dense_mlp", **moe, shape={"D": D})),
                ),
            )
            for D in moe_Ds
        ],
        "<=",
        TARGETS["moe_vs_dense_mlp"],
    )

    sizes = sorted({r["shape"]["model"].rsplit("-", 1)[1] for r in _ok(rows) if r["suite"] == "block"})

    def blk(fam, size):
        return dict(suite="block", bench=f"{fam} block", mode="fwd+bwd", shape={"model": f"{fam}-{size}"})

    add(
        "fast Switch-DiT block fwd+bwd time / best reference dense DiT block",
        [
            (
                size,
                _ratio(
                    _ms(_best_fast(rows, **blk("Switch-DiT", size))),
                    _ms(_best(rows, REFERENCE_VARIANTS, **blk("DiT", size))),
                ),
            )
            for size in sizes
        ],
        "<",
        TARGETS["block_vs_dense_dit"],
    )
    add(
        "Switch-DiT block fwd+bwd: speed-up over the best reference variant",
        [
            (
                size,
                _ratio(
                    _ms(_best(rows, REFERENCE_VARIANTS, **blk("Switch-DiT", size))),
                    _ms(_best_fast(rows, **blk("Switch-DiT", size))),
                ),
            )
            for size in sizes
        ],
        ">=",
        TARGETS["block_vs_reference"],
    )

    for size, key in (("XL/2", "xl_vs_compile"), ("S/2", "s_vs_compile")):
        for precision in ("bf16-autocast", "fp16-autocast+scaler"):
            want = dict(suite="step", dtype=precision, shape={"model": f"Switch-DiT-{size}"})
            f = _best_fast(rows, **want)
            c = _best(rows, REFERENCE_VARIANTS, **want)
            if f is None and c is None and precision != "bf16-autocast":
                continue  # fp16 rows are optional; a missing bf16 row shows as "not measured"
            add(
                f"Switch-DiT-{size} training step ({precision}): speed-up over the best reference variant",
                [(f"vs {c['variant'] if c else 'reference'}", _ratio(_ms(c), _ms(f)))],
                ">=",
                TARGETS[key],
            )
    for precision in ("bf16-autocast",):
        f = _best_fast(rows, suite="step", dtype=precision, shape={"model": "Switch-DiT-XL/2"})
        add(
            f"Switch-DiT-XL/2 training step ({precision}): model FLOP utilisation, datasheet peak",
            [("fast", f["extra"].get("mfu_datasheet") if f else None)],
            ">=",
            TARGETS["xl_mfu"],
            percent=True,
        )
    syncs = [r for r in _ok(rows) if _is_fast(r) and r["suite"] == "step" and r["host_syncs"] is not None]
    if syncs:
        add(
            "host syncs per fast training step",
            [(f"{r['shape']['model']} {r['dtype'].split('-')[0]}", r["host_syncs"]) for r in syncs],
            "<=",
            0,
        )
    return out


def targets_table(rows) -> str:
    lines = ["| what | measured | target | pass |", "|---|---|---|---|"]
    for t in targets(rows):
        mark = {True: "pass", False: "**FAIL**", None: "not measured" if t["target"] != "–" else "–"}[t["passed"]]
        lines.append(f"| {t['what']} | {t['measured']} | {t['target']} | {mark} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ predictions

# bench -> the op name of switch_dit.perf_model
PREDICTED_OPS = {
    "routed_linear": "expert_mask",
    "mask_ln_modulate": "mask_ln_modulate",
    "gated_residual_ln_modulate": "residual_ln_modulate",
    "expert_mlp": "expert_mlp",
}
# the floor rows, which the model calls "dense"
FLOOR_VARIANTS = ("dense_linear", "dense_mlp")


def prediction_ms(row, device: str) -> tuple[float | None, str]:
    """The analytic model's time (ms) for an op row's strategy on ``device`` (a name), with a
    note; (None, why) where the model has no such strategy or is not there."""
    op = PREDICTED_OPS.get(row["bench"])
    if op is None or row["mode"] not in ("fwd", "bwd", "fwd+bwd"):
        return None, "no model"
    strategy = "dense" if row["variant"] in FLOOR_VARIANTS else row["variant"]
    if strategy == "triton":
        strategy = "fused"
    try:
        from switch_dit import perf_model
    except ImportError as exc:
        return None, f"switch_dit.perf_model not importable ({exc})"
    dtype = row["dtype"].split("-")[0]
    try:
        est = perf_model.estimate(op, strategy, dict(row["shape"]), dtype, device, mode=row["mode"])
    except ValueError as exc:  # a strategy or device the model does not cover
        return None, str(exc).split(";")[0][:80]
    except Exception as exc:  # noqa: BLE001 - a broken model costs its column, not the summary
        return None, f"perf_model failed: {type(exc).__name__}: {exc}"[:120]
    return est.time_s * 1e3, est.bound


README_START = "<!-- benchmarks:start -->"
README_END = "<!-- benchmarks:end -->"


def update_readme(readme: Path, folder: Path = RESULTS_DIR) -> bool:
    """Replace the text between the two markers of ``readme`` by the performance section.

    Returns False (and changes nothing) when the markers are missing: put
    ``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->`` on lines of their own
    where the section belongs.
    """
    text = Path(readme).read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    Path(readme).write_text(f"{head}{README_START}\n{performance_section(folder)}{README_END}{tail}")
    return True


# ------------------------------------------------------------------ entry


def regenerate(folder: Path = RESULTS_DIR) -> list[Path]:
    """Rewrite README.md (and chart.png) of a results folder from its JSON files."""
    folder = Path(folder)
    written = []
    if chart(folder, folder / CHART):
        written.append(folder / CHART)
    (folder / TABLE).write_text(markdown(folder))
    written.insert(0, folder / TABLE)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder", nargs="?", default=str(RESULTS_DIR))
    p.add_argument(
        "--section",
        action="store_true",
        help="print the performance section and write it into the README between the markers "
        f"{README_START} and {README_END}",
    )
    p.add_argument(
        "--readme", default=str(REPO_README), help="the README that --section updates (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print a one-line summary of the folder's files as JSON")
    args = p.parse_args(argv)
    written = regenerate(Path(args.folder))
    print("wrote " + ", ".join(str(w) for w in written))
    if args.section:
        print()
        print(performance_section(Path(args.folder)))
        if update_readme(Path(args.readme), Path(args.folder)):
            print(f"updated the performance section of {args.readme}")
        else:
            print(f"{args.readme} has no {README_START} / {README_END} markers: nothing changed", file=sys.stderr)
    if args.json:
        print(json.dumps({p.name: len(load(p)["rows"]) for p in result_files(Path(args.folder))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
