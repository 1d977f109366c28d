"""A miniature of the paper's Table 2: DiT, DTR and Switch-DiT trained alike on the digits.

    compare(CompareConfig(...))   train every family with every seed (``switch_dit.train``),
                                  sample from the EMA weights, score with the digits metrics
    summarize(rows)               mean and spread over seeds, one row per family
    format_table(rows, cfg)       the printed table, with the budget and seeds it used

The three models share everything but the block input: the same width, depth, heads, patch,
optimizer, steps, batch, data order and timesteps (the seed), and the same sampler. The
paper's columns become: parameters (total and activated), GFLOPs of one forward (multiply-adds,
the convention of the DiT papers), and instead of FID-50K / IS / precision on ImageNet the
download-free digits metrics (accuracy of a real-digits classifier on class-conditional
samples, and the Frechet distance in its feature space; see ``switch_dit.metrics``).

The default budget (500 steps of batch 64 per model) runs in a few minutes on a laptop CPU. It
is far from convergence: differences between the families at this budget are within the spread
over seeds unless several seeds say otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["FAMILIES", "CompareConfig", "compare", "summarize", "format_table", "forward_gflops"]

FAMILIES = ("DiT", "DTR", "Switch-DiT")


@dataclass
class CompareConfig:
    """The shared budget. ``size`` is the named size and patch (e.g. "S/4"), shrunk to
    hidden_size / depth / num_heads (0 keeps the named value)."""

    size: str = "S/4"
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    image_size: int = 16
    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    seeds: tuple[int, ...] = (0,)
    families: tuple[str, ...] = FAMILIES
    samples_per_class: int = 20
    sample_method: str = "ddim"
    sample_steps: int = 50
    cfg_scale: float = 1.5
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
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {self.families!r}")
        for name in ("steps", "batch_size", "samples_per_class", "sample_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


def forward_gflops(model, batch: int = 1) -> float:
    """Multiply-adds of one forward of ``batch`` images, in units of 1e9 (FLOPs / 2 as torch
    counts them: the papers' GFLOPs convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.zeros(batch, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.full((batch,), model.num_timesteps // 2, device=device)
    y = torch.zeros(batch, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, y)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2e9


def _train_config(cfg: CompareConfig, family: str, seed: int, out: Path):
    from .config import TrainConfig

    return TrainConfig(
        model=f"{family}-{cfg.size}", hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
        image_size=cfg.image_size, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
        warmup_steps=min(cfg.warmup_steps, cfg.steps), seed=seed, device=cfg.device, out=str(out), sample=False,
        progress=cfg.progress, log_every=max(1, min(25, cfg.steps)), **cfg.extra,
    )


def compare(cfg: CompareConfig, log=print) -> list[dict]:
    """Train, sample and score every (family, seed); returns one dict per run (also written,
    with the config, to ``<out>/compare.json``). Every run keeps its folder (checkpoint, log)."""
    from .figures import read_log
    from .metrics import digits_metrics
    from .models import count_params
    from .checkpoint import load_model
    from .sampling import generate
    from .train import train

    out = Path(cfg.out) if cfg.out else Path("runs") / f"compare-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in cfg.families:
        for seed in cfg.seeds:
            run_dir = out / f"{family}-seed{seed}"
            log(f"[{family} seed {seed}] training {cfg.steps} steps -> {run_dir}")
            summary = train(_train_config(cfg, family, seed, run_dir), log=lambda *a, **k: None)
            model, _ = load_model(run_dir, ema=True, device=summary["device"])  # the run's newest checkpoint
            labels = torch.arange(model.num_classes, device=summary["device"]).repeat_interleave(cfg.samples_per_class)
            t0 = time.perf_counter()
            samples = generate(model, labels, method=cfg.sample_method, steps=cfg.sample_steps,
                               cfg_scale=cfg.cfg_scale, seed=seed, noise_schedule="cosine")
            sample_seconds = time.perf_counter() - t0
            quality = digits_metrics(samples.cpu(), labels.cpu())
            history = read_log(run_dir / "log.jsonl")
            params = count_params(model)
            row = {
                "model": family, "seed": seed, "params": params["total"], "activated_params": params["activated"],
                "gflops": forward_gflops(model), "train_seconds": summary["train_seconds"],
                "sample_seconds": sample_seconds, "final_mse": history["mse"][-1], "final_loss": history["loss"][-1],
                "sample_accuracy": quality["sample_accuracy"], "frechet_distance": quality["frechet_distance"],
                "real_frechet_distance": quality["real_frechet_distance"],
                "classifier_test_accuracy": quality["classifier_test_accuracy"], "run_dir": str(run_dir),
            }
            rows.append(row)
            log(f"[{family} seed {seed}] {row['train_seconds']:.0f} s, final mse {row['final_mse']:.4f}, "
                f"accuracy {row['sample_accuracy']:.1%}, FD {row['frechet_distance']:.3f}")
    record = {"config": dataclasses.asdict(cfg), "rows": rows, "summary": summarize(rows)}
    (out / "compare.json").write_text(json.dumps(record, indent=2) + "\n")
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarize(rows: list[dict]) -> list[dict]:
    """One row per family in first-seen order: the metrics' mean and sample std over seeds
    (``<key>_std``, NaN for one seed), the architecture columns as they are."""
    out = []
    for family in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == family]
        row = {k: runs[0][k] for k in ("model", "params", "activated_params", "gflops")}
        row["seeds"] = [r["seed"] for r in runs]
        for key in ("train_seconds", "final_mse", "sample_accuracy", "frechet_distance"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in runs])
        out.append(row)
    return out


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def format_table(rows: list[dict], cfg: CompareConfig) -> str:
    """The miniature Table 2 as text, headed by the budget, the seeds and the sampler."""
    summary = summarize(rows)

    def cell(row, key, fmt):
        value, std = row[key], row[key + "_std"]
        return format(value, fmt) + ("" if math.isnan(std) else " ± " + format(std, fmt))

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
    header = ["Model", "Params", "Activated", "GFLOPs", "Train s", "Final MSE", "Accuracy ↑", "FD ↓"]
    table = [header]
    for r in summary:
        table.append([
            r["model"], _count(r["params"]), _count(r["activated_params"]), f"{r['gflops']:.3g}",
            cell(r, "train_seconds", ".1f"), cell(r, "final_mse", ".4f"), cell(r, "sample_accuracy", ".3f"),
            cell(r, "frechet_distance", ".3f"),
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        f"Accuracy: a classifier of real digits ({rows[0]['classifier_test_accuracy']:.0%} on held-out "
        f"real digits) recognises the requested class; FD: Frechet distance to the held-out real digits in "
        f"its feature space (real training digits: {floor:.3f}). ± is the std over seeds.",
    ]
    return "\n".join(lines)
