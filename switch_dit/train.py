"""Train a class-conditional Switch-DiT: the digits demo on a CPU, or VAE latents on many GPUs.

    switch-dit train                                        the digits demo, a few minutes on a CPU
    switch-dit train --data latents/in256 --out runs/xl     the paper's recipe, one process
    torchrun --nproc_per_node=8 -m switch_dit.train --data latents/in256 --out runs/xl
    torchrun --nproc_per_node=8 -m switch_dit.train --out runs/xl --resume     after a crash

One code path for one CPU process and N ranks (DDP by default, ``--parallel fsdp`` for
FSDP2). A step: this rank's slice of the global batch -> forward and backward inside
bf16/fp16 autocast (``--precision``) -> one small all-reduce of the loss parts, which
also tells every rank whether any rank saw a non-finite loss or a SIGTERM -> clip ->
AdamW step -> EMA. A non-finite step is skipped and counted; ``max_bad_steps`` of them
in a row stop the run with a checkpoint of the last good weights.

Run folder: ``config.json``; ``log.jsonl`` and ``log.csv`` (one record per ``log_every``
steps; TensorBoard events too when tensorboard is installed); ``checkpoints/ckpt-*.pt``
every ``ckpt_every`` steps and on SIGTERM (the newest ``keep_checkpoints`` kept);
``checkpoint.pt``, the final one; for the digits ``samples.png`` and ``metrics.json``;
with ``figure_every`` K, ``figures/paths-<step>.png`` (the EMA model's denoising paths).

Exact resume: every random draw comes from a generator whose state is in the checkpoint
(per rank: the global torch RNG for label dropout, the timestep/noise generator and the
flip generator; shared: the prior's tie-breaking shuffle and the data order), so a run
killed at any step and resumed with ``--resume`` computes the same losses, step for
step, as one that never stopped (same world size, device and thread count).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt_lib
from . import data as digits
from . import distributed
from .config import TrainConfig, add_train_arguments, config_from_args, load_config_file, overrides_from_args, resume_config
from .diffusion import GaussianDiffusion, create_diffusion
from .evaluate import DigitsClassifier, sample_accuracy
from .sampling import generate  # re-exported: train's samples are sampling's
from .models import DiT, create

__all__ = [
    "TrainConfig",
    "CHECKPOINT_FORMAT",
    "resolve_device",
    "model_kwargs",
    "build",
    "lr_at",
    "forward_backward",
    "update_ema",
    "ema_decay_at",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "open_data",
    "generate",
    "save_grid",
    "evaluate_samples",
    "train",
    "run_from_args",
    "main",
]

CHECKPOINT_FORMAT = ckpt_lib.FORMAT
load_checkpoint = ckpt_lib.load_checkpoint
model_from_checkpoint = ckpt_lib.model_from_checkpoint
LOG_FIELDS = ("step", "loss", "mse", "vb", "prior", "lr", "grad_norm", "steps_per_sec", "images_per_sec",
              "elapsed_s", "skipped", "scale")


def resolve_device(name: str) -> torch.device:
    """"auto" -> the GPU when there is one, else the CPU; anything else is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (use --device cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return device


# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------


class DigitsData:
    """The embedded digits' training split in memory, with the LatentsDataset interface."""

    def __init__(self, image_size: int, device="cpu"):
        split, _ = digits.load_digits(size=image_size)
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.in_channels, self.input_size, self.num_classes = 1, image_size, digits.NUM_CLASSES

    def __len__(self) -> int:
        return self.labels.shape[0]

    def get(self, indices: torch.Tensor, flip: torch.Tensor | None = None):
        idx = indices.to(self.images.device)
        x = self.images[idx]
        if flip is not None:
            x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels[idx]


def open_data(cfg: TrainConfig, device="cpu"):
    """The training set of ``cfg.data``: DigitsData or a latents.LatentsDataset (checked)."""
    if cfg.data == "digits":
        return DigitsData(cfg.image_size, device)
    from .latents import LatentsDataset

    return LatentsDataset(cfg.data, expected_image_size=cfg.image_size)


def _data_info(data) -> dict:
    return {"in_channels": data.in_channels, "input_size": data.input_size, "num_classes": data.num_classes}


# -----------------------------------------------------------------------------
# Model, optimiser and one step
# -----------------------------------------------------------------------------


def model_kwargs(cfg: TrainConfig, data_info: dict | None = None) -> dict:
    """Arguments of models.create for this run (stored in checkpoints to rebuild the model).
    data_info: in_channels, input_size, num_classes of the data; None = the digits."""
    info = data_info or {"in_channels": 1, "input_size": cfg.image_size, "num_classes": digits.NUM_CLASSES}
    kw = dict(name=cfg.model, input_size=info["input_size"], in_channels=info["in_channels"],
              num_classes=info["num_classes"], learn_sigma=True, num_experts=cfg.num_experts, top_k=cfg.top_k)
    for key in ("hidden_size", "depth", "num_heads"):
        if getattr(cfg, key):
            kw[key] = getattr(cfg, key)
    return kw


def _create(kw: dict, backend: str = "auto") -> DiT:
    kw = dict(kw)
    return create(kw.pop("name"), backend=backend, **kw)


def build(cfg: TrainConfig, device, data_info: dict | None = None) -> tuple[DiT, DiT, torch.optim.Optimizer, GaussianDiffusion]:
    """Model (train mode), its EMA twin (eval mode, no grads), AdamW and the training diffusion (one process)."""
    model = _create(model_kwargs(cfg, data_info), cfg.backend).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, ema, opt, _diffusion(cfg)


def _diffusion(cfg: TrainConfig) -> GaussianDiffusion:
    return create_diffusion(noise_schedule=cfg.noise_schedule, learn_sigma=True, lambda_dp=cfg.lambda_dp)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then constant (as DiT); step counts from 0."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class _LossModel:
    """What diffusion.training_losses calls: the wrapped net's forward, and the prior loss
    that this same forward computed (so DDP/FSDP see one forward, see distributed.py)."""

    def __init__(self, net: torch.nn.Module, prior_generator: torch.Generator | None):
        self.net, self.prior_generator, self._prior = net, prior_generator, None

    def __call__(self, x, t, y):
        out, self._prior = self.net(x, t, y, self.prior_generator)
        return out.float()  # the losses in float32 whatever the autocast dtype

    def prior_loss(self, t):
        return self._prior.float()


def forward_backward(
    net: torch.nn.Module,
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    prior_generator: torch.Generator | None = None,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Loss of one batch and its backward (gradients accumulate into ``net``).

    Timesteps and noise come from ``generator`` (on x's device) unless given; ``net``
    is a distributed.TrainingModule, bare or wrapped. Returns the batch means of loss,
    mse, vb and prior as detached float32 0-d tensors (no host sync here).
    """
    if t is None:
        t = diffusion.sample_timesteps(x.shape[0], device=x.device, generator=generator)
    if noise is None:
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    with _autocast(precision, x.device):
        parts = diffusion.training_losses(_LossModel(net, prior_generator), x, t, y, noise=noise)
    loss = parts["loss"].mean()
    (scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss).backward()
    return {k: v.detach().float().mean() for k, v in parts.items()}


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-started EMA: min(decay, (1 + n) / (10 + n)), so a short run's average is not
    dominated by the random initialisation (0.999 alone would remember ~1000 steps)."""
    return min(decay, (1.0 + step) / (10.0 + step))


def save_checkpoint(path, model: DiT, ema: DiT, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                    data_info: dict | None = None) -> None:
    """Write the weights of a single-process model (no RNG or data position: not resumable).
    The trainer writes full checkpoints itself."""
    ckpt_lib.atomic_save({
        "format": CHECKPOINT_FORMAT, "step": step, "config": cfg.to_dict(),
        "model_kwargs": model_kwargs(cfg, data_info), "model": model.state_dict(), "ema": ema.state_dict(),
        "opt": opt.state_dict(), "torch_version": str(torch.__version__),
    }, path)


# -----------------------------------------------------------------------------
# Sampling and the image grid
# -----------------------------------------------------------------------------


def grid_labels(samples_per_class: int, num_classes: int = digits.NUM_CLASSES, device="cpu") -> torch.Tensor:
    """int64 (num_classes * samples_per_class,): 0,0,..,1,1,..; one grid row per class."""
    return torch.arange(num_classes, device=device).repeat_interleave(samples_per_class)


def save_grid(images: torch.Tensor, path, nrow: int, scale: int = 2, pad: int = 2) -> None:
    """Write (N, 1, S, S) images in [-1, 1] as a PNG grid with ``nrow`` images per row,
    each magnified ``scale`` times (nearest) so that 16-pixel digits are visible."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, S, S), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    ncol = nrow
    nrows = math.ceil(n / ncol)
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    h, w = h * scale, w * scale
    canvas = torch.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad), 64, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top : top + h, left : left + w] = x[i, 0]
    Image.fromarray(canvas.numpy(), mode="L").save(path)


def evaluate_samples(samples: torch.Tensor, labels: torch.Tensor, image_size: int) -> dict:
    """Fit the digits classifier on the real training split and score the samples.

    Returns classifier_test_accuracy (its accuracy on the held-out real digits, the
    ceiling), sample_accuracy (how often it sees the requested class) and per_class.
    """
    train_split, test_split = digits.load_digits(size=image_size)
    clf = DigitsClassifier().fit(train_split)
    result = sample_accuracy(clf, samples, labels)
    return {
        "classifier_test_accuracy": clf.accuracy(test_split.images, test_split.labels),
        "sample_accuracy": result["accuracy"],
        "per_class": result["per_class"],
        "num_samples": int(labels.shape[0]),
    }


# -----------------------------------------------------------------------------
# Logs
# -----------------------------------------------------------------------------


class RunLog:
    """log.jsonl and log.csv, plus TensorBoard events when tensorboard is installed (rank 0).

    On a resume, records past the checkpoint's step are dropped first: the steps after
    it run again and write them again, so the log of a resumed run reads as one run.
    """

    def __init__(self, folder: Path, resume_step: int | None, log=print):
        self.jsonl_path, self.csv_path = folder / "log.jsonl", folder / "log.csv"
        if resume_step is None:
            for p in (self.jsonl_path, self.csv_path):
                p.unlink(missing_ok=True)
        else:
            self._truncate(resume_step)
        write_header = not self.csv_path.exists()
        self._jsonl = open(self.jsonl_path, "a")
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=LOG_FIELDS, extrasaction="ignore")
        if write_header:
            self._csv.writeheader()
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step)
        except ImportError:  # TensorBoard is optional; JSONL and CSV always
            pass

    def _truncate(self, step: int) -> None:
        if self.jsonl_path.exists():
            keep = [line for line in self.jsonl_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            self.jsonl_path.write_text("".join(line + "\n" for line in keep))
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= step]
            with open(self.csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)

    def write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._csv.writerow({k: ("" if v is None else v) for k, v in record.items()})
        self._csv_file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()


# -----------------------------------------------------------------------------
# The run
# -----------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint of the last good state was written."""


class _StopSignal:
    """SIGTERM sets a flag; the loop reads it after each step (all ranks agree through the
    step's all-reduce), checkpoints and stops."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no checkpoint on SIGTERM
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def default_run_dir(data: str = "digits", root: str = "runs") -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = "digits" if data == "digits" else (Path(data).name or "latents")
    path = Path(root) / f"{name}-{stamp}"
    n = 1
    while path.exists():  # two runs started in the same second
        path = Path(root) / f"{name}-{stamp}-{n}"
        n += 1
    return path


def find_resume(resume, out=None, log=None) -> Path | None:
    """The checkpoint ``--resume`` means: a file; the newest complete one of a run folder
    (or of its checkpoints/); "auto": the newest of ``out``, None when it has none yet."""
    if resume is None:
        return None
    if resume == "auto":
        if not out:
            raise ValueError("--resume without a PATH needs --out (the run folder to continue)")
        found = ckpt_lib.latest_checkpoint(Path(out) / "checkpoints", log)
        return found[0] if found else None
    path = Path(resume)
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = ckpt_lib.latest_checkpoint(folder, log)
        if found is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {str(folder)!r}")
        return found[0]
    raise FileNotFoundError(f"--resume: {str(path)!r} does not exist")


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Total 2-norm of the gradients as a plain tensor (FSDP's DTensor norm is gathered)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not any(hasattr(g, "full_tensor") for g in grads):
        return torch.nn.utils.get_total_norm(grads)  # fused (foreach) norms: a few launches, not one per tensor
    # FSDP's DTensor shards: each local norm is a partial of the global one; gathered once.
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    return norm.full_tensor()


def _silent(*args, **kwargs) -> None:
    pass


class _Run:
    """The state of one training run on one rank, and the loop over it."""

    def __init__(self, cfg: TrainConfig, ctx: distributed.Context, log, started: float, ckpt: dict | None):
        self.cfg, self.ctx, self.log, self.started = cfg, ctx, log, started
        dev = ctx.device
        if dev.type == "cuda":  # as DiT: TF32 matmuls and convolutions for the fp32 parts
            torch.set_float32_matmul_precision("high")  # sets the legacy and the new TF32 flags alike
            torch.backends.cudnn.allow_tf32 = True
        self.data = open_data(cfg, dev if cfg.data == "digits" else "cpu")
        self.sampler = distributed.ShardedBatchSampler(len(self.data), cfg.batch_size, ctx.rank, ctx.world_size,
                                                       cfg.seed)
        self.info = _data_info(self.data)
        self.kwargs = model_kwargs(cfg, self.info)
        if ckpt is not None and ckpt["model_kwargs"] != self.kwargs:
            raise ValueError(f"the checkpoint's model {ckpt['model_kwargs']} differs from this run's {self.kwargs}")

        # The same initial weights on every rank (FSDP does not broadcast them, DDP does).
        torch.manual_seed(cfg.seed)
        model = _create(self.kwargs, cfg.backend).to(dev)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
        model.train()
        self.net = distributed.wrap(model, ctx, cfg.parallel, with_prior=cfg.lambda_dp > 0)
        self.model = distributed.unwrap(self.net)
        if cfg.parallel == "fsdp" and ctx.distributed:
            distributed.shard_module(ema, ctx)  # shards laid out like the model's, for a local EMA update
        self.ema = ema
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=cfg.precision == "fp16")
        self.diffusion = _diffusion(cfg)

        # Per-rank randomness (label dropout, timesteps and noise, flips) and shared (prior ties).
        rank_seed = cfg.seed * ctx.world_size + ctx.rank
        torch.manual_seed(rank_seed)
        self.gens = {"step": torch.Generator(device=dev).manual_seed(rank_seed + 1),
                     "flip": torch.Generator().manual_seed(rank_seed + 2)}
        self.prior_gen = torch.Generator().manual_seed(cfg.seed + 3)

        self.step, self.skipped, self.bad_run, self.elapsed_before = 0, 0, 0, 0.0
        self.window = self._empty_window()
        self.ckpt_dir = Path(cfg.out) / "checkpoints"
        self.last_state = None
        if ckpt is not None:
            self._restore(ckpt)

    # -- checkpoints -------------------------------------------------------------

    def _restore(self, ckpt: dict) -> None:
        missing = [k for k in ("opt", "rng", "data", "train_state") if ckpt.get(k) is None]
        if missing:
            raise ValueError(f"the checkpoint has no training state ({', '.join(missing)}): it holds weights to "
                             "sample from, not a run to resume")
        opt_state = ckpt["opt"]
        if self.cfg.parallel == "fsdp" and self.ctx.distributed:
            opt_state = distributed.shard_optimizer_state(opt_state, self.opt)
        self.opt.load_state_dict(opt_state)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        ts = ckpt["train_state"]
        self.step, self.skipped, self.bad_run = int(ts["step"]), int(ts["skipped"]), int(ts["bad_run"])
        self.elapsed_before = float(ts.get("elapsed_s", 0.0))
        self.window = {**self._empty_window(), **ts["window"]}
        self.sampler.load_state_dict(ckpt["data"])
        if ckpt.get("prior_matcher") and self.model.prior_matcher is not None:
            self.model.prior_matcher.load_state_dict(ckpt["prior_matcher"])
        self.prior_gen.set_state(ckpt["rng"]["shared"]["prior"])
        ranks = ckpt["rng"]["ranks"]
        try:
            if len(ranks) != self.ctx.world_size:
                raise ValueError(f"it was written by {len(ranks)} process(es), this run has {self.ctx.world_size}")
            ckpt_lib.restore_rng(ranks[self.ctx.rank], self.gens)
        except (ValueError, RuntimeError) as e:
            # Fresh draws, seeded by the step so that they do not replay the run's first steps.
            self.log(f"random states not restored ({e}): the data order continues exactly, noise, timesteps, "
                     "flips and label dropout are drawn afresh")
            seed = (self.cfg.seed * 1_000_003 + self.step) * self.ctx.world_size + self.ctx.rank
            torch.manual_seed(seed)
            self.gens["step"].manual_seed(seed + 1)
            self.gens["flip"].manual_seed(seed + 2)

    def ema_for_figures(self) -> DiT | None:
        """The EMA model as one plain module on rank 0, None on the others (a collective
        under FSDP, whose EMA is sharded)."""
        if self.cfg.parallel == "fsdp" and self.ctx.distributed:
            state = distributed.gather_state(self.ema.state_dict(), self.ctx.is_main)
            if state is None:
                return None
            with torch.random.fork_rng(devices=[]):  # initialising draws from the run's global RNG
                model = _create(self.kwargs, "reference")
            model.load_state_dict(state)
            return model.eval()
        return self.ema if self.ctx.is_main else None

    def save(self) -> Path | None:
        """Checkpoint the current state (a collective: every rank calls it); rank 0 writes."""
        main = self.ctx.is_main
        model_sd = distributed.gather_state(self.model.state_dict(), main)
        ema_sd = distributed.gather_state(self.ema.state_dict(), main)
        opt_sd = distributed.gather_state(self.opt.state_dict(), main)
        rng = distributed.all_gather_objects(ckpt_lib.capture_rng(self.gens), self.ctx)
        path = None
        if main:
            self.last_state = {
                "format": CHECKPOINT_FORMAT, "step": self.step, "config": self.cfg.to_dict(),
                "model_kwargs": self.kwargs, "model": model_sd, "ema": ema_sd, "opt": opt_sd,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": {"ranks": rng, "shared": {"prior": self.prior_gen.get_state()}},
                "data": self.sampler.state_dict(),
                "prior_matcher": (self.model.prior_matcher.state_dict() if self.model.prior_matcher is not None else None),
                "train_state": {"step": self.step, "skipped": self.skipped, "bad_run": self.bad_run,
                                "window": dict(self.window), "elapsed_s": self.elapsed()},
                "world_size": self.ctx.world_size, "parallel": self.cfg.parallel,
                "torch_version": str(torch.__version__),
            }
            path = ckpt_lib.atomic_save(self.last_state, ckpt_lib.checkpoint_path(self.ckpt_dir, self.step))
            ckpt_lib.prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        self.ctx.barrier()
        return path

    # -- steps ---------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    @staticmethod
    def _empty_window() -> dict:
        return {"loss": 0.0, "mse": 0.0, "vb": 0.0, "prior": 0.0, "grad_norm": 0.0, "good": 0, "steps": 0}

    def train_step(self, stop_requested: bool) -> tuple[bool, bool]:
        """One step on this rank's slice of the next global batch. Returns (finite, stop):
        identical on every rank (decided on all-reduced values)."""
        cfg, dev = self.cfg, self.ctx.device
        idx = next(self.sampler)
        flip = torch.rand(len(idx), generator=self.gens["flip"]) < 0.5 if cfg.flip else None
        x, y = self.data.get(idx, flip)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        lr = lr_at(self.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        parts = forward_backward(self.net, self.diffusion, x, y, self.gens["step"], self.prior_gen, cfg.precision,
                                 self.scaler)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        norm = _grad_norm(self.params).float()
        # One all-reduce and one host sync per step: every rank needs the same verdict
        # on "skip this step" and "stop now" before anyone touches the weights.
        stats = torch.stack([parts["loss"], parts["mse"], parts["vb"], parts["prior"], norm.to(dev),
                             torch.full((), float(stop_requested), device=dev)])  # a fill, not a blocking copy
        # (The norm is of the averaged gradients, the same on every rank: its mean is itself.)
        loss, mse, vb, prior, gnorm, stop = (distributed.all_reduce_sum(stats, self.ctx) / self.ctx.world_size).tolist()
        # fp16: an overflow is skipped here and the scaler backs off in update(); many in a
        # row (the scale halves each time) mean the run is broken, as for a non-finite loss.
        finite = math.isfinite(loss) and math.isfinite(gnorm)
        if finite:
            if cfg.grad_clip > 0 and gnorm > cfg.grad_clip:
                # A Python scalar (the norm is on the host already): no mixing of DTensor and Tensor.
                coef = cfg.grad_clip / (gnorm + 1e-6)
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
            if self.scaler.is_enabled():
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            decay = ema_decay_at(self.step, cfg.ema_decay) if cfg.ema_warmup else cfg.ema_decay
            update_ema(self.ema, self.model, decay)
            w = self.window
            w["loss"] += loss; w["mse"] += mse; w["vb"] += vb; w["prior"] += prior; w["grad_norm"] += gnorm  # noqa: E702
            w["good"] += 1
            self.bad_run = 0
        else:
            if self.scaler.is_enabled():
                self.scaler.update()  # overflow: lower the scale
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            self.bad_run += 1
        self.window["steps"] += 1
        self.step += 1
        return finite, stop > 0

    def log_record(self, window_time: float) -> dict:
        w, cfg = self.window, self.cfg
        n = w["good"]
        record = {"step": self.step}
        for k in ("loss", "mse", "vb", "prior", "grad_norm"):
            record[k] = w[k] / n if n else None  # None: every step of the window was skipped
        steps_per_sec = w["steps"] / window_time if window_time > 0 else None
        record.update(lr=lr_at(self.step - 1, cfg), steps_per_sec=steps_per_sec,
                      images_per_sec=steps_per_sec * cfg.batch_size if steps_per_sec else None,
                      elapsed_s=self.elapsed(), skipped=self.skipped)
        if self.scaler.is_enabled():
            record["scale"] = float(self.scaler.get_scale())
        return record


def train(cfg: TrainConfig, log=print, resume=None) -> dict:
    """Train (see the module doc); returns a summary dict (rank 0 also writes metrics.json).

    resume: a checkpoint file whose config equals ``cfg`` except in
    config.RESUMABLE_FIELDS, a run folder (its newest complete checkpoint), "auto" (the
    newest of cfg.out, a fresh start when there is none) or None. Under torchrun this
    joins the process group (and leaves it at the end).
    """
    started = time.perf_counter()
    ctx = distributed.setup(cfg.device)
    try:
        return _train(cfg, ctx, log if ctx.is_main else _silent, resume, started)
    finally:
        if ctx.owns_group:
            distributed.cleanup()


def _train(cfg: TrainConfig, ctx: distributed.Context, log, resume, started: float) -> dict:
    if cfg.out is None:
        name = str(default_run_dir(cfg.data)) if ctx.is_main else None
        cfg = TrainConfig(**{**cfg.to_dict(), "out": distributed.all_gather_objects(name, ctx)[0]})
    out = Path(cfg.out)
    path = None
    if resume is not None:
        # Rank 0 chooses, so that every rank loads the same file.
        choice = str(find_resume(resume, cfg.out, log)) if ctx.is_main else None
        choice = distributed.all_gather_objects(choice, ctx)[0]
        path = None if choice == "None" else Path(choice)
        if path is None:
            log(f"no checkpoint in {out / 'checkpoints'} yet: starting afresh")
    ckpt = None
    if path is not None:
        # On CUDA mapped (every rank reads the file; load_state_dict copies to the GPU); on
        # the CPU read, or the optimizer would keep file-backed tensors.
        ckpt = ckpt_lib.load_checkpoint(path, mmap=ctx.device.type == "cuda")
        cfg = resume_config(ckpt["config"], overrides=cfg.to_dict())  # raises on a change that breaks the run
        out = Path(cfg.out)

    run = _Run(cfg, ctx, log, started, ckpt)
    del ckpt
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    ctx.barrier()
    n_params = sum(p.numel() for p in run.model.parameters())
    log(f"run folder {out}  {ctx.world_size} process(es) on {ctx.device.type} ({cfg.parallel if ctx.distributed else 'single'})  "
        f"model {cfg.model} ({n_params / 1e6:.2f}M params)  data {cfg.data}: {len(run.data)} items "
        f"{run.info['in_channels']}x{run.info['input_size']}x{run.info['input_size']}  precision {cfg.precision}")
    if path is not None:
        log(f"resumed from {path} at step {run.step}")

    runlog = RunLog(out, run.step if path is not None else None) if ctx.is_main else None
    bar = None
    if cfg.progress and ctx.is_main:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)
        except ImportError:  # a progress bar is a nicety
            bar = None

    recorder = None
    if cfg.figure_every and ctx.is_main:
        from .figures import PathRecorder  # raises here, not hours later, when matplotlib is missing

        recorder = PathRecorder(cfg.figure_every, out / "figures")

    interrupted = False
    window_start = time.perf_counter()
    try:
        with _StopSignal() as stop_signal:
            while run.step < cfg.steps:
                finite, stop = run.train_step(stop_signal.requested)
                if not finite:
                    log(f"step {run.step}: non-finite loss or gradient, step skipped "
                        f"({run.bad_run} in a row, {run.skipped} in all)")
                if bar is not None:
                    bar.update(1)
                if run.bad_run >= cfg.max_bad_steps:
                    saved = run.save()
                    raise NonFiniteLossError(
                        f"{run.bad_run} steps in a row had a non-finite loss or gradient (max_bad_steps "
                        f"{cfg.max_bad_steps}); stopped at step {run.step}. The weights were last updated "
                        f"{run.bad_run} steps earlier; that state is in {saved or 'the checkpoint of rank 0'}. "
                        "Try a lower --lr, --grad-clip, or --precision bf16/fp32 instead of fp16.")
                last = run.step == cfg.steps or stop
                if run.step % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    if runlog is not None:
                        record = run.log_record(now - window_start)
                        runlog.write(record)
                        if bar is not None and record["loss"] is not None:
                            bar.set_postfix(loss=f"{record['loss']:.4f}", mse=f"{record['mse']:.4f}",
                                            vb=f"{record['vb']:.4f}", prior=f"{record['prior']:.4f}",
                                            img_s=f"{record['images_per_sec']:.0f}", refresh=False)
                    run.window, window_start = run._empty_window(), now
                if run.step % cfg.ckpt_every == 0 or last:
                    run.save()
                if cfg.figure_every and run.step % cfg.figure_every == 0:
                    ema = run.ema_for_figures()  # every rank takes part under FSDP
                    if recorder is not None:
                        recorder(ema, run.step)
                if stop:
                    interrupted = True
                    log(f"SIGTERM: checkpoint of step {run.step} written to {run.ckpt_dir}; resume with --resume")
                    break
    finally:
        if bar is not None:
            bar.close()
        if runlog is not None:
            runlog.close()

    train_time = time.perf_counter() - started
    summary = {"steps": run.step, "train_seconds": train_time, "device": str(ctx.device), "run_dir": str(out),
               "world_size": ctx.world_size, "skipped_steps": run.skipped}
    if interrupted:
        summary["interrupted"] = "SIGTERM"
        return summary
    if not ctx.is_main:
        return summary

    final = out / "checkpoint.pt"
    final.unlink(missing_ok=True)
    newest = ckpt_lib.checkpoint_path(run.ckpt_dir, run.step)
    try:  # the final checkpoint under a fixed name, without a second copy of the bytes
        os.link(newest, final)
    except OSError:
        shutil.copyfile(newest, final)
    log(f"trained {run.step} steps in {train_time:.1f} s; checkpoint {final}")

    if cfg.sample:
        t0 = time.perf_counter()
        ema = run.ema
        if cfg.parallel == "fsdp" and ctx.distributed:
            ema = ckpt_lib.model_from_checkpoint(run.last_state, device=ctx.device)
        labels = grid_labels(cfg.samples_per_class, num_classes=run.info["num_classes"], device=ctx.device)
        samples = generate(ema, labels, method=cfg.sample_method, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                           seed=cfg.seed, noise_schedule=cfg.noise_schedule, progress=cfg.progress)
        save_grid(samples, out / "samples.png", nrow=cfg.samples_per_class)
        summary["sample_seconds"] = time.perf_counter() - t0
        summary.update(evaluate_samples(samples, labels, cfg.image_size))
        log(f"samples: {out / 'samples.png'} ({len(labels)} digits, {cfg.sample_method} {cfg.sample_steps} steps, "
            f"guidance {cfg.cfg_scale}, EMA weights)")
    summary["total_seconds"] = time.perf_counter() - started
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.sample:
        log(f"quality: a classifier trained on the real digits ({summary['classifier_test_accuracy']:.1%} accurate "
            f"on held-out real digits) recognises the requested class in {summary['sample_accuracy']:.1%} "
            f"of the samples (chance: 10%)")
    log(f"total {summary['total_seconds']:.1f} s")
    return summary


# -----------------------------------------------------------------------------
# Command line (switch-dit train and python -m switch_dit.train)
# -----------------------------------------------------------------------------


def run_from_args(args, log=print) -> int:
    """Resolve the config of parsed train flags (config.add_train_arguments) and train.
    Returns the exit status: 0, or 143 when a SIGTERM stopped the run (checkpointed)."""
    if args.threads:
        # On a CPU shared with other jobs, fewer threads than cores avoids OpenMP thrashing.
        torch.set_num_threads(args.threads)
    file_values = load_config_file(args.config) if args.config else {}
    overrides = overrides_from_args(args)
    path = None
    if args.resume is not None:
        out = overrides.get("out", file_values.get("out"))
        path = find_resume(args.resume, out, log)
        if path is None:
            log(f"--resume: no checkpoint in {Path(out) / 'checkpoints'} yet, starting afresh")
    if path is not None:
        cfg = resume_config(ckpt_lib.read_config(path), file_values, overrides)
    else:
        cfg = config_from_args(args)
    summary = train(cfg, log=log, resume=path)
    return 143 if summary.get("interrupted") else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m switch_dit.train`` (what torchrun launches): the flags of `switch-dit train`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m switch_dit.train",
                                     description="Train a class-conditional Switch-DiT (see switch_dit/train.py).")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"train: error: {e}\n")
    except (ImportError, RuntimeError) as e:
        parser.exit(1, f"train: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
