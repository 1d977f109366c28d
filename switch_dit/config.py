"""Training configuration: one flat dataclass, a YAML/JSON file, command-line overrides.

(Over 600 lines because every field is defined, validated and turned into a flag here, in one
place, so the file, the flags and the checks cannot drift apart.)

A run's configuration is resolved in three layers, each overriding the one before:

    1. the recipe of the data: ``DIGITS_PRESET`` for the embedded digits (the default:
       a demo that trains on two CPU cores in a few minutes), ``PAPER_RECIPE`` for a
       latents folder (AdamW lr 1e-4, no weight decay, global batch 256, EMA 0.9999,
       lambda_dp 1, random flips, cosine schedule, 400k steps, Switch-DiT-XL/2 on
       256x256 images = 32x32x4 VAE latents);
    2. a config file (``--config run.yaml`` or ``.json``), keys = field names;
    3. command-line flags (``--lr 3e-4``); only the flags given override.

The resolved config is written into the run folder as ``config.json`` and stored in
every checkpoint; ``--resume`` starts from the checkpoint's config (``resume_config``).

Family defaults: num_experts, lambda_dp, timestep_sampling and prior_schedule left at
None take the model family's value (``_family_defaults``): Remix-DiT trains with the
published recipe (20 experts, interval timesteps, prior weight 1e-4 on train_fast.py's
schedule), DiffMoE with E = 16 (lambda_dp weighs its capacity-predictor loss), every other
family with M = 3, uniform timesteps and a constant lambda_dp 1.

Adding a field: declare it in ``TrainConfig`` (a default, or None to take it from both
recipes), check it in ``_validate``, give it a flag in ``_FLAGS`` (the assert below makes
that compulsory), and add it to ``RESUMABLE_FIELDS`` if a resumed run may change it.
Checkpoints written before the field existed resume with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = [
    "TrainConfig",
    "DIGITS_PRESET",
    "PAPER_RECIPE",
    "RESUMABLE_FIELDS",
    "resolve",
    "load_config_file",
    "resume_config",
    "add_train_arguments",
    "config_from_args",
]

PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")
COMPILE_MODES = ("auto", "none", "default", "max-autotune")
OBJECTIVES = ("diffusion", "flow")
# Model-wide strategy names (switch_dit.ops.dispatch.backend_for gives each op the name where it has
# that strategy, else auto); listed here because this module does not import torch.
BACKENDS = ("auto", "reference", "fused", "triton", "bmm", "grouped", "compiled")


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    Fields left at None take their value from the recipe of the data: ``DIGITS_PRESET``
    for "digits" (the default), ``PAPER_RECIPE`` for a latents folder. So
    ``TrainConfig()`` is the quick demo and ``TrainConfig(data="latents/imagenet256")``
    the paper's run. Sizes: hidden_size / depth / num_heads = 0 keep what the model name
    gives. image_size: pixels of the training images; 0 takes it from the data (the
    latents manifest). batch_size is the *global* batch, split evenly over the processes.
    """

    # data
    data: str = "digits"
    image_size: int | None = None
    flip: bool | None = None
    # model
    model: str | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    num_experts: int | None = None  # None: the family's (3; Remix-DiT 20)
    top_k: int = 2
    # Remix-DiT (switch_dit.remix_dit): K bases, mixing per batch (published) or per sample,
    # and a trained DiT to start from (a run folder or checkpoint, ours or the reference code's)
    num_basis: int = 4
    mixing: str = "batch"
    init_from: str | None = None
    # DiffMoE (switch_dit.diffmoe): tokens per expert per step as a multiple of S / E, and MoE MLPs
    # in the odd blocks (the published layout) or in every block
    capacity: float = 1.0
    interleave: bool = True
    backend: str = "auto"
    compile: str = "auto"  # torch.compile mode of the training step: auto = "default" on CUDA, "none" on the CPU
    tf32: bool = True  # TF32 for fp32 matmuls and convolutions on CUDA (training and the samples after it)
    # optimisation
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    ema_decay: float | None = None
    ema_warmup: bool | None = None
    lambda_dp: float | None = None  # None: the family's (1; Remix-DiT 1e-4, train_fast.py's prior_strength)
    prior_schedule: str | None = None  # "constant" or "published" (Remix-DiT's); None: the family's
    timestep_sampling: str | None = None  # "uniform" or "interval" (Remix-DiT's); None: the family's
    coef_lr: float = 1e-2  # Remix-DiT: AdamW lr of the coefficient table (published 1e-2), warmed up with lr
    noise_schedule: str = "cosine"
    objective: str = "diffusion"  # or "flow": rectified flow (switch_dit.flow), DiffMoE's objective
    precision: str | None = None
    grad_clip: float = 0.0
    max_bad_steps: int = 20
    # processes
    parallel: str = "ddp"
    seed: int = 0
    device: str = "auto"
    # run folder, logs, checkpoints
    out: str | None = None
    log_every: int | None = None
    ckpt_every: int | None = None
    keep_checkpoints: int | None = None
    progress: bool = True
    figure_every: int = 0  # denoising-path figure of the EMA model every K steps (0 = never)
    # sampling after training (the digits demo only)
    sample: bool | None = None
    sample_method: str | None = None
    sample_steps: int | None = None
    cfg_scale: float | None = None
    samples_per_class: int = 20

    def __post_init__(self) -> None:
        recipe = DIGITS_PRESET if self.data == "digits" else PAPER_RECIPE
        if self.objective == "flow" and self.sample_method is None:
            self.sample_method = "euler"  # the recipes' samplers are Gaussian-diffusion ones
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name, value in _family_defaults(self.model).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The paper's recipe (section 5.1): AdamW at a fixed lr 1e-4, no weight decay, global
# batch 256, EMA 0.9999, random horizontal flips, lambda_dp 1, cosine schedule, 400k
# steps on ImageNet 256x256 (32x32x4 latents); DDPM 250 steps with guidance 1.5 for
# sampling. Precision is not stated: bf16 autocast is what the fast path is built for.
# Checkpoints every 2500 steps: at the paper's pace a crash costs minutes, not hours.
PAPER_RECIPE = dict(
    model="Switch-DiT-XL/2",
    hidden_size=0,
    depth=0,
    num_heads=0,
    image_size=0,
    flip=True,
    steps=400_000,
    batch_size=256,
    lr=1e-4,
    warmup_steps=0,
    ema_decay=0.9999,
    ema_warmup=False,
    precision="bf16",
    log_every=100,
    ckpt_every=2500,
    keep_checkpoints=3,
    sample=False,
    sample_method="ddpm",
    sample_steps=250,
    cfg_scale=1.5,
)

# The digits demo: Switch-DiT-S/4 shrunk to hidden 128, depth 4, 4 heads, on the 16x16
# upsampled digits (patch 4 = patch 2 on the original 8x8 pixels: 16 tokens); trains in
# about three minutes on two CPU cores. Measured on batch 64, seed 0: lr 3e-4 had not
# left the blurry stage after 1000 steps, 1e-3 needed ~2000 steps for 90 % recognisable
# samples, 2e-3 reached it by 1500. DDIM 50 steps with guidance 4: 100 % recognised at
# step 1500 against 94 % with guidance 2. No flips: a flipped 2 is not a 2. A
# warm-started EMA, because 0.999 alone remembers the random initialisation for ~1000
# of the 1500 steps.
DIGITS_PRESET = dict(
    model="Switch-DiT-S/4",
    hidden_size=128,
    depth=4,
    num_heads=4,
    image_size=16,
    flip=False,
    steps=1500,
    batch_size=64,
    lr=2e-3,
    warmup_steps=100,
    ema_decay=0.999,
    ema_warmup=True,
    precision="fp32",
    log_every=25,
    ckpt_every=500,
    keep_checkpoints=2,
    sample=True,
    sample_method="ddim",
    sample_steps=50,
    cfg_scale=4.0,
)
assert set(PAPER_RECIPE) == set(DIGITS_PRESET)


def _family_defaults(model) -> dict:
    """Defaults that depend on the model family (the fields left at None in TrainConfig)."""
    if isinstance(model, str) and model.startswith("Remix-DiT-"):
        # The published recipe (VainF/Remix-DiT train_fast.py): N = 20 experts, every batch
        # from one timestep interval, prior weight 1e-4 * (2 - progress).
        return dict(num_experts=20, lambda_dp=1e-4, prior_schedule="published", timestep_sampling="interval")
    if isinstance(model, str) and model.startswith("DiffMoE-"):
        # The published recipe (000_DiffMoE_S_E16_Flow.yaml): E = 16; lambda_dp weighs the
        # capacity-predictor loss, whose published weight (1) the model already applies.
        return dict(num_experts=16, lambda_dp=1.0, prior_schedule="constant", timestep_sampling="uniform")
    return dict(num_experts=3, lambda_dp=1.0, prior_schedule="constant", timestep_sampling="uniform")


# Fields a resumed run may change: they steer the run, not the computation of a step
# (device and backend change rounding only). Everything else must match the checkpoint.
RESUMABLE_FIELDS = frozenset(
    {
        "steps",
        "out",
        "log_every",
        "ckpt_every",
        "keep_checkpoints",
        "progress",
        "max_bad_steps",
        "device",
        "backend",
        "parallel",
        "sample",
        "sample_method",
        "sample_steps",
        "cfg_scale",
        "samples_per_class",
        "figure_every",
        "compile",
        "tf32",
    }
)

# field -> "int", "float", "bool" or "str" (annotations are strings here; drop "| None")
_FIELD_TYPES = {f.name: str(f.type).replace(" | None", "") for f in fields(TrainConfig)}


# -----------------------------------------------------------------------------
# Validation
# -----------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validate(c: TrainConfig) -> None:
    from .models import MODEL_NAMES  # late: config must stay importable without building models

    def need(cond: bool, name: str, what: str) -> None:
        if not cond:
            raise ValueError(f"{name} must be {what}, got {getattr(c, name)!r}")

    for name in (
        "steps",
        "batch_size",
        "log_every",
        "ckpt_every",
        "keep_checkpoints",
        "max_bad_steps",
        "sample_steps",
        "samples_per_class",
        "num_experts",
        "top_k",
    ):
        need(_is_int(getattr(c, name)) and getattr(c, name) >= 1, name, "a positive integer")
    for name in ("hidden_size", "depth", "num_heads", "warmup_steps", "image_size", "seed", "figure_every"):
        need(_is_int(getattr(c, name)) and getattr(c, name) >= 0, name, "a non-negative integer")
    for name in ("flip", "ema_warmup", "progress", "sample", "tf32"):
        need(isinstance(getattr(c, name), bool), name, "true or false")
    need(isinstance(c.model, str) and c.model in MODEL_NAMES, "model", f"one of {', '.join(MODEL_NAMES)}")
    need(_is_number(c.lr) and c.lr > 0, "lr", "a positive finite number")
    need(_is_number(c.weight_decay) and c.weight_decay >= 0, "weight_decay", "a finite number >= 0")
    need(_is_number(c.lambda_dp) and c.lambda_dp >= 0, "lambda_dp", "a finite number >= 0")
    need(_is_number(c.grad_clip) and c.grad_clip >= 0, "grad_clip", "a finite number >= 0 (0 = no clipping)")
    need(_is_number(c.ema_decay) and 0.0 <= c.ema_decay < 1.0, "ema_decay", "a number in [0, 1)")
    need(_is_number(c.cfg_scale) and c.cfg_scale >= 1.0, "cfg_scale", "a number >= 1 (1 = no guidance)")
    need(c.noise_schedule in ("cosine", "linear"), "noise_schedule", "'cosine' or 'linear'")
    need(c.precision in PRECISIONS, "precision", " or ".join(repr(p) for p in PRECISIONS))
    need(c.parallel in PARALLEL, "parallel", " or ".join(repr(p) for p in PARALLEL))
    need(c.backend in BACKENDS, "backend", " or ".join(repr(b) for b in BACKENDS))
    need(c.objective in OBJECTIVES, "objective", "'diffusion' or 'flow'")
    if c.objective == "flow":
        need(c.sample_method in ("euler", "heun"), "sample_method", "'euler' or 'heun' for objective 'flow'")
    else:
        need(c.sample_method in ("ddpm", "ddim"), "sample_method", "'ddpm' or 'ddim'")
    need(c.compile in COMPILE_MODES, "compile", " or ".join(repr(m) for m in COMPILE_MODES))
    need(isinstance(c.device, str) and bool(c.device), "device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    need(isinstance(c.data, str) and bool(c.data), "data", "'digits' or a latents folder written by extract-latents")
    need(c.out is None or isinstance(c.out, str), "out", "a folder path")
    if c.figure_every and not c.model.startswith("Switch-DiT"):
        raise ValueError(f"figure_every must be 0 for {c.model}: denoising paths are drawn for Switch-DiT models only")
    remix = c.model.startswith("Remix-DiT-")
    if c.top_k > c.num_experts and not remix:
        raise ValueError(f"top_k ({c.top_k}) must not exceed num_experts ({c.num_experts})")
    need(_is_int(c.num_basis) and c.num_basis >= 1, "num_basis", "a positive integer")
    need(c.mixing in ("batch", "sample"), "mixing", "'batch' or 'sample'")
    need(c.timestep_sampling in ("uniform", "interval"), "timestep_sampling", "'uniform' or 'interval'")
    need(c.prior_schedule in ("constant", "published"), "prior_schedule", "'constant' or 'published'")
    need(_is_number(c.coef_lr) and c.coef_lr > 0, "coef_lr", "a positive finite number")
    need(
        c.init_from is None or (isinstance(c.init_from, str) and bool(c.init_from)),
        "init_from",
        "a run folder or checkpoint path",
    )
    if remix and c.num_experts % c.num_basis:
        raise ValueError(
            f"num_experts ({c.num_experts}) must be a multiple of num_basis ({c.num_basis}) for "
            "Remix-DiT (the prior gives every basis num_experts / num_basis experts)"
        )
    if not remix:
        for name in ("timestep_sampling", "prior_schedule"):
            if getattr(c, name) != _family_defaults(c.model)[name]:
                raise ValueError(f"{name} {getattr(c, name)!r} applies to Remix-DiT models only, not {c.model}")
        if c.init_from is not None:
            raise ValueError(f"init_from applies to Remix-DiT models (initialised from a DiT), not {c.model}")
    need(
        _is_number(c.capacity) and c.capacity > 0, "capacity", "a positive number (tokens per expert: capacity * S / E)"
    )
    need(isinstance(c.interleave, bool), "interleave", "True or False")
    if not c.model.startswith("DiffMoE-") and (c.capacity != 1.0 or not c.interleave):
        raise ValueError(f"capacity and interleave apply to DiffMoE models only, not {c.model}")
    if c.data == "digits" and c.image_size and c.image_size < 8:
        raise ValueError(f"image_size must be >= 8 for the digits (they are 8x8), got {c.image_size!r}")
    if c.data != "digits" and c.image_size and c.image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 (the VAE downsamples by 8), got {c.image_size!r}")
    if c.sample and c.data != "digits":
        raise ValueError(
            "sample must be false for latents data: samples need the VAE decoder "
            "(use `switch-dit sample` or the evaluation tools on the checkpoint)"
        )
    if c.precision == "fp16" and c.parallel == "fsdp":
        raise ValueError(
            "precision 'fp16' is not supported with parallel 'fsdp' (each rank would see inf in "
            "its own gradient shard only); use precision 'bf16'"
        )


# -----------------------------------------------------------------------------
# Files and layers
# -----------------------------------------------------------------------------


def _coerce(name: str, value: Any, source: str) -> Any:
    """A value read from a file -> the field's type; strings are parsed (YAML reads 1e-4 as text)."""
    kind = _FIELD_TYPES[name]
    if kind == "int" and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{source}: {name} must be an integer, got {value!r}") from None
    if kind == "float":
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{source}: {name} must be a number, got {value!r}") from None
        if _is_int(value):
            return float(value)
    if kind == "bool" and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    return value


def load_config_file(path) -> dict:
    """Read a YAML (.yaml/.yml) or JSON file of field overrides; unknown keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(
                f"reading {path.name} needs PyYAML: pip install pyyaml (or write the config as JSON)"
            ) from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    elif path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {e}") from None
    else:
        raise ValueError(f"config file {str(path)!r} must end in .yaml, .yml or .json")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELD_TYPES))
    if unknown:
        raise ValueError(
            f"config file {str(path)!r}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"known fields: {', '.join(_FIELD_TYPES)}"
        )
    return {k: _coerce(k, v, f"config file {str(path)!r}") for k, v in raw.items()}


def resolve(file_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """The data's recipe <- file values <- overrides (fields not given keep the recipe's value)."""
    return TrainConfig(**{**(file_values or {}), **(overrides or {})})


def resume_config(saved: dict, file_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with changes only to RESUMABLE_FIELDS."""
    unknown = sorted(set(saved) - set(_FIELD_TYPES))
    base = {k: v for k, v in saved.items() if k in _FIELD_TYPES}
    if unknown:  # a newer or older version's field: ignoring it could change the run silently
        raise ValueError(
            f"checkpoint config has unknown field(s) {', '.join(unknown)}; it was written by "
            "another version of switch-dit"
        )
    changes = {**(file_values or {}), **(overrides or {})}
    for name, value in changes.items():
        if name not in RESUMABLE_FIELDS and base.get(name) != value:
            raise ValueError(
                f"{name} cannot change when resuming (checkpoint has {base.get(name)!r}, got {value!r}); "
                f"only {', '.join(sorted(RESUMABLE_FIELDS))} may"
            )
    return TrainConfig(**{**base, **changes})


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 1, got {text!r}") from None
    if not 1.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 1 (1 = no guidance), got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def _model_name(text: str) -> str:
    from .models import MODEL_NAMES

    if text not in MODEL_NAMES:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose one of {', '.join(MODEL_NAMES)}")
    return text


# field -> (argparse keyword arguments, help). Every field gets a flag; defaults are
# suppressed so that the namespace holds only what the user typed (layer 4 above).
_FLAGS = {
    "model": (dict(type=_model_name), "model name, e.g. Switch-DiT-XL/2"),
    "hidden_size": (dict(type=_non_negative_int), "override the named width; 0 keeps the name's size"),
    "depth": (dict(type=_non_negative_int), "override the named depth; 0 keeps it"),
    "num_heads": (dict(type=_non_negative_int), "override the named head count; 0 keeps it"),
    "num_experts": (dict(type=_positive_int), "M, experts per block; Remix-DiT: N, timestep experts (20)"),
    "top_k": (dict(type=_positive_int), "k, experts per sample"),
    "num_basis": (dict(type=_positive_int), "Remix-DiT: K, basis models"),
    "mixing": (dict(choices=("batch", "sample")), "Remix-DiT: one mixed model per batch (published) or per sample"),
    "capacity": (
        dict(type=_positive_float),
        "DiffMoE: tokens per expert per step, as a multiple of S / E (published 1)",
    ),
    "interleave": (
        dict(action=argparse.BooleanOptionalAction),
        "DiffMoE: MoE MLPs in the odd blocks (published); --no-interleave: in every block",
    ),
    "init_from": (
        dict(),
        "Remix-DiT: start from this trained DiT (run folder or checkpoint, ours or the "
        "reference code's; its EMA weights), each mixed layer repeated K times",
    ),
    "backend": (
        dict(choices=BACKENDS),
        "strategy of the fused ops (docs/design.md §3): auto chooses per op; a name an op lacks leaves it on auto",
    ),
    "compile": (
        dict(choices=COMPILE_MODES),
        "torch.compile mode of the model in training; auto = default on CUDA, none on the CPU",
    ),
    "tf32": (dict(action=argparse.BooleanOptionalAction), "TF32 for fp32 matmuls and convolutions on CUDA"),
    "data": (dict(), "'digits' (embedded demo) or a latents folder from `switch-dit extract-latents`"),
    "image_size": (dict(type=_non_negative_int), "image pixels; 0 = from the data"),
    "flip": (dict(action=argparse.BooleanOptionalAction), "random horizontal flips"),
    "steps": (dict(type=_positive_int), "training steps"),
    "batch_size": (dict(type=_positive_int), "global batch, split over the processes"),
    "lr": (dict(type=_positive_float), "AdamW learning rate"),
    "warmup_steps": (dict(type=_non_negative_int), "linear learning-rate warm-up"),
    "weight_decay": (dict(type=_non_negative_float), "AdamW weight decay"),
    "ema_decay": (dict(type=_fraction), "EMA decay"),
    "ema_warmup": (dict(action=argparse.BooleanOptionalAction), "EMA decay min(decay, (1+n)/(10+n))"),
    "lambda_dp": (
        dict(type=_non_negative_float),
        "weight of the diffusion prior loss (Remix-DiT: of the coefficient prior, 1e-4)",
    ),
    "prior_schedule": (
        dict(choices=("constant", "published")),
        "prior weight over training: constant, or Remix-DiT's published lambda_dp * (2 - step / steps)",
    ),
    "timestep_sampling": (
        dict(choices=("uniform", "interval")),
        "uniform, or (Remix-DiT, published) every batch from one expert's timestep interval",
    ),
    "coef_lr": (dict(type=_positive_float), "Remix-DiT: AdamW lr of the coefficient table"),
    "noise_schedule": (dict(choices=("cosine", "linear")), "beta schedule"),
    "precision": (dict(choices=PRECISIONS), "fp32, bf16 autocast, or fp16 autocast with a grad scaler"),
    "grad_clip": (dict(type=_non_negative_float), "clip the gradient norm to this; 0 = off"),
    "max_bad_steps": (dict(type=_positive_int), "stop after this many non-finite losses in a row"),
    "parallel": (dict(choices=PARALLEL), "ddp, or fsdp (FSDP2 fully_shard) for L/XL"),
    "seed": (dict(type=_non_negative_int), "random seed (rank r uses seed * world + r)"),
    "device": (dict(), "auto (GPU when present), cpu, cuda or cuda:N"),
    "out": (dict(), "run folder (default runs/<data>-<timestamp>)"),
    "log_every": (dict(type=_positive_int), "steps per log record"),
    "ckpt_every": (dict(type=_positive_int), "steps between checkpoints"),
    "keep_checkpoints": (dict(type=_positive_int), "checkpoints kept (the newest)"),
    "progress": (dict(action=argparse.BooleanOptionalAction), "progress bar on rank 0"),
    "figure_every": (
        dict(type=_non_negative_int),
        "draw the denoising paths of the EMA model "
        "(figures/paths-<step>.png, needs matplotlib) every K steps; 0 = never",
    ),
    "sample": (dict(action=argparse.BooleanOptionalAction), "sample and score after training (digits)"),
    "objective": (
        dict(choices=OBJECTIVES),
        "training objective: Gaussian diffusion, or rectified flow (DiffMoE's; any family)",
    ),
    "sample_method": (dict(choices=("ddpm", "ddim", "euler", "heun")), "sampler (euler/heun: objective flow)"),
    "sample_steps": (dict(type=_positive_int), "sampling steps, respaced from 1000"),
    "cfg_scale": (dict(type=_guidance), "classifier-free guidance scale, 1 = none"),
    "samples_per_class": (dict(type=_positive_int), "grid columns: samples of each class"),
}
assert set(_FLAGS) == set(_FIELD_TYPES), "every config field needs a flag"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `switch-dit train` and `python -m switch_dit.train`: one per config field,
    plus --config, --resume and --threads."""
    d_paper, d_digits = TrainConfig(data="latents"), TrainConfig()
    parser.add_argument("--config", default=None, help="YAML or JSON file of config fields (flags override it)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="continue from a checkpoint: PATH (file or run folder), or alone: the newest complete "
        "checkpoint of --out, starting afresh if there is none yet",
    )
    parser.add_argument(
        "--threads", type=_non_negative_int, default=0, help="CPU threads for torch; 0 keeps torch's default"
    )
    for name, (kwargs, text) in _FLAGS.items():
        a, b = getattr(d_paper, name), getattr(d_digits, name)
        default = f"{a}" if a == b or name in ("data", "out") else f"{b} for digits, {a} otherwise"
        default = b if name == "data" else default
        text = text if name == "out" else f"{text} (default {default})"
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS, help=text.replace("%", "%%"), **kwargs
        )


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The config fields given on the command line."""
    return {name: getattr(args, name) for name in _FLAGS if hasattr(args, name)}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolve a fresh run's config from parsed flags (see module doc); errors name the flag."""
    overrides = overrides_from_args(args)
    if ("top_k" in overrides or "num_experts" in overrides) and not overrides.get("model", "").startswith("Remix"):
        k, m = overrides.get("top_k", TrainConfig.top_k), overrides.get("num_experts", 3)
        if k > m:
            raise ValueError(f"--top-k ({k}) must not exceed --num-experts ({m})")
    file_values = load_config_file(args.config) if args.config else {}
    return resolve(file_values, overrides)
