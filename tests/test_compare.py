"""The miniature Table 2 (`switch-dit compare`): a tiny budget end to end, the table, the config."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from switch_dit.compare import CompareConfig, format_table, noise_verdicts, summarize

pytest.importorskip("sklearn")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_compare_command_tiny_budget(tmp_path, capsys):
    from switch_dit.cli import main

    argv = [
        "compare",
        "--hidden-size",
        "32",
        "--depth",
        "2",
        "--num-heads",
        "2",
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--seeds",
        "0,1",
        "--samples-per-class",
        "1",
        "--sample-steps",
        "2",
        "--eval-every",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "budget: 4 steps x batch 8 per model" in printed and "seeds 0, 1" in printed
    assert "ddim 2 steps, guidance 4.0" in printed  # the demo's sampler by default
    table = printed[printed.index("Model") :].splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["DiT", "DTR", "Switch-DiT"]
    assert "±" in table[2]  # two seeds: mean ± std
    assert "At equal wall time" in printed
    assert sum(" standard errors), " in line for line in printed.splitlines()) == 6  # 3 pairs x 2 metrics
    record = json.loads((tmp_path / "compare.json").read_text())
    rows = record["rows"]
    assert [(r["model"], r["seed"]) for r in rows] == [(f, s) for f in ("DiT", "DTR", "Switch-DiT") for s in (0, 1)]
    by = {r["model"]: r for r in rows if r["seed"] == 0}
    # Same trunk: DiT and DTR have the same parameters; Switch-DiT adds M experts per block, k active.
    assert (
        by["DiT"]["params"] == by["DTR"]["params"] < by["Switch-DiT"]["activated_params"] < by["Switch-DiT"]["params"]
    )
    assert by["DiT"]["gflops"] < by["Switch-DiT"]["gflops"]
    for r in rows:
        assert 0.0 <= r["sample_accuracy"] <= 1.0 and r["frechet_distance"] > 0 and math.isfinite(r["final_mse"])
        run = tmp_path / f"{r['model']}-seed{r['seed']}"
        assert (run / "checkpoint.pt").is_file()
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt-00000004.pt"]  # the others pruned
        assert r["equal_time"]["step"] in (0, 2, 4) and 0 < r["step_seconds"] < r["train_seconds"]
    # The budget is set by the family with the least seconds per step (its quickest log windows,
    # not its total time, which on a shared machine measures the load); that family is scored at its end.
    pace = {
        f: statistics.fmean(r["step_seconds"] for r in rows if r["model"] == f) for f in ("DiT", "DTR", "Switch-DiT")
    }
    budget = record["equal_time_budget"]
    assert budget["model"] == min(pace, key=pace.get) and budget["seconds"] == pytest.approx(4 * min(pace.values()))
    assert {s["model"]: s["step"] for s in record["equal_time_summary"]}[budget["model"]] == 4
    assert all(r["equal_time"]["seconds"] <= budget["seconds"] * (1 + 1e-9) for r in rows)
    assert record["config"]["seeds"] == [0, 1] and record["config"]["steps"] == 4


def _row(model, seed, acc, fd, seconds=1.0):
    return {
        "model": model,
        "seed": seed,
        "params": 1000,
        "activated_params": 900,
        "gflops": 0.001,
        "train_seconds": seconds,
        "final_mse": 0.1,
        "sample_accuracy": acc,
        "frechet_distance": fd,
        "real_frechet_distance": 0.13,
        "classifier_test_accuracy": 0.98,
    }


def test_summarize_and_table_from_rows():
    rows = [_row("DiT", 0, 0.5, 3.0), _row("DiT", 1, 0.7, 5.0), _row("Switch-DiT", 0, 0.9, 1.0)]
    summary = summarize(rows)
    assert [s["model"] for s in summary] == ["DiT", "Switch-DiT"]
    assert summary[0]["sample_accuracy"] == pytest.approx(0.6) and summary[0]["frechet_distance"] == pytest.approx(4.0)
    assert summary[0]["frechet_distance_std"] == pytest.approx(math.sqrt(2.0)) and summary[0]["seeds"] == [0, 1]
    assert math.isnan(summary[1]["sample_accuracy_std"]) and summary[1]["n"] == 1
    text = format_table(rows, CompareConfig(seeds=(0, 1)))
    assert "0.600 ± 0.141" in text and "0.900" in text and "real training digits: 0.130" in text
    assert "DiT vs Switch-DiT, accuracy: one seed, no spread to compare with" in text
    assert "At equal wall time" not in text  # rows without equal-time scores


def test_noise_verdicts_separate_only_beyond_the_seed_spread():
    # Accuracy: 0.60 ± 0.0141 against 0.90 ± 0.0141 over 2 seeds: 0.3 / sqrt(2 * 0.0002 / 2) = 21.2 standard errors.
    # FD: 3 ± 1.41 against 2.5 ± 0.71: 0.5 / sqrt((2 + 0.5) / 2) = 0.45 standard errors.
    rows = [
        _row("DiT", 0, 0.59, 2.0),
        _row("DiT", 1, 0.61, 4.0),
        _row("Switch-DiT", 0, 0.89, 2.0),
        _row("Switch-DiT", 1, 0.91, 3.0),
    ]
    lines = noise_verdicts(summarize(rows))
    assert lines == [
        "DiT vs Switch-DiT, accuracy: -0.300 (21.2 standard errors), beyond the seed spread: Switch-DiT better",
        "DiT vs Switch-DiT, FD: +0.500 (0.4 standard errors), within noise",
    ]
    # Lower FD is better: the family with the smaller distance wins.
    rows = [_row("A", 0, 0.5, 1.0), _row("A", 1, 0.5, 1.1), _row("B", 0, 0.5, 2.0), _row("B", 1, 0.5, 2.1)]
    assert noise_verdicts(summarize(rows))[1].endswith("beyond the seed spread: A better")
    assert noise_verdicts(summarize(rows))[0].endswith("within noise")  # equal accuracy, no spread: 0 / 0


def test_families_are_pluggable(monkeypatch):
    from switch_dit import compare

    monkeypatch.setattr(compare, "FAMILIES", dict(compare.FAMILIES))
    family = compare.register_family("Wide-DiT", model="DiT", train={"lambda_dp": 0.0}, sample={"cfg_scale": 2.0})
    cfg = CompareConfig(families=("DiT", "Wide-DiT"))
    train_cfg = compare._train_config(cfg, family, 3, Path("unused"))
    assert train_cfg.model == "DiT-S/4" and train_cfg.lambda_dp == 0.0 and train_cfg.seed == 3
    assert train_cfg.compile == "none" and train_cfg.ckpt_every == cfg.eval_every


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"size": "M/2"}, "size"),
        ({"seeds": ()}, "seeds"),
        ({"seeds": (1, 1)}, "distinct"),
        ({"families": ("DiT", "U-Net")}, "families"),
        ({"eval_every": 0}, "eval_every"),
        ({"steps": 0}, "steps"),
    ],
)
def test_compare_config_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        CompareConfig(**kwargs)


def test_compare_command_bad_arguments(capsys):
    from switch_dit.cli import main

    for argv, needle in (
        (["compare", "--seeds", "x"], "--seeds: must be comma-separated integers"),
        (["compare", "--families", "DiT,GAN"], "--families: must be comma-separated names"),
        (["compare", "--size", "Q/2"], "size must be a named size"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_step_seconds_is_the_pace_of_the_quickest_windows():
    from switch_dit.compare import _step_seconds

    # Eight windows at 10 steps/s, two slowed down by other jobs (1 step/s) and one missing (NaN).
    rates = [10.0] * 8 + [1.0, 1.0, math.nan]
    assert _step_seconds(rates) == pytest.approx(0.1)
    assert _step_seconds([4.0]) == pytest.approx(0.25)
    assert math.isnan(_step_seconds([math.nan]))
