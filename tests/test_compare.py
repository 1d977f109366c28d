"""The miniature Table 2 (`switch-dit compare`): a tiny budget end to end, the table, the config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from switch_dit.compare import CompareConfig, format_table, summarize

pytest.importorskip("sklearn")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_compare_command_tiny_budget(tmp_path, capsys):
    from switch_dit.cli import main

    argv = ["compare", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--steps", "3", "--batch-size", "8",
            "--seeds", "0,1", "--samples-per-class", "1", "--sample-steps", "2", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "budget: 3 steps x batch 8 per model" in printed and "seeds 0, 1" in printed
    table = printed[printed.index("Model"):].splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["DiT", "DTR", "Switch-DiT"]
    assert "±" in table[2]  # two seeds: mean ± std
    record = json.loads((tmp_path / "compare.json").read_text())
    rows = record["rows"]
    assert [(r["model"], r["seed"]) for r in rows] == [(f, s) for f in ("DiT", "DTR", "Switch-DiT") for s in (0, 1)]
    by = {r["model"]: r for r in rows if r["seed"] == 0}
    # Same trunk: DiT and DTR have the same parameters; Switch-DiT adds M experts per block, k active.
    assert by["DiT"]["params"] == by["DTR"]["params"] < by["Switch-DiT"]["activated_params"] < by["Switch-DiT"]["params"]
    assert by["DiT"]["gflops"] < by["Switch-DiT"]["gflops"]
    for r in rows:
        assert 0.0 <= r["sample_accuracy"] <= 1.0 and r["frechet_distance"] > 0 and math.isfinite(r["final_mse"])
        assert (tmp_path / f"{r['model']}-seed{r['seed']}" / "checkpoint.pt").is_file()
    assert record["config"]["seeds"] == [0, 1] and record["config"]["steps"] == 3


def test_summarize_and_table_from_rows():
    def row(model, seed, acc, fd):
        return {"model": model, "seed": seed, "params": 1000, "activated_params": 900, "gflops": 0.001,
                "train_seconds": 1.0, "final_mse": 0.1, "sample_accuracy": acc, "frechet_distance": fd,
                "real_frechet_distance": 0.13, "classifier_test_accuracy": 0.98}

    rows = [row("DiT", 0, 0.5, 3.0), row("DiT", 1, 0.7, 5.0), row("Switch-DiT", 0, 0.9, 1.0)]
    summary = summarize(rows)
    assert [s["model"] for s in summary] == ["DiT", "Switch-DiT"]
    assert summary[0]["sample_accuracy"] == pytest.approx(0.6) and summary[0]["frechet_distance"] == pytest.approx(4.0)
    assert summary[0]["frechet_distance_std"] == pytest.approx(math.sqrt(2.0)) and summary[0]["seeds"] == [0, 1]
    assert math.isnan(summary[1]["sample_accuracy_std"])
    text = format_table(rows, CompareConfig(seeds=(0, 1)))
    assert "0.600 ± 0.141" in text and "0.900" in text and "real training digits: 0.130" in text


@pytest.mark.parametrize("kwargs, needle", [
    ({"size": "M/2"}, "size"),
    ({"seeds": ()}, "seeds"),
    ({"seeds": (1, 1)}, "distinct"),
    ({"families": ("DiT", "U-Net")}, "families"),
    ({"steps": 0}, "steps"),
])
def test_compare_config_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        CompareConfig(**kwargs)


def test_compare_command_bad_arguments(capsys):
    from switch_dit.cli import main

    for argv, needle in ((["compare", "--seeds", "x"], "--seeds: must be comma-separated integers"),
                         (["compare", "--families", "DiT,GAN"], "--families: must be comma-separated names"),
                         (["compare", "--size", "Q/2"], "size must be a named size")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and needle in capsys.readouterr().err
