"""The log of a training run: ``log.jsonl`` and ``log.csv``, plus TensorBoard events when
tensorboard is installed. Rank 0 writes one record per ``log_every`` steps.

A record holds the step and the means over its window of steps (``FIELDS``); the trainer
adds fields where it computes them (a new loss part is a new key of the record and, to
appear in the CSV, a new entry of ``FIELDS``). ``switch_dit.figures.read_log`` reads it back.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

__all__ = ["FIELDS", "RunLog"]

FIELDS = (
    "step",
    "loss",
    "mse",
    "vb",
    "prior",
    "lr",
    "grad_norm",
    "steps_per_sec",
    "images_per_sec",
    "elapsed_s",
    "skipped",
    "scale",
)


class RunLog:
    """log.jsonl and log.csv, plus TensorBoard events when tensorboard is installed (rank 0).

    On a resume, records past the checkpoint's step are dropped first: the steps after
    it run again and write them again, so the log of a resumed run reads as one run.
    """

    def __init__(self, folder: Path, resume_step: int | None):
        self.jsonl_path, self.csv_path = folder / "log.jsonl", folder / "log.csv"
        if resume_step is None:
            for p in (self.jsonl_path, self.csv_path):
                p.unlink(missing_ok=True)
        else:
            self._truncate(resume_step)
        write_header = not self.csv_path.exists()
        self._jsonl = open(self.jsonl_path, "a")
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=FIELDS, extrasaction="ignore")
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
            keep = [
                line
                for line in self.jsonl_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step
            ]
            self.jsonl_path.write_text("".join(line + "\n" for line in keep))
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= step]
            with open(self.csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
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
