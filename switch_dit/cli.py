"""The ``switch-dit`` command.

    switch-dit train                 train a small Switch-DiT on the embedded digits,
                                     sample with guidance and print a quality figure
    switch-dit sample --ckpt PATH    sample a grid from a checkpoint (EMA weights)

Every option has a default that runs on a laptop CPU in a few minutes; on a machine
with a GPU the same command uses it (``--device auto``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting collapse when a core is busy with anything
# else: measured on a 2-core machine with one other busy process, a training step
# took 1.75 s with the default (active) wait policy and 0.21 s with PASSIVE, and
# about the same either way on an idle machine. It must be set before torch loads
# its OpenMP runtime, hence here, before the first import of torch; a value the user
# set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .models import MODEL_NAMES  # noqa: E402  (imports torch)

__all__ = ["main", "build_parser"]


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
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
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
    if text not in MODEL_NAMES:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose one of {', '.join(MODEL_NAMES)}")
    return text


def _add_sampling_options(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--sample-method", choices=("ddpm", "ddim"), default=defaults.sample_method,
                   help="sampler (default %(default)s)")
    p.add_argument("--sample-steps", type=_positive_int, default=defaults.sample_steps,
                   help="sampling steps, respaced from 1000 (default %(default)s)")
    p.add_argument("--cfg-scale", type=_guidance, default=defaults.cfg_scale,
                   help="classifier-free guidance scale, 1 = none (default %(default)s)")
    p.add_argument("--samples-per-class", type=_positive_int, default=defaults.samples_per_class,
                   help="grid columns: samples of each digit (default %(default)s)")
    p.add_argument("--device", default=defaults.device,
                   help="auto (GPU when present), cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    p.add_argument("--threads", type=_non_negative_int, default=0,
                   help="CPU threads for torch; 0 keeps torch's default (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    d = TrainConfig()
    parser = argparse.ArgumentParser(prog="switch-dit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="{train,sample}")
    sub.required = True

    t = sub.add_parser("train", help="train on the embedded digits, sample, report quality",
                       description="Train a class-conditional Switch-DiT on scikit-learn's handwritten digits "
                                   "(upsampled, in [-1, 1]), then sample with guidance from the EMA model and "
                                   "report how often a classifier of real digits recognises the requested class.")
    t.add_argument("--model", type=_model_name, default=d.model, help="model name (default %(default)s)")
    t.add_argument("--hidden-size", type=_non_negative_int, default=d.hidden_size,
                   help="override the named width; 0 keeps the name's size (default %(default)s)")
    t.add_argument("--depth", type=_non_negative_int, default=d.depth,
                   help="override the named depth; 0 keeps it (default %(default)s)")
    t.add_argument("--num-heads", type=_non_negative_int, default=d.num_heads,
                   help="override the named head count; 0 keeps it (default %(default)s)")
    t.add_argument("--num-experts", type=_positive_int, default=d.num_experts, help="M (default %(default)s)")
    t.add_argument("--top-k", type=_positive_int, default=d.top_k, help="k (default %(default)s)")
    t.add_argument("--image-size", type=_positive_int, default=d.image_size,
                   help="digits are upsampled from 8x8 to this size (default %(default)s)")
    t.add_argument("--steps", type=_positive_int, default=d.steps, help="training steps (default %(default)s)")
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="(default %(default)s)")
    t.add_argument("--lr", type=_positive_float, default=d.lr, help="AdamW learning rate (default %(default)s)")
    t.add_argument("--warmup-steps", type=_non_negative_int, default=d.warmup_steps,
                   help="linear learning-rate warm-up (default %(default)s)")
    t.add_argument("--ema-decay", type=_fraction, default=d.ema_decay, help="(default %(default)s)")
    t.add_argument("--lambda-dp", type=float, default=d.lambda_dp,
                   help="weight of the diffusion prior loss (default %(default)s)")
    t.add_argument("--log-every", type=_positive_int, default=d.log_every,
                   help="steps per log.jsonl record (default %(default)s)")
    t.add_argument("--out", default=None, help="run folder (default runs/digits-<timestamp>)")
    t.add_argument("--no-sample", action="store_true", help="train and checkpoint only")
    _add_sampling_options(t, d)

    s = sub.add_parser("sample", help="sample a digit grid from a checkpoint",
                       description="Sample a grid (one row per digit) from a checkpoint written by "
                                   "`switch-dit train`, with its EMA weights unless --raw-weights.")
    s.add_argument("--ckpt", required=True, help="checkpoint.pt of a training run")
    s.add_argument("--out", default=None, help="PNG to write (default samples-<timestamp>.png beside the checkpoint)")
    s.add_argument("--raw-weights", action="store_true", help="use the trained weights instead of the EMA")
    s.add_argument("--no-eval", action="store_true", help="skip the classifier quality figure")
    _add_sampling_options(s, d)
    return parser


def _train(args) -> int:
    from .train import TrainConfig, train

    if args.top_k > args.num_experts:
        raise ValueError(f"--top-k ({args.top_k}) must not exceed --num-experts ({args.num_experts})")
    cfg = TrainConfig(
        model=args.model, hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads,
        num_experts=args.num_experts, top_k=args.top_k, image_size=args.image_size, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        lambda_dp=args.lambda_dp, seed=args.seed, device=args.device, out=args.out, log_every=args.log_every,
        sample=not args.no_sample, sample_method=args.sample_method, sample_steps=args.sample_steps,
        cfg_scale=args.cfg_scale, samples_per_class=args.samples_per_class, progress=not args.no_progress,
    )
    train(cfg)
    return 0


def _sample(args) -> int:
    from .train import (evaluate_samples, generate, grid_labels, load_checkpoint, model_from_checkpoint,
                        resolve_device, save_grid)

    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(ckpt, use_ema=not args.raw_weights, device=device)
    schedule = ckpt.get("config", {}).get("noise_schedule", "cosine")
    out = Path(args.out) if args.out else Path(args.ckpt).with_name(f"samples-{time.strftime('%Y%m%d-%H%M%S')}.png")
    if out.parent and not out.parent.exists():
        raise ValueError(f"--out: folder {str(out.parent)!r} does not exist")
    labels = grid_labels(args.samples_per_class, model.num_classes, device=device)
    samples = generate(model, labels, method=args.sample_method, steps=args.sample_steps, cfg_scale=args.cfg_scale,
                       seed=args.seed, noise_schedule=schedule, progress=not args.no_progress)
    save_grid(samples, out, nrow=args.samples_per_class)
    print(f"wrote {out} ({len(labels)} digits, {'trained' if args.raw_weights else 'EMA'} weights of step "
          f"{ckpt.get('step', '?')}, {args.sample_method} {args.sample_steps} steps, guidance {args.cfg_scale})")
    if not args.no_eval:
        m = evaluate_samples(samples, labels, model.input_size)
        print(json.dumps({k: m[k] for k in ("sample_accuracy", "classifier_test_accuracy", "num_samples")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status (argparse exits 2 on bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        # On a CPU shared with other jobs, fewer threads than cores avoids OpenMP thrashing.
        import torch

        torch.set_num_threads(args.threads)
    try:
        return _train(args) if args.command == "train" else _sample(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad values that only the run itself can detect: the same shape of message as argparse's.
        parser.exit(2, f"switch-dit {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
