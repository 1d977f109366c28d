"""The ``switch-dit`` command.

    switch-dit train                 train a small Switch-DiT on the embedded digits,
                                     sample with guidance and print a quality figure;
                                     with --data LATENTS the paper's recipe (torchrun for
                                     several GPUs, --resume after a crash)
    switch-dit extract-latents I O   encode an image folder into VAE latent shards
    switch-dit sample --ckpt PATH    sample a grid from a checkpoint (ours or the reference
                                     layout, EMA weights), or with --npz DIR a sample set of
                                     any size in the ADM .npz layout (sharded under torchrun,
                                     resumable)
    switch-dit eval SAMPLES.npz      digits metrics (no download), or with --ref FID, IS and
                                     precision/recall through torch-fidelity / clean-fid
    switch-dit figure --run DIR      the denoising-path figure and the loss curves of a run
    switch-dit compare               DiT, DTR and Switch-DiT trained alike on the digits: a
                                     miniature of the paper's Table 2

Every option has a default that runs on a laptop CPU in a few minutes; on a machine
with a GPU the same command uses it (``--device auto``). Sharded sampling on G GPUs:
``torchrun --nproc_per_node=G -m switch_dit.cli sample --ckpt C --npz DIR --num-samples N``.
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

from .config import _guidance, _model_name, _non_negative_int, _positive_float, _positive_int  # noqa: E402

__all__ = ["main", "build_parser"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"must name at least one integer, got {text!r}")
    return values


def _families(text: str) -> list[str]:
    from .compare import FAMILIES

    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in FAMILIES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"must be comma-separated names from {','.join(FAMILIES)}, got {text!r}")
    return values


def _threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_non_negative_int,
        default=0,
        help="CPU threads for torch; 0 keeps torch's default (default %(default)s)",
    )


def _tf32_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TF32 for fp32 matmuls and convolutions on CUDA, as in training (default on; --no-tf32 for full fp32)",
    )


def _add_sample_parser(sub) -> None:
    s = sub.add_parser(
        "sample",
        help="sample a grid, or an .npz sample set, from a checkpoint",
        description="Sample from a checkpoint written by `switch-dit train` or in the reference "
        "implementation's layout, with its EMA weights unless --raw-weights. Without "
        "--npz: a PNG grid, one row per class. With --npz DIR: --num-samples images in "
        "the ADM .npz layout (arr_0 uint8 NHWC, arr_1 labels), in shards that a rerun "
        "keeps; under torchrun every rank samples its shards and rank 0 merges. "
        "Sampler defaults: the run's own settings for our checkpoints, else DDPM with "
        "250 steps and guidance 1.5 (the paper's).",
    )
    s.add_argument(
        "--ckpt",
        required=True,
        help="checkpoint file (ours or the reference layout), or a run folder (its newest checkpoint)",
    )
    s.add_argument(
        "--out",
        default=None,
        help="PNG grid to write (default samples-<timestamp>.png beside the checkpoint; with --npz only when given)",
    )
    s.add_argument("--raw-weights", action="store_true", help="use the trained weights instead of the EMA")
    s.add_argument("--no-eval", action="store_true", help="skip the digits quality figures")
    s.add_argument(
        "--sample-method",
        choices=("ddpm", "ddim", "euler", "heun"),
        default=None,
        help="sampler (default: the run's, else ddpm; euler/heun for rectified-flow models)",
    )
    s.add_argument(
        "--sample-steps",
        type=_positive_int,
        default=None,
        help="sampling steps respaced from 1000 (default: the run's, else 250 for ddpm, 50 for ddim)",
    )
    s.add_argument(
        "--cfg-scale",
        type=_guidance,
        default=None,
        help="classifier-free guidance scale, 1 = none (default: the run's, else 1.5)",
    )
    s.add_argument(
        "--noise-schedule",
        choices=("cosine", "linear"),
        default=None,
        help="the schedule the model was trained with (default: the run's, else cosine)",
    )
    s.add_argument(
        "--classes",
        type=_int_list,
        default=None,
        help="comma-separated classes: the grid's rows, or the classes an .npz set draws from "
        "(default: every class when there are at most 16, else 8 drawn with the seed; all for --npz)",
    )
    s.add_argument(
        "--samples-per-class", type=_positive_int, default=None, help="grid columns (default: the run's, else 4)"
    )
    s.add_argument("--npz", default=None, metavar="DIR", help="write an .npz sample set into DIR")
    s.add_argument("--num-samples", type=_positive_int, default=None, help="images in the .npz set (with --npz)")
    s.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="images per batch and per shard of the .npz set (default %(default)s)",
    )
    s.add_argument(
        "--model",
        type=_model_name,
        default=None,
        help="model name for a reference-layout checkpoint (default: read off the weights)",
    )
    s.add_argument(
        "--num-heads",
        type=_positive_int,
        default=None,
        help="attention heads of a reference-layout checkpoint whose width is no named size",
    )
    s.add_argument(
        "--vae",
        default="ema",
        help="latent models: the VAE that decodes them, ema, mse or a local folder (default %(default)s)",
    )
    s.add_argument(
        "--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N (default %(default)s)"
    )
    _tf32_option(s)
    s.add_argument(
        "--capture",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay each sampling step from a CUDA graph (default: on CUDA; --no-capture: eager)",
    )
    s.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    _threads_option(s)
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_eval_parser(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="score an .npz sample set",
        description="Score a sample set in the ADM .npz layout. Without --ref: the download-free "
        "digits metrics (accuracy of a classifier of real digits on the requested "
        "classes, Frechet distance in its feature space). With --ref (an .npz or a "
        "folder of images): FID, Inception Score and precision/recall through "
        "torch-fidelity, or FID through clean-fid, whichever is installed.",
    )
    e.add_argument("samples", help="sample file (.npz, arr_0 uint8 NHWC; arr_1 labels for the digits accuracy)")
    e.add_argument("--ref", default=None, help="reference set (.npz or image folder) for FID / IS / precision-recall")
    e.add_argument(
        "--backend",
        choices=("auto", "torch-fidelity", "clean-fid"),
        default="auto",
        help="metrics library (default %(default)s: the first installed)",
    )
    e.add_argument(
        "--weights", default=None, help="torch-fidelity: local feature-extractor weights, for machines without internet"
    )
    e.add_argument("--no-isc", action="store_true", help="skip the Inception Score")
    e.add_argument("--no-prc", action="store_true", help="skip precision and recall")
    e.add_argument("--batch-size", type=_positive_int, default=64, help="(default %(default)s)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    _tf32_option(e)
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    _threads_option(e)


def _add_figure_parser(sub) -> None:
    f = sub.add_parser(
        "figure",
        help="denoising-path figure and loss curves of a run",
        description="Draw the denoising paths of a Switch-DiT checkpoint (every block's experts "
        "over the timesteps beside the matched diffusion prior, the paper's Fig. 8) "
        "and the loss curves (total, noise, vb, prior) of a training log. Needs "
        "matplotlib.",
    )
    f.add_argument("--run", default=None, help="a run folder: its (newest) checkpoint and log.jsonl")
    f.add_argument("--ckpt", default=None, help="checkpoint for the paths figure")
    f.add_argument("--log", default=None, help="log.jsonl for the loss curves")
    f.add_argument("--out", default=None, help="folder for paths.png and loss.png (default: the run's folder)")
    f.add_argument("--raw-weights", action="store_true", help="the trained weights' paths instead of the EMA's")
    f.add_argument(
        "--num-heads",
        type=_positive_int,
        default=None,
        help="attention heads of a reference-layout checkpoint whose width is no named size",
    )
    _threads_option(f)


def _add_compare_parser(sub, d) -> None:
    from .compare import FAMILIES, CompareConfig

    c0 = CompareConfig()
    c = sub.add_parser(
        "compare",
        help="train DiT, DTR and Switch-DiT alike on the digits, print a miniature Table 2",
        description="Train DiT, DTR and Switch-DiT with the same budget, data order and seeds on the "
        "embedded digits, sample each from its EMA weights and print their parameters, "
        "GFLOPs, final loss and digits metrics (mean ± std over seeds), the same at equal "
        "wall time, and which differences exceed the seed spread: a miniature of the "
        "paper's Table 2. The default budget takes about ten minutes on two CPU cores.",
    )
    c.add_argument("--size", default=c0.size, help="named size and patch (default %(default)s)")
    c.add_argument(
        "--hidden-size",
        type=_non_negative_int,
        default=c0.hidden_size,
        help="override the named width; 0 keeps it (default %(default)s)",
    )
    c.add_argument(
        "--depth", type=_non_negative_int, default=c0.depth, help="0 keeps the named depth (default %(default)s)"
    )
    c.add_argument(
        "--num-heads",
        type=_non_negative_int,
        default=c0.num_heads,
        help="0 keeps the named head count (default %(default)s)",
    )
    c.add_argument(
        "--steps", type=_positive_int, default=c0.steps, help="training steps per model (default %(default)s)"
    )
    c.add_argument("--batch-size", type=_positive_int, default=c0.batch_size, help="(default %(default)s)")
    c.add_argument("--lr", type=_positive_float, default=c0.lr, help="AdamW learning rate (default %(default)s)")
    c.add_argument("--warmup-steps", type=_non_negative_int, default=c0.warmup_steps, help="(default %(default)s)")
    c.add_argument(
        "--seeds",
        type=_int_list,
        default=list(c0.seeds),
        help=f"comma-separated seeds, one run per model and seed (default {','.join(map(str, c0.seeds))})",
    )
    c.add_argument(
        "--families",
        type=_families,
        default=list(c0.families),
        help=f"comma-separated models from {','.join(FAMILIES)} (default {','.join(c0.families)})",
    )
    c.add_argument(
        "--eval-every",
        type=_positive_int,
        default=c0.eval_every,
        help="steps between the checkpoints scored at equal wall time (default %(default)s)",
    )
    c.add_argument(
        "--samples-per-class", type=_positive_int, default=c0.samples_per_class, help="(default %(default)s)"
    )
    c.add_argument("--sample-method", choices=("ddpm", "ddim"), default=c0.sample_method, help="(default %(default)s)")
    c.add_argument("--sample-steps", type=_positive_int, default=c0.sample_steps, help="(default %(default)s)")
    c.add_argument("--cfg-scale", type=_guidance, default=c0.cfg_scale, help="(default %(default)s)")
    c.add_argument("--device", default=c0.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    c.add_argument("--out", default=None, help="folder of the runs (default runs/compare-<timestamp>)")
    _threads_option(c)
    c.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .config import TrainConfig

    d = TrainConfig()
    parser = argparse.ArgumentParser(prog="switch-dit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="{train,extract-latents,sample,eval,figure,compare}")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train: the digits demo by default, VAE latents at scale (torchrun)",
        description="Train a class-conditional Switch-DiT. Without --data: scikit-learn's "
        "handwritten digits, then guided samples from the EMA model and how often a "
        "classifier of real digits recognises the requested class. With --data FOLDER "
        "(from extract-latents): the paper's recipe. Several GPUs: torchrun "
        "--nproc_per_node=N -m switch_dit.train with the same flags.",
    )
    from .config import add_train_arguments

    add_train_arguments(t)

    x = sub.add_parser(
        "extract-latents",
        help="encode an image folder into VAE latent shards for training",
        description="Encode an image folder (one sub-folder per class) with the Stable Diffusion "
        "VAE into latent shards and a manifest that `switch-dit train --data` reads. "
        "Resumable; several GPUs: torchrun --nproc_per_node=N -m switch_dit.latents.",
    )
    from .latents import add_extract_arguments

    add_extract_arguments(x)

    _add_sample_parser(sub)
    _add_eval_parser(sub)
    _add_figure_parser(sub)
    _add_compare_parser(sub, d)
    return parser


def _train(args) -> int:
    from .train import run_from_args

    return run_from_args(args)


def _extract_latents(args) -> int:
    from .latents import extract_from_args

    return extract_from_args(args)


def _sampler_settings(args, info: dict) -> dict:
    """The sampler: the flags, else the run's own settings (our checkpoints), else the paper's."""
    run = info["config"] if info["layout"] == "switch-dit" else {}
    method = args.sample_method or run.get("sample_method") or "ddpm"
    steps = args.sample_steps
    if steps is None:
        steps = run.get("sample_steps") if run.get("sample_method") == method else None
        steps = steps or (250 if method == "ddpm" else 50)
    return dict(
        method=method,
        steps=steps,
        cfg_scale=args.cfg_scale if args.cfg_scale is not None else run.get("cfg_scale", 1.5),
        noise_schedule=args.noise_schedule or run.get("noise_schedule", "cosine"),
    )


def _is_digits(model) -> bool:
    return model.in_channels == 1 and model.num_classes == 10


def _digits_report(result: dict) -> str:
    keys = ("sample_accuracy", "classifier_test_accuracy", "frechet_distance", "real_frechet_distance", "num_samples")
    return json.dumps({k: result[k] for k in keys})


def _sample(args) -> int:
    import torch

    from . import checkpoint, distributed, metrics, sampling
    from . import vae as vae_lib

    world = distributed.rank_and_world()[1]
    if args.npz is None and args.num_samples is not None:
        raise ValueError("--num-samples needs --npz DIR (the folder of the sample set)")
    if args.npz is not None and args.num_samples is None:
        raise ValueError("--npz needs --num-samples N")
    if args.npz is None and world > 1:
        raise ValueError("several torchrun ranks sample .npz sets only: add --npz DIR --num-samples N")
    ctx = distributed.setup(args.device)  # under torchrun: this rank's GPU, and the process group
    device = ctx.device
    distributed.set_tf32(device, args.tf32)
    try:
        model, info = checkpoint.load_model(
            args.ckpt, ema=not args.raw_weights, device=device, model_name=args.model, num_heads=args.num_heads
        )
        settings = _sampler_settings(args, info)
        vae = vae_lib.load_vae(args.vae, device=device) if model.in_channels == 4 else None
        weights = f"{'trained' if args.raw_weights else 'EMA'} weights of step {info.get('step') or '?'}"
        if args.classes is not None and any(not 0 <= c < model.num_classes for c in args.classes):
            raise ValueError(f"--classes must be in [0, {model.num_classes}), got {args.classes}")
        if args.npz is not None:
            return _sample_npz(args, model, vae, settings, weights)

        run = info["config"] if info["layout"] == "switch-dit" else {}
        per_class = args.samples_per_class or run.get("samples_per_class", 4)
        classes = args.classes
        if classes is None:
            n = model.num_classes
            g = torch.Generator().manual_seed(args.seed)
            classes = list(range(n)) if n <= 16 else sorted(torch.randperm(n, generator=g)[:8].tolist())
        out = Path(args.out) if args.out else Path(args.ckpt).with_name(f"samples-{time.strftime('%Y%m%d-%H%M%S')}.png")
        if out.parent and not out.parent.exists():
            raise ValueError(f"--out: folder {str(out.parent)!r} does not exist")
        labels = torch.tensor(classes, device=device).repeat_interleave(per_class)
        x = sampling.generate(
            model,
            labels,
            seed=args.seed,
            clip_denoised=vae is None,
            progress=not args.no_progress,
            capture=args.capture,
            **settings,
        )
        if vae is not None:
            x = vae_lib.decode(vae, x)
        sampling.save_grid(x, out, nrow=per_class, scale=2 if x.shape[-1] <= 64 else 1)
        print(
            f"wrote {out} ({len(labels)} images, {len(classes)} classes x {per_class}, {weights}, "
            f"{settings['method']} {settings['steps']} steps, guidance {settings['cfg_scale']})"
        )
        if _is_digits(model) and not args.no_eval and len(labels) >= 2:
            print(_digits_report(metrics.digits_metrics(x.cpu(), labels.cpu())))
        return 0
    finally:
        if ctx.owns_group:
            distributed.cleanup()


def _sample_npz(args, model, vae, settings: dict, weights: str) -> int:
    from . import metrics, sampling

    path = sampling.sample_to_npz(
        model,
        args.npz,
        args.num_samples,
        batch_size=args.batch_size,
        classes=args.classes,
        seed=args.seed,
        vae=vae,
        progress=not args.no_progress,
        capture=args.capture,
        **settings,
    )
    if path is None:  # not rank 0
        return 0
    print(
        f"{path}: {args.num_samples} images, {weights}, {settings['method']} {settings['steps']} steps, "
        f"guidance {settings['cfg_scale']}, seed {args.seed}"
    )
    images, labels = sampling.read_npz(path)
    if args.out:
        import torch

        grid = torch.from_numpy(images[:100]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        grid = grid[:, :1] if _is_digits(model) else grid  # grey was repeated to RGB for the .npz
        print(f"wrote {sampling.save_grid(grid, args.out, nrow=10, scale=2 if images.shape[1] <= 64 else 1)}")
    if _is_digits(model) and not args.no_eval and len(images) >= 2:
        print(_digits_report(metrics.digits_metrics_npz(path)))
    return 0


def _eval(args) -> int:
    from . import metrics

    if args.ref is None:
        result = {"kind": "digits", **metrics.digits_metrics_npz(args.samples)}
    else:
        result = {
            "kind": "fidelity",
            **metrics.fidelity_metrics(
                args.samples,
                args.ref,
                backend=args.backend,
                isc=not args.no_isc,
                prc=not args.no_prc,
                device=_device_with_tf32(args),
                batch_size=args.batch_size,
                weights_path=args.weights,
            ),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def _device_with_tf32(args):
    from . import distributed

    device = distributed.resolve_device(args.device)
    distributed.set_tf32(device, args.tf32)
    return device


def _figure(args) -> int:
    from . import checkpoint, figures

    run = Path(args.run) if args.run else None
    if run is not None and not run.is_dir():
        raise ValueError(f"--run: {str(run)!r} is not a folder")
    ckpt = Path(args.ckpt) if args.ckpt else run  # a run folder: its newest checkpoint
    log = Path(args.log) if args.log else (run / "log.jsonl" if run else None)
    if ckpt is None and log is None:
        raise ValueError("nothing to draw: give --run DIR, or --ckpt and/or --log")
    out = Path(args.out) if args.out else (run or (ckpt or log).parent)
    out.mkdir(parents=True, exist_ok=True)
    figures._figure_class()  # say what to install before any work
    if ckpt is not None:
        model, info = checkpoint.load_model(ckpt, ema=not args.raw_weights, num_heads=args.num_heads)
        if model.routing != "switch":
            print(f"no denoising paths: {ckpt} holds a {'DTR' if model.routing == 'dtr' else 'DiT'} model (no experts)")
        else:
            paths = figures.denoising_paths(model)
            png = figures.plot_denoising_paths(paths, out / "paths.png")
            T, N, M = paths.shape
            print(
                f"wrote {png} ({N} blocks x {M} experts over {T} timesteps; {paths.mismatch:.0f} of {T * N * M} "
                f"cells differ from the matched prior)"
            )
    if log is not None:
        print(f"wrote {figures.plot_loss_curves(log, out / 'loss.png')}")
    return 0


def _compare(args) -> int:
    from .compare import CompareConfig, compare, format_table

    cfg = CompareConfig(
        size=args.size,
        hidden_size=args.hidden_size,
        depth=args.depth,
        num_heads=args.num_heads,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seeds=tuple(args.seeds),
        families=tuple(args.families),
        samples_per_class=args.samples_per_class,
        sample_method=args.sample_method,
        sample_steps=args.sample_steps,
        cfg_scale=args.cfg_scale,
        eval_every=args.eval_every,
        device=args.device,
        out=args.out,
        progress=not args.no_progress,
    )
    rows = compare(cfg)
    print()
    print(format_table(rows, cfg))
    return 0


_COMMANDS = {
    "train": _train,
    "extract-latents": _extract_latents,
    "sample": _sample,
    "eval": _eval,
    "figure": _figure,
    "compare": _compare,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status (argparse exits 2 on bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        # On a CPU shared with other jobs, fewer threads than cores avoids OpenMP thrashing.
        import torch

        torch.set_num_threads(args.threads)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        # Bad values that only the run itself can detect: the same shape of message as argparse's.
        parser.exit(2, f"switch-dit {args.command}: error: {e}\n")
    except (ImportError, RuntimeError) as e:
        # A missing optional package or weights that cannot be downloaded: say what to do, no traceback.
        parser.exit(1, f"switch-dit {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
