"""Training config: recipes, files, command-line layering, resume rules and clear errors."""

from __future__ import annotations

import argparse
import json

import pytest

from switch_dit.config import (
    DIGITS_PRESET,
    PAPER_RECIPE,
    TrainConfig,
    add_train_arguments,
    config_from_args,
    load_config_file,
    resolve,
    resume_config,
)


def parse(*argv):
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p.parse_args(list(argv))


def test_digits_is_the_default_and_latents_get_the_paper_recipe():
    demo = TrainConfig()
    assert demo.data == "digits" and all(getattr(demo, k) == v for k, v in DIGITS_PRESET.items())
    paper = TrainConfig(data="latents/imagenet256")
    assert all(getattr(paper, k) == v for k, v in PAPER_RECIPE.items())
    # The paper's recipe (section 5.1).
    assert (
        paper.lr,
        paper.weight_decay,
        paper.batch_size,
        paper.ema_decay,
        paper.lambda_dp,
        paper.flip,
        paper.noise_schedule,
        paper.steps,
    ) == (1e-4, 0.0, 256, 0.9999, 1.0, True, "cosine", 400_000)
    # Explicit values win over the recipe; None means "the recipe's".
    assert TrainConfig(data="x", lr=3e-4, model=None).lr == 3e-4
    assert TrainConfig(data="x", model=None).model == PAPER_RECIPE["model"]


def test_yaml_and_json_files_and_flags_layer(tmp_path):
    pytest.importorskip("yaml")
    y = tmp_path / "run.yaml"
    # PyYAML reads 1e-4 as a string (YAML 1.1): it must still become a float.
    y.write_text("data: /data/latents\nlr: 1e-4\nsteps: '1000'\nflip: false\nmodel: Switch-DiT-B/2\n")
    cfg = config_from_args(parse("--config", str(y), "--steps", "50", "--grad-clip", "1"))
    assert cfg.data == "/data/latents" and cfg.lr == 1e-4 and cfg.flip is False and cfg.model == "Switch-DiT-B/2"
    assert cfg.steps == 50 and cfg.grad_clip == 1.0  # the flag beats the file
    assert cfg.batch_size == 256  # the paper's recipe for what neither sets
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"lr": 5e-4, "precision": "fp16"}))
    cfg = config_from_args(parse("--config", str(j), "--no-sample"))
    assert cfg.data == "digits" and cfg.lr == 5e-4 and cfg.precision == "fp16" and cfg.sample is False
    assert cfg.hidden_size == DIGITS_PRESET["hidden_size"]


def test_only_given_flags_override():
    args = parse("--lr", "0.01")
    assert not hasattr(args, "steps")
    assert resolve({}, {"lr": 0.01}).steps == DIGITS_PRESET["steps"]


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"lr": -1.0}, "lr must be a positive finite number"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
        ({"ema_decay": 1.0}, "ema_decay must be a number in [0, 1)"),
        ({"precision": "fp8"}, "precision must be 'fp32' or 'bf16' or 'fp16'"),
        ({"parallel": "zero3"}, "parallel must be 'ddp' or 'fsdp'"),
        ({"model": "Switch-DiT-M/2"}, "model must be one of"),
        ({"top_k": 4}, "top_k (4) must not exceed num_experts (3)"),
        ({"grad_clip": -1.0}, "grad_clip must be a finite number >= 0"),
        ({"flip": "yes please"}, "flip must be true or false"),
        ({"data": "x", "sample": True}, "sample must be false for latents data"),
        ({"data": "x", "image_size": 100}, "image_size must be a multiple of 8"),
        ({"precision": "fp16", "parallel": "fsdp"}, "'fp16' is not supported with parallel 'fsdp'"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer"),
    ],
)
def test_bad_values_name_the_field(values, needle):
    with pytest.raises(ValueError) as e:
        TrainConfig(**values)
    assert needle in str(e.value)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{lr: }")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config_file(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"learning_rate": 1e-4}))
    with pytest.raises(ValueError, match="unknown field.*'learning_rate'"):
        load_config_file(unknown)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"lr": "fast"}))
    with pytest.raises(ValueError, match="lr must be a number, got 'fast'"):
        load_config_file(wrong)
    listy = tmp_path / "list.json"
    listy.write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping"):
        load_config_file(listy)
    txt = tmp_path / "run.txt"
    txt.write_text("lr: 1")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        load_config_file(txt)


def test_resume_allows_run_steering_fields_only():
    saved = TrainConfig(steps=100).to_dict()
    assert resume_config(saved, overrides={"steps": 200, "log_every": 5}).steps == 200
    assert resume_config(saved, overrides={"lr": saved["lr"]}).lr == saved["lr"]  # unchanged is fine
    with pytest.raises(ValueError, match="lr cannot change when resuming"):
        resume_config(saved, overrides={"lr": 1.0})
    with pytest.raises(ValueError, match="unknown field"):
        resume_config({**saved, "mystery": 1})


def test_cli_flag_errors_are_argparse_errors(capsys):
    for argv, needle in (
        (["--steps", "0"], "--steps: must be a positive integer"),
        (["--precision", "fp8"], "--precision: invalid choice"),
        (["--model", "X"], "--model: unknown model"),
    ):
        with pytest.raises(SystemExit):
            parse(*argv)
        assert needle in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--top-k \(4\) must not exceed --num-experts \(3\)"):
        config_from_args(parse("--top-k", "4"))


def test_the_shipped_paper_config_is_the_recipe():
    pytest.importorskip("yaml")
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "imagenet256-switch-dit-xl2.yaml"
    cfg = resolve(load_config_file(path))
    recipe = TrainConfig(data=cfg.data, out=cfg.out)
    assert cfg == recipe


def test_backend_names_are_the_dispatchs_model_wide_strategies():
    """config.BACKENDS (kept torch-free for the CLI) lists every strategy name the ops register,
    except "emulated" (a test tool that auto never takes), so --backend cannot drift from the ops."""
    import switch_dit.ops  # noqa: F401  registers every op's strategies
    from switch_dit.config import BACKENDS
    from switch_dit.ops import dispatch

    assert set(BACKENDS) == dispatch._all_names() - {"emulated"}
    for name in BACKENDS:
        dispatch.check_backend(name)  # every listed name is accepted by the models
