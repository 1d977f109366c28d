"""The results file: one JSON per device and day, rows keyed by what was measured.

Layout::

    {"schema_version": 1,
     "device": {"name", "slug", "kind", ...},
     "peaks": {"flops": {"bf16", "fp16", "fp32"}, "bytes_per_s", "source"},  # measured in the run
     "datasheet": {same fields} or null,                                    # null: unknown device
     "runs": [{"id", "command", "mode", "started", "finished", "git": {...},
               "versions": {...}, "timer", "measured_peaks", "settings"}],
     "rows": [ROW, ...]}

A ROW (``make_row``) names its suite, bench, variant, mode, shape and dtype (together the
key), its status ("ok", "skipped", "error") with a reason, the timing in ms (median,
p20, p80) with any re-timings, the work (FLOPs, bytes), the floor and the derived
figures, the id of the run that produced it and its provenance (commit, dirty, source digest,
device, torch, triton: ``PROVENANCE_FIELDS``). A second run on the same device and
day is merged into the same file: its rows replace rows with the same key.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import SCHEMA_VERSION

STATUSES = ("ok", "skipped", "error")
MODES = ("fwd", "bwd", "fwd+bwd", "step")
ROW_FIELDS = {
    "suite": str,
    "bench": str,
    "variant": str,
    "mode": str,
    "shape": dict,
    "dtype": str,
    "status": str,
    "reason": (str, type(None)),
    "ms": (dict, type(None)),
    "reruns_ms": list,
    "wall_ms": (float, type(None)),
    "work": dict,
    "floor_ms": (float, type(None)),
    "over_floor": (float, type(None)),
    "tflops": (float, type(None)),
    "gbps": (float, type(None)),
    "peak_mem_mib": (float, type(None)),
    "host_syncs": (float, type(None)),
    "extra": dict,
    "run": int,
    "provenance": dict,
}
PROVENANCE_FIELDS = ("commit", "dirty", "source_digest", "device", "torch", "triton")


def row_key(row: dict) -> tuple:
    return (
        row["suite"],
        row["bench"],
        row["variant"],
        row["mode"],
        json.dumps(row["shape"], sort_keys=True),
        row["dtype"],
    )


def make_row(
    *,
    suite,
    bench,
    variant,
    mode,
    shape,
    dtype,
    status="ok",
    reason=None,
    ms=None,
    reruns_ms=(),
    wall_ms=None,
    work=None,
    peaks=None,
    peak_mem_mib=None,
    host_syncs=None,
    extra=None,
    run=0,
    provenance=None,
) -> dict:
    """A complete row; the floor and derived rates follow from ``ms``, ``work`` and ``peaks``.

    floor = max(FLOPs / peak FLOP/s of the dtype, bytes / peak bytes/s) (docs/design.md §5).
    """
    work = dict(work or {"flops": 0.0, "bytes": 0.0})
    floor_ms = over = tflops = gbps = None
    if peaks is not None:
        flop_rate = peaks["flops"].get(_peak_dtype(dtype), peaks["flops"]["bf16"])
        floor_ms = 1e3 * max(work["flops"] / flop_rate, work["bytes"] / peaks["bytes_per_s"])
    if ms is not None and ms["median"] > 0:
        secs = ms["median"] / 1e3
        tflops = work["flops"] / secs / 1e12
        gbps = work["bytes"] / secs / 1e9
        if floor_ms:
            over = ms["median"] / floor_ms
    return {
        "suite": suite,
        "bench": bench,
        "variant": variant,
        "mode": mode,
        "shape": dict(shape),
        "dtype": dtype,
        "status": status,
        "reason": reason,
        "ms": ms,
        "reruns_ms": list(reruns_ms),
        "wall_ms": _f(wall_ms),
        "work": work,
        "floor_ms": _f(floor_ms),
        "over_floor": _f(over),
        "tflops": _f(tflops),
        "gbps": _f(gbps),
        "peak_mem_mib": _f(peak_mem_mib),
        "host_syncs": _f(host_syncs),
        "extra": dict(extra or {}),
        "run": run,
        "provenance": {k: (provenance or {}).get(k) for k in PROVENANCE_FIELDS},
    }


def _f(x):
    return None if x is None else float(x)


def _peak_dtype(dtype: str) -> str:
    """'bf16-autocast' -> 'bf16'; 'fp16-autocast+scaler' -> 'fp16'."""
    return dtype.split("-")[0]


class Results:
    """Rows of one device and day, saved after every row (a killed run keeps what it did)."""

    def __init__(self, path: Path, device: dict, peaks: dict, datasheet: dict | None = None):
        self.path = Path(path)
        self.data = {
            "schema_version": SCHEMA_VERSION,
            "device": device,
            "peaks": peaks,
            "datasheet": datasheet,
            "runs": [],
            "rows": [],
        }
        if self.path.exists():
            old = load(self.path)
            if old.get("device", {}).get("slug") == device.get("slug"):
                self.data["runs"], self.data["rows"] = old["runs"], old["rows"]
        self._index = {row_key(r): i for i, r in enumerate(self.data["rows"])}

    def start_run(self, info: dict) -> int:
        run_id = 1 + max((r["id"] for r in self.data["runs"]), default=0)
        self.data["runs"].append({"id": run_id, **info})
        self.save()
        return run_id

    def update_run(self, run_id: int, **fields) -> None:
        for r in self.data["runs"]:
            if r["id"] == run_id:
                r.update(fields)
        self.save()

    def has_ok(self, key: tuple) -> bool:
        i = self._index.get(key)
        return i is not None and self.data["rows"][i]["status"] == "ok"

    def reason(self, key: tuple) -> str:
        """The kept row's reason ("" when there is no row)."""
        i = self._index.get(key)
        return "" if i is None else self.data["rows"][i]["reason"]

    def add(self, row: dict) -> None:
        key = row_key(row)
        if key in self._index:
            self.data["rows"][self._index[key]] = row
        else:
            self._index[key] = len(self.data["rows"])
            self.data["rows"].append(row)
        self.save()

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: a run killed mid-write never leaves a truncated file.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would follow the file into the repository
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, self.path)


def load(path: Path) -> dict:
    with open(path) as f:
        data = json.load(f)
    validate(data)
    return data


def result_files(folder: Path) -> list[Path]:
    """Kept result files of a folder, oldest first by the date that ends their names."""
    files = [p for p in Path(folder).glob("*.json") if not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stem[-10:], p.name))


def validate(data: dict) -> None:
    """Raise ValueError naming the first field that breaks the schema."""
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema_version must be {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    for field in ("device", "peaks", "datasheet", "runs", "rows"):
        if field not in data:
            raise ValueError(f"results lack {field!r}")
    for field in ("name", "slug", "kind"):
        if field not in data["device"]:
            raise ValueError(f"device lacks {field!r}")
    for field in ("flops", "bytes_per_s", "source"):
        if field not in data["peaks"]:
            raise ValueError(f"peaks lack {field!r}")
    run_ids = set()
    for run in data["runs"]:
        for field in ("id", "command", "mode", "started", "git", "versions", "timer"):
            if field not in run:
                raise ValueError(f"run lacks {field!r}: {run}")
        run_ids.add(run["id"])
    for i, row in enumerate(data["rows"]):
        for field, typ in ROW_FIELDS.items():
            if field not in row:
                raise ValueError(f"row {i} lacks {field!r}")
            value = row[field]
            if typ is float or (isinstance(typ, tuple) and float in typ):
                ok = value is None or isinstance(value, (int, float))
            else:
                ok = isinstance(value, typ)
            if not ok:
                raise ValueError(f"row {i} field {field!r} has type {type(value).__name__}")
        if row["status"] not in STATUSES:
            raise ValueError(f"row {i} status {row['status']!r} not in {STATUSES}")
        if row["mode"] not in MODES:
            raise ValueError(f"row {i} mode {row['mode']!r} not in {MODES}")
        if row["status"] == "ok":
            ms = row["ms"]
            if not ms or not all(k in ms for k in ("median", "p20", "p80")):
                raise ValueError(f"row {i} is ok but has no median/p20/p80")
        elif not row["reason"]:
            raise ValueError(f"row {i} is {row['status']} without a reason")
        missing = [k for k in PROVENANCE_FIELDS if k not in row["provenance"]]
        if missing:
            raise ValueError(f"row {i} provenance lacks {missing[0]!r}")
        if row["run"] not in run_ids:
            raise ValueError(f"row {i} names run {row['run']} that is not in runs")
