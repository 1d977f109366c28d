"""Pictures of a run: the denoising paths (the paper's Fig. 8) and the loss curves.

    denoising_paths(model)            data: every block's top-k experts per timestep, and the
                                      matched w_prior (no drawing, no matplotlib)
    plot_denoising_paths(paths, png)  w_gate stacked over t beside the matched w_prior
    PathRecorder(every, out_dir)      the same figure every K training steps
    read_log(log.jsonl)               the training log as columns
    plot_loss_curves(log, png)        total, noise (mse), vb and prior parts against the step

matplotlib is optional: the data functions work without it, the plot functions raise an
ImportError that says what to install. Figures are drawn on a ``matplotlib.figure.Figure``
(no pyplot), so they change no global backend and need no display.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import prior as prior_lib

__all__ = [
    "PathData",
    "denoising_paths",
    "plot_denoising_paths",
    "PathRecorder",
    "read_log",
    "plot_loss_curves",
]

LOSS_PARTS = ("loss", "mse", "vb", "prior")
_TITLES = {
    "loss": "total loss",
    "mse": "noise (MSE on epsilon)",
    "vb": "variational bound (vb)",
    "prior": "diffusion prior (L_dp)",
}


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("drawing figures needs matplotlib: pip install matplotlib") from e
    return Figure


@dataclass
class PathData:
    """The denoising paths of a Switch-DiT (T timesteps, N blocks, M experts), float32 on the CPU.

    gate_probs (T, N, M): every block's gate softmax for every timestep.
    w_gate (T, N, M): 1 where the expert is among the block's top-k at t (the paper's w_gate).
    w_prior (T, N, M): the fixed prior of Eq. 7, its columns permuted by the Hungarian matching
        onto w_gate's units (unit n*M + j of w_gate is matched to column ``match[n*M + j]``).
    match (N*M,) int64; mismatch: sum over t and units of |w_gate - w_prior| (0 = on the prior).
    """

    gate_probs: torch.Tensor
    w_gate: torch.Tensor
    w_prior: torch.Tensor
    match: torch.Tensor
    mismatch: float
    top_k: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.w_gate.shape)

    def experts(self, t: int, block: int) -> list[int]:
        """The experts block ``block`` uses at timestep ``t``, ascending."""
        return torch.nonzero(self.w_gate[t, block]).flatten().tolist()


@torch.no_grad()
def denoising_paths(model) -> PathData:
    """Read the paths off a Switch-DiT: its (T, N, M) gate table and the matched prior.

    The matching is the one the prior loss uses, solved without the random column shuffle, so
    the figure is the same on every call (ties may pair differently than in training; the
    cost is the same).
    """
    if getattr(model, "routing", None) != "switch":
        raise ValueError(
            f"model must be a Switch-DiT (routing 'switch'), got routing={getattr(model, 'routing', None)!r}"
        )
    probs = model.gate_table().float().cpu()  # (T, N, M)
    T, N, M = probs.shape
    w_gate = prior_lib.activation_map(probs, model.top_k)  # (T, N*M)
    w_prior = model.w_prior.float().cpu()
    match = prior_lib.assign(prior_lib.matching_cost(w_gate, w_prior))
    matched = w_prior[:, match]
    return PathData(
        gate_probs=probs,
        w_gate=w_gate.view(T, N, M),
        w_prior=matched.view(T, N, M),
        match=match,
        mismatch=float((w_gate - matched).abs().sum()),
        top_k=model.top_k,
    )


def _draw_map(ax, image, N: int, M: int, title: str) -> None:
    # Rows are the N*M units (block-major), columns the timesteps: the "stacked over t" map.
    ax.imshow(
        image.T.numpy(),
        aspect="auto",
        interpolation="nearest",
        cmap="Greys",
        vmin=0,
        vmax=1,
        extent=(-0.5, image.shape[0] - 0.5, N * M - 0.5, -0.5),
    )
    for n in range(1, N):
        ax.axhline(n * M - 0.5, color="tab:red", linewidth=0.6)
    step = max(1, math.ceil(N / 16))  # at most ~16 labels on the axis
    ax.set_yticks([n * M + (M - 1) / 2 for n in range(0, N, step)])
    ax.set_yticklabels([f"block {n}" for n in range(0, N, step)], fontsize=7)
    ax.set_xlabel("timestep t")
    ax.set_title(title, fontsize=9)


def plot_denoising_paths(paths: PathData, path, title: str | None = None, dpi: int = 120) -> Path:
    """Write the paths figure as a PNG: w_gate (left) and the matched w_prior (right), each with one
    row per (block, expert), block 0 at the top, and the T timesteps left to right. Returns the path."""
    if not isinstance(paths, PathData):
        raise TypeError(f"paths must be a PathData (see denoising_paths), got {type(paths).__name__}")
    Figure = _figure_class()
    T, N, M = paths.shape
    fig = Figure(figsize=(10, max(2.5, 0.12 * N * M + 1.2)), layout="constrained")
    ax_gate, ax_prior = fig.subplots(1, 2, sharey=True)
    _draw_map(ax_gate, paths.w_gate.reshape(T, N * M), N, M, f"stacked w_gate (top-{paths.top_k} of {M} experts)")
    _draw_map(ax_prior, paths.w_prior.reshape(T, N * M), N, M, "matched w_prior")
    fig.suptitle(
        (
            title
            or f"denoising paths: {N} blocks x {M} experts, {T} timesteps "
            f"(mismatch {paths.mismatch:.0f} of {T * N * M} cells)"
        )
        + "; black = expert used",
        fontsize=10,
    )
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


class PathRecorder:
    """Draw the paths figure every ``every`` training steps: call ``recorder(model, step)``
    after each step (``step`` counts from 1). Files: ``out_dir/paths-{step:07d}.png``."""

    def __init__(self, every: int, out_dir):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        _figure_class()  # fail at set-up, not after hours of training
        self.every = every
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []

    def __call__(self, model, step: int) -> Path | None:
        if step % self.every:
            return None
        png = plot_denoising_paths(
            denoising_paths(model), self.out_dir / f"paths-{step:07d}.png", title=f"denoising paths at step {step}"
        )
        self.written.append(png)
        return png


def read_log(path) -> dict[str, list[float]]:
    """A training ``log.jsonl`` (one JSON object per logged step) as columns: {"step": [...],
    "loss": [...], ...}; a key missing from a record reads as NaN. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log {str(path)!r} does not exist")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} line {n} is not JSON: {e}") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{str(path)!r} line {n} is not a training record (no 'step')")
        records.append(rec)
    if not records:
        raise ValueError(f"training log {str(path)!r} has no records")
    keys = ["step"] + sorted({k for r in records for k in r if k != "step"})
    return {k: [float(r.get(k, math.nan)) for r in records] for k in keys}


def plot_loss_curves(log, path, dpi: int = 120) -> Path:
    """PNG of the loss parts against the step, one panel each (log scale where positive).
    ``log``: a log.jsonl path or the dict of ``read_log``. Returns the path."""
    columns = read_log(log) if isinstance(log, (str, Path)) else log
    parts = [k for k in LOSS_PARTS if k in columns]
    if "step" not in columns or not parts:
        raise ValueError(f"log has none of the loss columns {LOSS_PARTS} (columns: {sorted(columns)})")
    Figure = _figure_class()
    fig = Figure(figsize=(3.2 * len(parts), 3.0), layout="constrained")
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, key in zip(axes, parts):
        values = columns[key]
        ax.plot(columns["step"], values, linewidth=1.0)
        finite = [v for v in values if math.isfinite(v)]
        if finite and min(finite) > 0:
            ax.set_yscale("log")
        ax.set_title(_TITLES.get(key, key), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path
