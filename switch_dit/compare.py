"""A miniature of the paper's Table 2: model families trained alike on the digits.

    compare(CompareConfig(...))   train every family with every seed (``switch_dit.train``),
                                  sample from the EMA weights, score with the digits metrics;
                                  then again at equal wall time (see below)
    summarize(rows)               mean and spread over seeds, one row per family
    noise_verdicts(summary)       which differences between families exceed the seed spread
    format_table(rows, cfg)       the printed tables, with the budget, seeds and verdicts

The families share everything but the block: the same width, depth, heads, patch, optimizer,
steps, batch, data order and timesteps (the seed), and the same sampler. The paper's columns
become: parameters (total and activated), GFLOPs of one forward (multiply-adds, the convention
of the DiT papers), and instead of FID-50K / IS / precision on ImageNet the download-free
digits metrics (accuracy of a real-digits classifier on class-conditional samples, and the
Frechet distance in its feature space; see ``switch_dit.metrics``).

Families are pluggable: ``register_family("Remix-DiT")`` adds a row for the models named
``Remix-DiT-<size>``; ``train`` and ``sample`` give the TrainConfig fields and sampler
arguments a family needs beyond the shared ones (a flow-matching family, say), and
``init_from`` names a family whose run of the same seed initialises this one.

Remix-DiT (registered, not in the defaults: ``--families DiT,DTR,Switch-DiT,Remix-DiT``)
starts, as published, from a trained DiT: the DiT run of the same seed that the comparison
trains anyway (its final EMA weights, each mixed layer repeated K times), then trains the
shared budget with the published recipe (20 experts, interval timesteps, the coefficient
prior). Its columns count its own steps and seconds only; the table says so.

Defaults. The demo's sampler (DDIM 50 steps, guidance 4: ``config.DIGITS_PRESET``), 1000
steps of batch 64 and two seeds: on an idle two-core CPU the three families take about ten
minutes (estimated from step times measured there; the one measured run of these defaults
ran on a loaded machine).
Measured with 500 steps, one seed and guidance 1.5 every family sat at 21-22 % accuracy
(chance 10 %), a table without signal; 1500 steps and two seeds separated DiT from Switch-DiT
but took ten minutes for two families. The numbers measured with these defaults are in
README.md ("A miniature Table 2").

Equal wall time. A family whose step costs more (Switch-DiT's experts, on a CPU) gets the same
steps, hence more time. The second table scores every family at the training time of the
fastest family: its newest checkpoint (every ``eval_every`` steps) within the steps that time
buys it. Step costs come from the quickest quarter of each run's log windows, so that other
jobs on a shared machine distort them less than they distort total times; they are this
device's, and the table says which.

Noise. With n seeds per family, a difference of means is called beyond the seed spread when it
exceeds ``NOISE_SE`` standard errors (sqrt(s1^2/n1 + s2^2/n2), s the std over seeds). With
two seeds this is a rough screen, not a significance test; with one seed nothing can be said,
and the output says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import DIGITS_PRESET

__all__ = [
    "Family",
    "FAMILIES",
    "register_family",
    "CompareConfig",
    "compare",
    "summarize",
    "noise_verdicts",
    "format_table",
    "forward_gflops",
    "NOISE_SE",
]

NOISE_SE = 2.0  # differences under this many standard errors over seeds are "within noise"
METRICS = (("sample_accuracy", "accuracy", +1), ("frechet_distance", "FD", -1))  # key, label, better direction


@dataclass(frozen=True)
class Family:
    """A row of the table: models named ``<model>-<size>`` (``model`` defaults to the row's
    name), trained with the shared budget plus ``train`` (TrainConfig fields) and sampled with
    the shared sampler plus ``sample`` (``sampling.generate`` arguments)."""

    name: str
    model: str
    train: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)
    init_from: str | None = None  # a family whose final EMA weights (same seed) start this one


FAMILIES: dict[str, Family] = {}


def register_family(
    name: str,
    model: str | None = None,
    *,
    train: dict | None = None,
    sample: dict | None = None,
    init_from: str | None = None,
) -> Family:
    """Add (or replace) a family of ``compare``; returns it."""
    family = Family(name, model or name, dict(train or {}), dict(sample or {}), init_from)
    FAMILIES[name] = family
    return family


for _name in ("DiT", "DTR", "Switch-DiT"):
    register_family(_name)
register_family("Remix-DiT", init_from="DiT")  # switch_dit.remix_dit, from the DiT run of the same seed
# switch_dit.diffmoe with its published objective (rectified flow, E = 16), sampled with Euler.
register_family("DiffMoE", train={"objective": "flow"}, sample={"method": "euler"})
DEFAULT_FAMILIES = ("DiT", "DTR", "Switch-DiT")


@dataclass
class CompareConfig:
    """The shared budget. ``size`` is the named size and patch (e.g. "S/4"), shrunk to
    hidden_size / depth / num_heads (0 keeps the named value). ``eval_every``: steps between
    the checkpoints that the equal-wall-time table samples from."""

    size: str = "S/4"
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    image_size: int = 16
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    seeds: tuple[int, ...] = (0, 1)
    families: tuple[str, ...] = DEFAULT_FAMILIES
    samples_per_class: int = 20
    sample_method: str = DIGITS_PRESET["sample_method"]
    sample_steps: int = DIGITS_PRESET["sample_steps"]
    cfg_scale: float = DIGITS_PRESET["cfg_scale"]
    eval_every: int = 100
    device: str = "auto"
    out: str | None = None
    progress: bool = False
    extra: dict = field(default_factory=dict)  # more TrainConfig fields, the same for every family

    def __post_init__(self) -> None:
        from .models import MODEL_NAMES

        if f"DiT-{self.size}" not in MODEL_NAMES:
            raise ValueError(f"size must be a named size and patch such as 'S/4', got {self.size!r}")
        self.seeds = tuple(self.seeds)
        self.families = tuple(self.families)
        if not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of ints, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds!r}")
        unknown = [f for f in self.families if f not in FAMILIES]
        if not self.families or unknown:
            raise ValueError(f"families must be a non-empty subset of {tuple(FAMILIES)}, got {self.families!r}")
        for i, name in enumerate(self.families):
            first = FAMILIES[name].init_from
            if first is not None and first not in self.families[:i]:
                raise ValueError(
                    f"families: {name} starts from the {first} run of the same seed, so {first} must "
                    f"come before it, got {self.families!r}"
                )
        for name in ("steps", "batch_size", "samples_per_class", "sample_steps", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


def forward_gflops(model, batch: int = 1) -> float:
    """Multiply-adds of one forward of ``batch`` images, in units of 1e9 (FLOPs / 2 as torch
    counts them: the papers' GFLOPs convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .train import forward_zeros

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        forward_zeros(model, batch)
    return counter.get_total_flops() / 2e9


def _train_config(cfg: CompareConfig, family: Family, seed: int, out: Path):
    from .config import TrainConfig

    return TrainConfig(
        **{
            "model": f"{family.model}-{cfg.size}",
            "hidden_size": cfg.hidden_size,
            "depth": cfg.depth,
            "num_heads": cfg.num_heads,
            "image_size": cfg.image_size,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "warmup_steps": min(cfg.warmup_steps, cfg.steps),
            "seed": seed,
            "device": cfg.device,
            "out": str(out),
            "sample": False,
            "progress": cfg.progress,
            "log_every": max(1, min(25, cfg.steps)),
            # Checkpoints for the equal-wall-time table, all kept until compare() has chosen.
            "ckpt_every": cfg.eval_every,
            "keep_checkpoints": cfg.steps // cfg.eval_every + 1,
            # Eager: compiling would put a minute of compile time into the wall times compared here.
            "compile": "none",
            **({"init_from": str(out.parent / f"{family.init_from}-seed{seed}")} if family.init_from else {}),
            **cfg.extra,
            **family.train,
        }
    )


def _score(model, cfg: CompareConfig, family: Family, seed: int, device) -> dict:
    """Sample samples_per_class digits of every class from ``model`` and score them."""
    from .metrics import digits_metrics
    from .sampling import generate, grid_labels

    labels = grid_labels(cfg.samples_per_class, model.num_classes, device=device)
    t0 = time.perf_counter()
    sampler = {
        "method": cfg.sample_method,
        "steps": cfg.sample_steps,
        "cfg_scale": cfg.cfg_scale,
        "noise_schedule": "cosine",
        **family.sample,
    }
    samples = generate(model, labels, seed=seed, **sampler)
    seconds = time.perf_counter() - t0
    quality = digits_metrics(samples.cpu(), labels.cpu())
    return {
        "sample_seconds": seconds,
        **{
            k: quality[k]
            for k in ("sample_accuracy", "frechet_distance", "real_frechet_distance", "classifier_test_accuracy")
        },
    }


def compare(cfg: CompareConfig, log=print) -> list[dict]:
    """Train, sample and score every (family, seed), then score every family at the wall time
    of the fastest one's run; returns one dict per run (also written, with the config and the
    summary, to ``<out>/compare.json``). Every run keeps its folder (final checkpoint, log)."""
    from . import checkpoint as ckpt_lib
    from .figures import read_log
    from .models import count_params
    from .train import train

    out = Path(cfg.out) if cfg.out else Path("runs") / f"compare-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in cfg.families:
        family = FAMILIES[name]
        for seed in cfg.seeds:
            run_dir = out / f"{name}-seed{seed}"
            log(f"[{name} seed {seed}] training {cfg.steps} steps -> {run_dir}")
            summary = train(_train_config(cfg, family, seed, run_dir), log=lambda *a, **k: None)
            device = summary["device"]
            model, _ = ckpt_lib.load_model(run_dir / "checkpoint.pt", ema=True, device=device)
            history = read_log(run_dir / "log.jsonl")
            params = count_params(model)
            row = {
                "model": name,
                "seed": seed,
                "params": params["total"],
                "activated_params": params["activated"],
                "gflops": forward_gflops(model),
                "train_seconds": summary["train_seconds"],
                "device": device,
                "steps": summary["steps"],
                "step_seconds": _step_seconds(history["steps_per_sec"]),
                "final_mse": history["mse"][-1],
                "final_loss": history["loss"][-1],
                **_score(model, cfg, family, seed, device),
                "run_dir": str(run_dir),
            }
            if family.init_from:
                row["init_from"] = family.init_from
            rows.append(row)
            log(
                f"[{name} seed {seed}] {row['train_seconds']:.0f} s, final mse {row['final_mse']:.4f}, "
                f"accuracy {row['sample_accuracy']:.1%}, FD {row['frechet_distance']:.3f}"
            )
    budget = _score_at_equal_time(rows, cfg, log)
    record = {
        "config": dataclasses.asdict(cfg),
        "rows": rows,
        "summary": summarize(rows),
        "equal_time_budget": budget,
        "equal_time_summary": summarize(rows, equal_time=True),
    }
    (out / "compare.json").write_text(json.dumps(record, indent=2) + "\n")
    return rows


def _step_seconds(steps_per_sec: list[float]) -> float:
    """Seconds per step of a run, from its log windows: the lower quartile, i.e. the run's pace
    when the machine was least busy. On a machine shared with other jobs the total time of a
    run says more about the load than about the model (measured: the same DiT run took 254 s
    and 516 s); the quickest windows of each run are comparable."""
    times = sorted(1.0 / v for v in steps_per_sec if v and math.isfinite(v) and v > 0)
    if not times:
        return math.nan
    return times[(len(times) - 1) // 4]


def _score_at_equal_time(rows: list[dict], cfg: CompareConfig, log) -> dict:
    """Add row["equal_time"] = {"seconds", "step", "sample_accuracy", "frechet_distance"} to
    every row. The budget is the training time of the fastest family (its steps times its
    seconds per step, ``_step_seconds`` averaged over its seeds); every other family is scored
    at its newest checkpoint within the steps that budget buys it. Then only the final
    checkpoints are kept. Returns the budget: {"model": fastest family, "seconds": budget}."""
    from . import checkpoint as ckpt_lib

    cost = {
        name: statistics.fmean(r["step_seconds"] for r in rows if r["model"] == name)
        for name in dict.fromkeys(r["model"] for r in rows)
    }
    fastest = min(cost, key=lambda name: cost[name] * cfg.steps)
    budget = cost[fastest] * cfg.steps
    for row in rows:
        run_dir = Path(row["run_dir"])
        name = row["model"]
        affordable = int(budget / cost[name] + 1e-9) if cost[name] > 0 else row["steps"]
        if name == fastest or affordable >= row["steps"]:
            row["equal_time"] = {
                "seconds": row["steps"] * cost[name],
                "step": row["steps"],
                **{k: row[k] for k, _, _ in METRICS},
            }
        else:
            within = [
                (step, path) for step, path in ckpt_lib.list_checkpoints(run_dir / "checkpoints") if step <= affordable
            ]
            if not within:
                row["equal_time"] = {
                    "seconds": budget,
                    "step": 0,
                    "sample_accuracy": math.nan,
                    "frechet_distance": math.nan,
                }
            else:
                step, path = within[0]  # newest first
                model = ckpt_lib.model_from_checkpoint(ckpt_lib.load_checkpoint(path), device=row["device"])
                scores = _score(model, cfg, FAMILIES[name], row["seed"], row["device"])
                row["equal_time"] = {
                    "seconds": step * cost[name],
                    "step": step,
                    **{k: scores[k] for k, _, _ in METRICS},
                }
                log(
                    f"[{name} seed {row['seed']}] at step {step} (~{step * cost[name]:.0f} s, the training time of "
                    f"{fastest}): accuracy {scores['sample_accuracy']:.1%}, FD {scores['frechet_distance']:.3f}"
                )
        ckpt_lib.prune_checkpoints(run_dir / "checkpoints", 1)  # the final one stays (checkpoint.pt links it)
    return {"model": fastest, "seconds": budget}


def _mean_std(values: list[float]) -> tuple[float, float]:
    if any(math.isnan(v) for v in values):  # a run without a score (no checkpoint within the time)
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarize(rows: list[dict], equal_time: bool = False) -> list[dict]:
    """One row per family in first-seen order: the metrics' mean and sample std over seeds
    (``<key>_std``, NaN for one seed), ``n`` seeds, the architecture columns as they are.
    ``equal_time``: the metrics of row["equal_time"] (and its step and seconds) instead."""
    out = []
    for family in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == family]
        row = {k: runs[0][k] for k in ("model", "params", "activated_params", "gflops")}
        row["seeds"] = [r["seed"] for r in runs]
        row["n"] = len(runs)
        if equal_time:
            runs = [{**r["equal_time"], "train_seconds": r["equal_time"]["seconds"]} for r in runs]
            keys = ("train_seconds", "step", "sample_accuracy", "frechet_distance")
        else:
            keys = ("train_seconds", "final_mse", "sample_accuracy", "frechet_distance")
        for key in keys:
            row[key], row[key + "_std"] = _mean_std([float(r[key]) for r in runs])
        out.append(row)
    return out


def noise_verdicts(summary: list[dict]) -> list[str]:
    """One line per pair of families and metric: the difference of means, in standard errors
    over seeds, and whether it is beyond the seed spread (``NOISE_SE``) or within noise."""
    lines = []
    for a, b in itertools.combinations(summary, 2):
        for key, label, better in METRICS:
            if a["n"] < 2 or b["n"] < 2:
                lines.append(f"{a['model']} vs {b['model']}, {label}: one seed, no spread to compare with")
                continue
            diff = a[key] - b[key]
            se = math.sqrt(a[key + "_std"] ** 2 / a["n"] + b[key + "_std"] ** 2 / b["n"])
            if math.isnan(diff):
                continue
            z = abs(diff) / se if se > 0 else (0.0 if diff == 0 else math.inf)
            if z < NOISE_SE:
                verdict = "within noise"
            else:
                winner = a["model"] if diff * better > 0 else b["model"]
                verdict = f"beyond the seed spread: {winner} better"
            lines.append(f"{a['model']} vs {b['model']}, {label}: {diff:+.3f} ({z:.1f} standard errors), {verdict}")
    return lines


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _cell(row: dict, key: str, fmt: str) -> str:
    value, std = row[key], row[key + "_std"]
    return format(value, fmt) + ("" if math.isnan(std) else " ± " + format(std, fmt))


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for n, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_table(rows: list[dict], cfg: CompareConfig) -> str:
    """The miniature Table 2 as text, headed by the budget, the seeds and the sampler; then the
    families at equal wall time (when the rows have it) and the noise verdicts."""
    summary = summarize(rows)
    floor = statistics.fmean(r["real_frechet_distance"] for r in rows)
    dims = f"D={cfg.hidden_size or 'named'}, depth {cfg.depth or 'named'}, {cfg.num_heads or 'named'} heads"
    lines = [
        f"Miniature Table 2 - digits {cfg.image_size}x{cfg.image_size}, size {cfg.size} ({dims})",
        f"budget: {cfg.steps} steps x batch {cfg.batch_size} per model (AdamW lr {cfg.lr}, warm-up "
        f"{min(cfg.warmup_steps, cfg.steps)}), seeds {', '.join(map(str, cfg.seeds))}",
        f"samples: {cfg.samples_per_class} per class from the EMA weights, {cfg.sample_method} "
        f"{cfg.sample_steps} steps, guidance {cfg.cfg_scale}",
        "",
    ]
    table = [["Model", "Params", "Activated", "GFLOPs", "Train s", "Final MSE", "Accuracy ↑", "FD ↓"]]
    for r in summary:
        table.append(
            [
                r["model"],
                _count(r["params"]),
                _count(r["activated_params"]),
                f"{r['gflops']:.3g}",
                _cell(r, "train_seconds", ".1f"),
                _cell(r, "final_mse", ".4f"),
                _cell(r, "sample_accuracy", ".3f"),
                _cell(r, "frechet_distance", ".3f"),
            ]
        )
    lines += _aligned(table)
    if all("equal_time" in r for r in rows):
        same = summarize(rows, equal_time=True)
        device = rows[0].get("device", "?")
        lines += [
            "",
            f"At equal wall time (the fastest family's training time from each family's step time on "
            f"{device}; the newest checkpoint within it, every {cfg.eval_every} steps):",
        ]
        table = [["Model", "Train s", "Step", "Accuracy ↑", "FD ↓"]]
        for r in same:
            table.append(
                [
                    r["model"],
                    _cell(r, "train_seconds", ".1f"),
                    _cell(r, "step", ".0f"),
                    _cell(r, "sample_accuracy", ".3f"),
                    _cell(r, "frechet_distance", ".3f"),
                ]
            )
        lines += _aligned(table)
    for name, first in dict.fromkeys((r["model"], r["init_from"]) for r in rows if r.get("init_from")):
        lines.append(
            f"{name} starts from the final EMA weights of the {first} run of the same seed: its columns "
            f"count its own {cfg.steps} steps and seconds, not the {first} run's."
        )
    lines += [
        "",
        f"Accuracy: a classifier of real digits ({rows[0]['classifier_test_accuracy']:.0%} on held-out "
        f"real digits) recognises the requested class; FD: Frechet distance to the held-out real digits in "
        f"its feature space (real training digits: {floor:.3f}). ± is the std over seeds.",
        f"Differences after {cfg.steps} steps (beyond the seed spread: more than {NOISE_SE:g} standard errors):",
        *("  " + line for line in noise_verdicts(summary)),
    ]
    return "\n".join(lines)
