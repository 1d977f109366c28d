"""The tiny training run that the trainer, checkpoint, resume, distributed and family tests
share: a width-16, depth-2 model on 8x8 digits, 8 images a step, on the CPU, logging every
step, no samples. Tests add the model, the steps and the output folder of their own."""

import json
from pathlib import Path

# TrainConfig keyword arguments of the tiny run.
TINY_TRAIN = dict(
    hidden_size=16,
    depth=2,
    num_heads=2,
    image_size=8,
    batch_size=8,
    device="cpu",
    sample=False,
    progress=False,
    log_every=1,
)

# The same run as `switch-dit train` flags (plus one torch thread: a subprocess of its own).
TINY_TRAIN_ARGS = [
    "--hidden-size",
    "16",
    "--depth",
    "2",
    "--num-heads",
    "2",
    "--image-size",
    "8",
    "--batch-size",
    "8",
    "--device",
    "cpu",
    "--no-sample",
    "--no-progress",
    "--log-every",
    "1",
    "--threads",
    "1",
]

# The log.jsonl fields that measure the machine, not the run: two equal runs differ in them.
TIMING = frozenset({"steps_per_sec", "images_per_sec", "elapsed_s"})


def quiet(*args, **kwargs):
    """A `log` for train() that says nothing."""


def records(run_dir: Path) -> list[dict]:
    """The run's log.jsonl, one dict a logged step, without the TIMING fields."""
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING}
        for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()
    ]
