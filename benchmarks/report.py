"""Tables, chart and the README's performance section, from the kept results files.

    python -m benchmarks.report [FOLDER]             # rewrite FOLDER/README.md and FOLDER/chart.png
    python -m benchmarks.report [FOLDER] --section   # also print the README performance section
    python -m benchmarks.report --readme README.md   # and write it between the README's markers

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
CHART = "chart.png"
TABLE = "README.md"

# The issue 6 targets (H100, bf16), checked by ``performance_section``.
TARGETS = {
    "routed_vs_dense": 1.25,  # routed linear fwd+bwd / dense linear fwd+bwd, at most
    "routed_vs_reference": 4.0,  # reference / fast, at least
    "block_vs_dense_dit": 1.0,  # fast Switch-DiT block / reference DiT block, below
    "block_vs_reference": 1.5,  # reference Switch-DiT block / fast, at least
    "xl_mfu": 0.55,
    "xl_vs_compile": 1.3,
    "s_vs_compile": 2.0,
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
    out.append(f"Peaks used for the floors: {peaks['flops']['bf16'] / 1e12:.0f} TFLOP/s bf16, "
               f"{peaks['bytes_per_s'] / 1e12:.2f} TB/s ({peaks['source']}).")
    out.append("")
    out.append("| run | command | mode | commit | torch | triton | CUDA | timer | measured peaks |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for run in data["runs"]:
        v, g, mp = run["versions"], run["git"], run.get("measured_peaks") or {}
        commit = (g.get("commit") or "?")[:10] + (" (dirty)" if g.get("dirty") else "")
        meas = (f"{mp['flops']['bf16'] / 1e12:.3g} TFLOP/s, {mp['bytes_per_s'] / 1e12:.3g} TB/s"
                if mp.get("flops") else "–")
        out.append(f"| {run['id']} | `{run['command']}` | {run['mode']} | {commit} | {v.get('torch')} | "
                   f"{v.get('triton')} | {v.get('cuda')} | {run['timer']} | {meas} |")
    out.append("")
    out += _ops_table(rows) + _block_table(rows) + _step_table(rows) + _problems_table(rows)
    return "\n".join(out)


def _ops_table(rows) -> list[str]:
    ops = [r for r in _ok(rows) if r["suite"] == "ops"]
    if not ops:
        return []
    out = ["### Ops", "",
           "Time in ms: median (p20–p80). *vs ref*: reference time / this time (higher is faster). "
           "*× floor*: time over max(FLOPs, bytes) at the peak rates. TFLOP/s counts the op's least work "
           "(one dense GEMM for the routed linear). *rerun*: the second timing's distance from the median "
           "(differences below it are noise). *wall ms*: back-to-back calls, host overhead included.", "",
           "| op | shape | dtype | mode | variant | ms | rerun | vs ref | × floor | TFLOP/s | GB/s | wall ms | syncs |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ops:
        ref = _find(rows, suite="ops", bench=r["bench"], variant="reference", mode=r["mode"],
                    dtype=r["dtype"], shape=r["shape"])
        out.append(f"| {r['bench']} | {_shape_text(r['shape'])} | {r['dtype']} | {r['mode']} | {r['variant']} | "
                   f"{_ms_cell(r)} | {_rerun(r)} | {_fmt(_ratio(_ms(ref), _ms(r)), '.2f')} | {_fmt(r['over_floor'], '.2f')} | "
                   f"{_fmt(r['tflops'], '.1f')} | {_fmt(r['gbps'], '.0f')} | {_fmt(r['wall_ms'], '.4g')} | "
                   f"{_fmt(r['host_syncs'], '.0f')} |")
    return out + [""]


def _block_table(rows) -> list[str]:
    blocks = [r for r in _ok(rows) if r["suite"] == "block"]
    if not blocks:
        return []
    out = ["### Blocks", "",
           "1-block models (embedders, one block, final layer). *vs ref*: the same family's reference "
           "time / this time; *vs DiT ref*: the reference dense DiT block's time / this time.", "",
           "| block | model | dtype | mode | variant | ms | rerun | vs ref | vs DiT ref | × floor | peak MiB | syncs |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in blocks:
        ref = _find(rows, suite="block", bench=r["bench"], variant="reference", mode=r["mode"], dtype=r["dtype"],
                    shape={"model": r["shape"]["model"], "B": r["shape"]["B"]})
        dense = _find(rows, suite="block", bench="DiT block", variant="reference", mode=r["mode"], dtype=r["dtype"],
                      shape={"model": "DiT-" + r["shape"]["model"].rsplit("-", 1)[1], "B": r["shape"]["B"]})
        out.append(f"| {r['bench']} | {r['shape']['model']} B={r['shape']['B']} | {r['dtype']} | {r['mode']} | "
                   f"{r['variant']} | {_ms_cell(r)} | {_rerun(r)} | {_fmt(_ratio(_ms(ref), _ms(r)), '.2f')} | "
                   f"{_fmt(_ratio(_ms(dense), _ms(r)), '.2f')} | {_fmt(r['over_floor'], '.2f')} | "
                   f"{_fmt(r['peak_mem_mib'], '.0f')} | {_fmt(r['host_syncs'], '.0f')} |")
    return out + [""]


def _step_table(rows) -> list[str]:
    steps = [r for r in _ok(rows) if r["suite"] == "step"]
    if not steps:
        return []
    out = ["### Training step", "",
           "Forward, loss with the prior, backward, AdamW, EMA. *vs compile*: the reference Switch-DiT "
           "under torch.compile in the same precision / this time. MFU: analytic model FLOPs (3x forward) "
           "over the peak.", "",
           "| model | precision | variant | step ms | img/s | MFU | vs compile | × floor | peak GiB | syncs/step | first step s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        model = r["shape"]["model"]
        base = _find(rows, suite="step", variant="reference+compile", dtype=r["dtype"],
                     shape={"model": "Switch-DiT-" + model.rsplit("-", 1)[1], "B": r["shape"]["B"]})
        ex = r["extra"]
        peak = None if r["peak_mem_mib"] is None else r["peak_mem_mib"] / 1024
        out.append(f"| {model} B={r['shape']['B']} | {r['dtype']} | {r['variant']} | {_ms_cell(r)} | "
                   f"{_fmt(ex.get('images_per_s'), '.1f')} | {_pct(ex.get('mfu')) or '–'} | "
                   f"{_fmt(_ratio(_ms(base), _ms(r)), '.2f')} | {_fmt(r['over_floor'], '.2f')} | "
                   f"{_fmt(peak, '.1f')} | {_fmt(r['host_syncs'], '.1f')} | {_fmt(ex.get('first_step_s'), '.1f')} |")
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
    out = ["### Skipped and failed", "", "| status | suite | bench | variant | rows | reason |", "|---|---|---|---|---|---|"]
    for (status, suite, bench, variant, reason), n in groups.items():
        out.append(f"| {status} | {suite} | {bench} | {variant} | {n} | {reason.replace('|', '/')} |")
    return out + [""]


def markdown(folder: Path) -> str:
    files = [(p, load(p)) for p in result_files(folder)]
    out = ["# Benchmark results", "",
           "Generated by `python -m benchmarks.report` from every results file in this folder "
           "(newest first); it is rebuilt from them, so do not edit it by hand. How to run: ../README.md.", ""]
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
        _bars(row_axes[0], [r for r in rows if r["bench"] == "routed_linear" and r["mode"] == "fwd+bwd"],
              lambda r: f"D={r['shape']['D']}", "ms", f"{title}\nrouted linear fwd+bwd (ms, log)", log=True)
        _bars(row_axes[1], [r for r in rows if r["suite"] == "block" and r["mode"] == "fwd+bwd"],
              lambda r: f"{r['bench'].split()[0]}\n{r['shape']['model'].rsplit('-', 1)[1]}", "ms",
              "block fwd+bwd (ms, log)", log=True)
        _bars(row_axes[2], [r for r in rows if r["suite"] == "step"],
              lambda r: f"{r['shape']['model']}\n{r['dtype'].split('-')[0]}", "images_per_s",
              "training step (images/s)", log=False)
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
    """Markdown for the top-level README: the issue targets against the newest GPU results
    (the newest file of any kind when no GPU file exists, marked as a smoke run)."""
    files = [(p, load(p)) for p in result_files(folder)]
    gpu = [(p, d) for p, d in files if d["device"]["kind"] == "cuda"]
    pick = gpu[-1] if gpu else (files[-1] if files else None)
    lines = ["## Performance", ""]
    if pick is None:
        return "\n".join(lines + ["No benchmark results yet: run `python -m benchmarks` on a GPU "
                                  "(see benchmarks/README.md)."]) + "\n"
    path, data = pick
    rows = data["rows"]
    run = data["runs"][-1]
    v = run["versions"]
    commit = (run["git"].get("commit") or "?")[:10]
    commands = ", ".join(dict.fromkeys(f"`{r['command']}`" for r in data["runs"]))
    lines.append(f"Measured on {data['device']['name']} with {commands} (torch {v.get('torch')}, "
                 f"triton {v.get('triton')}, CUDA {v.get('cuda')}, commit {commit}); every figure, with its "
                 f"spread and baselines, is in benchmarks/results/ (`{path.name}`).")
    if data["device"]["kind"] != "cuda":
        lines.append("")
        lines.append("*These are CPU smoke-run numbers: they check the harness and say nothing about speed.*")
    lines += ["", "| what | measured | target |", "|---|---|---|"]
    for what, measured, target in _target_rows(rows):
        lines.append(f"| {what} | {measured} | {target} |")
    return "\n".join(lines) + "\n"


def _target_rows(rows):
    fast = ("fast", "fast+compile")
    Ds = sorted({r["shape"]["D"] for r in _ok(rows) if r["bench"] == "routed_linear"})

    def per_D(num_variants, den_variants, invert=False):
        vals = []
        for D in Ds:
            a = _best(rows, num_variants, bench="routed_linear", mode="fwd+bwd", shape={"D": D})
            b = _best(rows, den_variants, bench="routed_linear", mode="fwd+bwd", shape={"D": D})
            x = _ratio(_ms(b), _ms(a)) if invert else _ratio(_ms(a), _ms(b))
            vals.append(f"D={D}: {_fmt(x, '.2f')}x")
        return ", ".join(vals) if vals else "not measured yet"

    yield ("routed linear fwd+bwd time / one dense D×D linear", per_D(fast, ("dense_linear",)),
           f"≤ {TARGETS['routed_vs_dense']}x")
    yield ("routed linear fwd+bwd speed-up over the reference path", per_D(fast, ("reference",), invert=True),
           f"≥ {TARGETS['routed_vs_reference']}x")
    yield ("routed linear fwd+bwd speed-up over the official algorithm",
           per_D(fast, ("official",), invert=True), "–")

    sizes = sorted({r["shape"]["model"].rsplit("-", 1)[1] for r in _ok(rows) if r["suite"] == "block"})
    dense, ref = [], []
    for size in sizes:
        f = _best(rows, fast, suite="block", bench="Switch-DiT block", mode="fwd+bwd", shape={"model": f"Switch-DiT-{size}"})
        d = _find(rows, suite="block", bench="DiT block", variant="reference", mode="fwd+bwd", shape={"model": f"DiT-{size}"})
        r = _find(rows, suite="block", bench="Switch-DiT block", variant="reference", mode="fwd+bwd",
                  shape={"model": f"Switch-DiT-{size}"})
        dense.append(f"{size}: {_fmt(_ratio(_ms(f), _ms(d)), '.2f')}x")
        ref.append(f"{size}: {_fmt(_ratio(_ms(r), _ms(f)), '.2f')}x")
    yield ("fast Switch-DiT block fwd+bwd time / reference dense DiT block", ", ".join(dense) or "not measured yet",
           f"< {TARGETS['block_vs_dense_dit']}x")
    yield ("fast Switch-DiT block fwd+bwd speed-up over the reference Switch-DiT block",
           ", ".join(ref) or "not measured yet", f"≥ {TARGETS['block_vs_reference']}x")

    for size, key in (("XL/2", "xl_vs_compile"), ("S/2", "s_vs_compile")):
        for precision in ("bf16-autocast", "fp16-autocast+scaler"):
            f = _best(rows, fast, suite="step", dtype=precision, shape={"model": f"Switch-DiT-{size}"})
            c = _find(rows, suite="step", variant="reference+compile", dtype=precision, shape={"model": f"Switch-DiT-{size}"})
            o = _find(rows, suite="step", variant="official+compile", dtype=precision, shape={"model": f"Switch-DiT-{size}"})
            if f is None and c is None:
                continue
            measured = f"{_fmt(_ratio(_ms(c), _ms(f)), '.2f')}x"
            if o is not None:
                measured += f" (vs official + compile: {_fmt(_ratio(_ms(o), _ms(f)), '.2f')}x)"
            yield (f"Switch-DiT-{size} training step ({precision}) speed-up over reference + torch.compile",
                   measured, f"≥ {TARGETS[key]}x")
    for precision in ("bf16-autocast",):
        f = _best(rows, fast, suite="step", dtype=precision, shape={"model": "Switch-DiT-XL/2"})
        r = _best(rows, ("reference+compile", "reference"), suite="step", dtype=precision,
                  shape={"model": "Switch-DiT-XL/2"})
        mfu = lambda row: _pct(row["extra"].get("mfu")) if row else None  # noqa: E731
        yield (f"Switch-DiT-XL/2 training step model FLOP utilisation ({precision})",
               f"fast: {mfu(f) or '–'}; best reference: {mfu(r) or '–'}", f"≥ {TARGETS['xl_mfu']:.0%}")
    syncs = [(r["variant"], r["host_syncs"]) for r in _ok(rows)
             if r["suite"] == "step" and r["shape"]["model"].startswith("Switch-DiT") and r["dtype"] == "bf16-autocast"
             and r["host_syncs"] is not None and r["shape"]["model"].endswith("XL/2")]
    if syncs:
        yield ("host syncs per Switch-DiT-XL/2 training step (bf16)",
               ", ".join(f"{v}: {n:.0f}" for v, n in syncs), "fast: 0")


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
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default=str(RESULTS_DIR))
    p.add_argument("--section", action="store_true", help="print the README performance section")
    p.add_argument("--readme", default=None,
                   help="also rewrite the performance section of this README between the markers "
                        f"{README_START} and {README_END}")
    p.add_argument("--json", action="store_true", help="print a one-line summary of the folder's files as JSON")
    args = p.parse_args(argv)
    written = regenerate(Path(args.folder))
    print("wrote " + ", ".join(str(w) for w in written))
    if args.section:
        print()
        print(performance_section(Path(args.folder)))
    if args.readme:
        if update_readme(Path(args.readme), Path(args.folder)):
            print(f"updated the performance section of {args.readme}")
        else:
            print(f"{args.readme} has no {README_START} / {README_END} markers: nothing changed", file=sys.stderr)
    if args.json:
        print(json.dumps({p.name: len(load(p)["rows"]) for p in result_files(Path(args.folder))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
