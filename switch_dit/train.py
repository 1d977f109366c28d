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

This module is about 700 lines, over the package's usual size, because the step, the state
of a run and the loop around it share the run's private state; everything else that training
needs lives in its own module. Reading order: one step (``forward_backward``, EMA), the state
of a run on one rank (``_Run``: build, restore, save, ``train_step``), the loop (``train``),
the command line.
Checkpoint files and run folders are ``switch_dit.checkpoint``'s, the data
``switch_dit.data``'s, the log ``switch_dit.runlog``'s, samples ``switch_dit.sampling``'s.

Where to add things (a new config field is first a field of ``config.TrainConfig``, see there):
  - the model or its initial weights (e.g. starting from another run): ``_Run.__init__``,
    after ``build_model`` and before ``distributed.wrap``;
  - the training objective or the timestep distribution: ``_diffusion`` and
    ``forward_backward`` (timesteps and noise are drawn there from the step generator);
  - a loss term the model computes (an auxiliary loss): ``distributed.TrainingModule.forward``
    returns it beside the prior, ``_LossModel`` hands it to the diffusion; log it by adding
    its key to the parts that ``train_step`` all-reduces and to ``runlog.FIELDS``;
  - a schedule of a loss weight over steps (like ``lr_at``): a function of ``self.step``
    used in ``_Run.train_step``;
  - state that must survive a resume: a key of the dict ``_Run.save`` writes, read back in
    ``_Run._restore`` (buffers of the model are in its state dict already).
"""

from __future__ import annotations

import contextlib
import copy
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
from . import distributed, remix_dit
from .config import (
    TrainConfig,
    add_train_arguments,
    config_from_args,
    load_config_file,
    overrides_from_args,
    resume_config,
)
from .data import NUM_CLASSES, data_info, open_training_data
from .diffusion import GaussianDiffusion, create_diffusion
from .evaluate import evaluate_samples
from .flow import RectifiedFlow, flow_times_of_index
from .interop import init_remix_from_dit_file
from .runlog import RunLog
from .sampling import generate, grid_labels, save_grid

__all__ = [
    "model_kwargs",
    "lr_at",
    "forward_backward",
    "update_ema",
    "ema_decay_at",
    "NonFiniteLossError",
    "train",
    "run_from_args",
    "main",
]


# -----------------------------------------------------------------------------
# One step
# -----------------------------------------------------------------------------


def model_kwargs(cfg: TrainConfig, data_info: dict | None = None) -> dict:
    """Arguments of models.create for this run (stored in checkpoints to rebuild the model).
    data_info: in_channels, input_size, num_classes of the data; None = the digits."""
    info = data_info or {"in_channels": 1, "input_size": cfg.image_size, "num_classes": NUM_CLASSES}
    kw = dict(
        name=cfg.model,
        input_size=info["input_size"],
        in_channels=info["in_channels"],
        num_classes=info["num_classes"],
        learn_sigma=True,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
    )
    if cfg.model.startswith("Remix-DiT-"):  # K bases and the mixing instead of top-k
        del kw["top_k"]
        kw.update(num_basis=cfg.num_basis, mixing=cfg.mixing)
    for key in ("hidden_size", "depth", "num_heads"):
        if getattr(cfg, key):
            kw[key] = getattr(cfg, key)
    if cfg.model.startswith("DiffMoE") or cfg.objective == "flow":
        kw["objective"] = cfg.objective  # the model checks its t (float flow times or int steps)
    if cfg.capacity != 1.0:  # (DiffMoE only, TrainConfig checks; the published values stay implicit)
        kw["capacity"] = cfg.capacity
    if not cfg.interleave:
        kw["interleave"] = False
    return kw


def _diffusion(cfg: TrainConfig) -> GaussianDiffusion | RectifiedFlow:
    """The training objective: Gaussian diffusion, or rectified flow (switch_dit.flow)."""
    if cfg.objective == "flow":
        return RectifiedFlow(lambda_dp=cfg.lambda_dp)
    return create_diffusion(noise_schedule=cfg.noise_schedule, learn_sigma=True, lambda_dp=cfg.lambda_dp)


def prior_weight_at(step: int, cfg: TrainConfig) -> float:
    """Weight of the model's prior loss at ``step``: lambda_dp, or with prior_schedule
    "published" Remix-DiT's train_fast.py schedule lambda_dp * (2 - step / steps)."""
    if cfg.prior_schedule == "published":
        return remix_dit.published_prior_weight(step / cfg.steps, cfg.lambda_dp)
    return cfg.lambda_dp


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


def compile_mode(setting: str, device: torch.device) -> str | None:
    """The torch.compile mode of config ``compile`` on ``device``: "auto" is "default" on CUDA
    and no compilation on the CPU (Inductor's CPU code is no faster for these models, and
    compiling costs a minute); "none" is None."""
    if setting == "auto":
        return "default" if device.type == "cuda" else None
    return None if setting == "none" else setting


def forward_zeros(model: torch.nn.Module, batch: int) -> torch.Tensor:
    """One forward in eval mode (no label dropout: no random draw) of ``batch`` zero latents
    (B, C, H, W) at the middle timestep (flow time 0.5 for a flow model), label 0, on the model's
    device; the mode is restored."""
    device = next(model.parameters()).device
    x = torch.zeros(batch, model.in_channels, model.input_size, model.input_size, device=device)
    if getattr(model, "objective", "diffusion") == "flow":
        t = torch.full((batch,), 0.5, device=device)
    else:
        t = torch.full((batch,), model.num_timesteps // 2, device=device)
    y = torch.zeros(batch, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        return model(x, t, y)
    finally:
        model.train(was_training)


@torch.no_grad()
def warm_up(model: torch.nn.Module, batch: int) -> None:
    """One eager ``forward_zeros`` before compiling. It imports the kernel modules and lets
    ``backend="auto"`` time its strategies for the training shapes outside the trace; a first
    call inside the trace would break the graph at every op (dynamo does not trace imports)
    and time under tracing."""
    forward_zeros(model, batch)


def compile_model(model: torch.nn.Module, mode: str, backend: str = "inductor") -> torch.nn.Module:
    """Compile the model's forward in place (``nn.Module.compile``: the state dict keeps its
    keys, so checkpoints do not depend on it).

    Only the forward is compiled, not the prior loss that distributed.TrainingModule adds:
    the prior's matched mode solves its assignment on the host, off the step's critical path,
    which no graph can hold. So the step has one graph break by design, between the forward
    and the prior, once per step (docs/design.md §3). The fused ops are torch custom ops, so
    the compiler keeps them as single nodes and fuses the elementwise work around them.
    Shapes are fixed within a run (one batch size): ``dynamic=False`` compiles once. ``backend``:
    torch.compile's (the tests trace with "eager", which skips Inductor's code generation)."""
    model.compile(mode=None if mode == "default" else mode, dynamic=False, backend=backend)
    return model


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for every parameter (buffers copied). One foreach
    lerp over all of them: a few launches, not one per tensor (XL has ~300 parameter tensors)."""
    ema_params, params = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise ValueError(f"ema has {len(ema_params)} parameters, the model {len(params)}")
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-started EMA: min(decay, (1 + n) / (10 + n)), so a short run's average is not
    dominated by the random initialisation (0.999 alone would remember ~1000 steps)."""
    return min(decay, (1.0 + step) / (10.0 + step))


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
        distributed.set_tf32(dev, cfg.tf32)  # as DiT: TF32 matmuls and convolutions for the fp32 parts
        self.data = open_training_data(cfg.data, cfg.image_size, dev if cfg.data == "digits" else "cpu")
        self.sampler = distributed.ShardedBatchSampler(
            len(self.data), cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed
        )
        self.info = data_info(self.data)
        self.kwargs = model_kwargs(cfg, self.info)
        if ckpt is not None and ckpt["model_kwargs"] != self.kwargs:
            raise ValueError(f"the checkpoint's model {ckpt['model_kwargs']} differs from this run's {self.kwargs}")

        # The same initial weights on every rank (FSDP does not broadcast them, DDP does).
        torch.manual_seed(cfg.seed)
        model = ckpt_lib.build_model(self.kwargs, cfg.backend).to(dev)
        self.remix = isinstance(model, remix_dit.RemixDiT)
        if self.remix:
            remix_dit.check_timestep_sampling(cfg.timestep_sampling, cfg.mixing)  # warns for uniform + batch
            if ckpt is None and cfg.init_from:
                init_remix_from_dit_file(model, cfg.init_from)
                log(f"initialised {cfg.model} from the DiT {cfg.init_from}")
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
        model.train()
        self.compile_mode = compile_mode(cfg.compile, dev)
        if self.compile_mode is not None:
            warm_up(model, cfg.batch_size // ctx.world_size)
            compile_model(model, self.compile_mode)
        self.net = distributed.wrap(model, ctx, cfg.parallel, with_prior=cfg.lambda_dp > 0)
        self.model = distributed.unwrap(self.net)
        if cfg.parallel == "fsdp" and ctx.distributed:
            distributed.shard_module(ema, ctx)  # shards laid out like the model's, for a local EMA update
        self.ema = ema
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        groups = [{"params": self.params}]
        if self.remix:  # the coefficient table at its own lr (published), as a multiple of lr (warm-up)
            groups = remix_dit.coefficient_param_groups(self.net, cfg.lr, cfg.coef_lr)
            groups[1]["lr_scale"] = cfg.coef_lr / cfg.lr
        # CUDA: the fused AdamW, one pass over parameters, gradients and both moments (the
        # default foreach path makes several); same update, same state dict (resumes either way).
        fused = dev.type == "cuda"
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=cfg.precision == "fp16")
        self.diffusion = _diffusion(cfg)

        # Per-rank randomness (label dropout, timesteps and noise, flips) and shared (prior ties).
        rank_seed = cfg.seed * ctx.world_size + ctx.rank
        torch.manual_seed(rank_seed)
        self.gens = {
            "step": torch.Generator(device=dev).manual_seed(rank_seed + 1),
            "flip": torch.Generator().manual_seed(rank_seed + 2),
        }
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
            raise ValueError(
                f"the checkpoint has no training state ({', '.join(missing)}): it holds weights to "
                "sample from, not a run to resume"
            )
        opt_state = ckpt["opt"]
        if self.cfg.parallel == "fsdp" and self.ctx.distributed:
            opt_state = distributed.shard_optimizer_state(opt_state, self.opt)
        self.opt.load_state_dict(opt_state)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        counters = ckpt["train_state"]
        self.step, self.skipped = int(counters["step"]), int(counters["skipped"])
        self.bad_run = int(counters["bad_run"])
        self.elapsed_before = float(counters.get("elapsed_s", 0.0))
        self.window = {**self._empty_window(), **counters["window"]}
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
            self.log(
                f"random states not restored ({e}): the data order continues exactly, noise, timesteps, "
                "flips and label dropout are drawn afresh"
            )
            seed = (self.cfg.seed * 1_000_003 + self.step) * self.ctx.world_size + self.ctx.rank
            torch.manual_seed(seed)
            self.gens["step"].manual_seed(seed + 1)
            self.gens["flip"].manual_seed(seed + 2)

    def ema_for_figures(self) -> torch.nn.Module | None:
        """The EMA model as one plain module on rank 0, None on the others (a collective
        under FSDP, whose EMA is sharded)."""
        if self.cfg.parallel == "fsdp" and self.ctx.distributed:
            state = distributed.gather_state(self.ema.state_dict(), self.ctx.is_main)
            if state is None:
                return None
            with torch.random.fork_rng(devices=[]):  # initialising draws from the run's global RNG
                model = ckpt_lib.build_model(self.kwargs, "reference")
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
                "format": ckpt_lib.FORMAT,
                "step": self.step,
                "config": self.cfg.to_dict(),
                "model_kwargs": self.kwargs,
                "model": model_sd,
                "ema": ema_sd,
                "opt": opt_sd,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": {"ranks": rng, "shared": {"prior": self.prior_gen.get_state()}},
                "data": self.sampler.state_dict(),
                "prior_matcher": (
                    self.model.prior_matcher.state_dict() if self.model.prior_matcher is not None else None
                ),
                "train_state": {
                    "step": self.step,
                    "skipped": self.skipped,
                    "bad_run": self.bad_run,
                    "window": dict(self.window),
                    "elapsed_s": self.elapsed(),
                },
                "world_size": self.ctx.world_size,
                "parallel": self.cfg.parallel,
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
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.diffusion.lambda_dp = prior_weight_at(self.step, cfg)
        if hasattr(self.model, "training_iters"):  # DiffMoE's capacity schedule follows the step (resumes too)
            self.model.training_iters = self.step
        t = None  # uniform, drawn in forward_backward
        if cfg.timestep_sampling == "interval":  # Remix-DiT: the batch from one expert's interval
            T = self.model.num_timesteps
            t = remix_dit.sample_interval_timesteps(
                x.shape[0], T, cfg.num_experts, device=dev, generator=self.gens["step"]
            )
            if cfg.objective == "flow":  # flow times inside those timesteps' (switch_dit.flow)
                t = flow_times_of_index(t, T, generator=self.gens["step"])
        self.opt.zero_grad(set_to_none=True)
        parts = forward_backward(
            self.net, self.diffusion, x, y, self.gens["step"], self.prior_gen, cfg.precision, self.scaler, t=t
        )
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        norm = _grad_norm(self.params).float()
        # One all-reduce and one host sync per step: every rank needs the same verdict
        # on "skip this step" and "stop now" before anyone touches the weights.
        stats = torch.stack(
            [
                parts["loss"],
                parts["mse"],
                parts["vb"],
                parts["prior"],
                norm.to(dev),
                torch.full((), float(stop_requested), device=dev),
            ]
        )  # a fill, not a blocking copy
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
            for key, value in (("loss", loss), ("mse", mse), ("vb", vb), ("prior", prior), ("grad_norm", gnorm)):
                self.window[key] += value
            self.window["good"] += 1
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
        window, cfg = self.window, self.cfg
        good = window["good"]
        record = {"step": self.step}
        for key in ("loss", "mse", "vb", "prior", "grad_norm"):
            record[key] = window[key] / good if good else None  # None: every step of the window was skipped
        steps_per_sec = window["steps"] / window_time if window_time > 0 else None
        record.update(
            lr=lr_at(self.step - 1, cfg),
            steps_per_sec=steps_per_sec,
            images_per_sec=steps_per_sec * cfg.batch_size if steps_per_sec else None,
            elapsed_s=self.elapsed(),
            skipped=self.skipped,
        )
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
    path = None
    if resume is not None:
        # Rank 0 chooses, so that every rank loads the same file.
        choice = str(ckpt_lib.resume_checkpoint(resume, cfg.out, log)) if ctx.is_main else None
        choice = distributed.all_gather_objects(choice, ctx)[0]
        path = None if choice == "None" else Path(choice)
        if path is None:
            log(f"no checkpoint in {Path(cfg.out) / 'checkpoints'} yet: starting afresh")
    # The run folder: the one asked for; else, resuming, the folder of the checkpoint (never
    # the folder named in its config: a copied run continues in the copy); else a new one.
    if cfg.out is not None:
        out = cfg.out
    elif path is not None:
        out = str(ckpt_lib.run_folder(path))
    else:
        out = str(ckpt_lib.default_run_dir(cfg.data)) if ctx.is_main else None
        out = distributed.all_gather_objects(out, ctx)[0]
    if ctx.is_main:
        ckpt_lib.check_run_folder(out, resumed_from=path)
    ckpt = None
    if path is not None:
        # On CUDA mapped (every rank reads the file; load_state_dict copies to the GPU); on
        # the CPU read, or the optimizer would keep file-backed tensors.
        ckpt = ckpt_lib.load_checkpoint(path, mmap=ctx.device.type == "cuda")
        # The checkpoint's config, with the resumable changes of cfg (raises on one that breaks the run).
        cfg = resume_config(ckpt["config"], overrides={**cfg.to_dict(), "out": out})
    else:
        cfg = TrainConfig(**{**cfg.to_dict(), "out": out})
    out = Path(out)

    run = _Run(cfg, ctx, log, started, ckpt)
    del ckpt
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    ctx.barrier()
    n_params = sum(p.numel() for p in run.model.parameters())
    log(
        f"run folder {out}  {ctx.world_size} process(es) on {ctx.device.type} "
        f"({cfg.parallel if ctx.distributed else 'single'})  "
        f"model {cfg.model} ({n_params / 1e6:.2f}M params)  data {cfg.data}: {len(run.data)} items "
        f"{run.info['in_channels']}x{run.info['input_size']}x{run.info['input_size']}  precision {cfg.precision}"
    )
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
                    log(
                        f"step {run.step}: non-finite loss or gradient, step skipped "
                        f"({run.bad_run} in a row, {run.skipped} in all)"
                    )
                if bar is not None:
                    bar.update(1)
                if run.bad_run >= cfg.max_bad_steps:
                    saved = run.save()
                    raise NonFiniteLossError(
                        f"{run.bad_run} steps in a row had a non-finite loss or gradient (max_bad_steps "
                        f"{cfg.max_bad_steps}); stopped at step {run.step}. The weights were last updated "
                        f"{run.bad_run} steps earlier; that state is in {saved or 'the checkpoint of rank 0'}. "
                        "Try a lower --lr, --grad-clip, or --precision bf16/fp32 instead of fp16."
                    )
                last = run.step == cfg.steps or stop
                if run.step % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    if runlog is not None:
                        record = run.log_record(now - window_start)
                        runlog.write(record)
                        if bar is not None and record["loss"] is not None:
                            bar.set_postfix(
                                loss=f"{record['loss']:.4f}",
                                mse=f"{record['mse']:.4f}",
                                vb=f"{record['vb']:.4f}",
                                prior=f"{record['prior']:.4f}",
                                img_s=f"{record['images_per_sec']:.0f}",
                                refresh=False,
                            )
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
    summary = {
        "steps": run.step,
        "train_seconds": train_time,
        "device": str(ctx.device),
        "run_dir": str(out),
        "world_size": ctx.world_size,
        "skipped_steps": run.skipped,
    }
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
        samples = generate(
            ema,
            labels,
            method=cfg.sample_method,
            steps=cfg.sample_steps,
            cfg_scale=cfg.cfg_scale,
            seed=cfg.seed,
            noise_schedule=cfg.noise_schedule,
            progress=cfg.progress,
        )
        save_grid(samples, out / "samples.png", nrow=cfg.samples_per_class, scale=2)  # 16 px digits, visible
        summary["sample_seconds"] = time.perf_counter() - t0
        summary.update(evaluate_samples(samples, labels, cfg.image_size))
        log(
            f"samples: {out / 'samples.png'} ({len(labels)} digits, {cfg.sample_method} {cfg.sample_steps} steps, "
            f"guidance {cfg.cfg_scale}, EMA weights)"
        )
    summary["total_seconds"] = time.perf_counter() - started
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.sample:
        log(
            f"quality: a classifier trained on the real digits ({summary['classifier_test_accuracy']:.1%} accurate "
            f"on held-out real digits) recognises the requested class in {summary['sample_accuracy']:.1%} "
            f"of the samples (chance: 10%)"
        )
    log(f"total {summary['total_seconds']:.1f} s")
    return summary


# -----------------------------------------------------------------------------
# Command line (switch-dit train and python -m switch_dit.train)
# -----------------------------------------------------------------------------


def run_from_args(args, log=print) -> int:
    """Resolve the config of parsed train flags (config.add_train_arguments) and train.
    Returns the exit status: 0, or 143 when a SIGTERM stopped the run (checkpointed).

    With --resume the config is the checkpoint's, changed only by the flags and file given
    (config.RESUMABLE_FIELDS); the run continues in the checkpoint's own run folder, or in
    --out when given (see checkpoint.run_folder and check_run_folder)."""
    if args.threads:
        # On a CPU shared with other jobs, fewer threads than cores avoids OpenMP thrashing.
        torch.set_num_threads(args.threads)
    file_values = load_config_file(args.config) if args.config else {}
    overrides = overrides_from_args(args)
    out = overrides.get("out", file_values.get("out"))
    path = ckpt_lib.resume_checkpoint(args.resume, out, log)
    if args.resume is not None and path is None:
        log(f"--resume: no checkpoint in {Path(out) / 'checkpoints'} yet, starting afresh")
    if path is not None:
        cfg = resume_config(
            ckpt_lib.read_config(path), file_values, {**overrides, "out": out or str(ckpt_lib.run_folder(path))}
        )
    else:
        cfg = config_from_args(args)
    summary = train(cfg, log=log, resume=path)
    return 143 if summary.get("interrupted") else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m switch_dit.train`` (what torchrun launches): the flags of `switch-dit train`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m switch_dit.train", description="Train a class-conditional Switch-DiT (see switch_dit/train.py)."
    )
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
