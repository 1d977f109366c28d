"""The benchmark harness (benchmarks/): CPU smoke run end to end, results schema, report,
FLOP counter and the official-algorithm baseline. Speed itself is measured on a GPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import benchmarks
from benchmarks import cli, env, flops, gpu, report
from benchmarks.adapters import Unavailable
from benchmarks.official import official_expert_mask
from benchmarks.results import Results, load, make_row, result_files, row_key, validate
from benchmarks.runner import UNFINISHED, Case, Context, run_cases
from benchmarks.timing import Timer

KEPT = Path(benchmarks.__file__).parent / "results"


def _snapshot(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*")} if folder.exists() else {}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One in-process smoke run shared by the tests below: (out folder, data, seconds)."""
    out = tmp_path_factory.mktemp("bench")
    before = _snapshot(KEPT)
    t0 = time.perf_counter()
    assert cli.main(["--smoke", "--out", str(out)]) == 0
    seconds = time.perf_counter() - t0
    assert _snapshot(KEPT) == before, "the smoke run must not write into benchmarks/results"
    files = result_files(out)
    assert len(files) == 1
    return out, load(files[0]), seconds


def test_smoke_results_follow_the_schema(smoke):
    out, data, seconds = smoke
    validate(data)
    assert data["device"]["kind"] == "cpu"
    run = data["runs"][-1]
    assert run["mode"] == "smoke" and "--smoke" in run["command"]
    assert run["versions"]["torch"] == torch.__version__
    assert set(run["git"]) == {"commit", "dirty", "source_digest"}
    assert len(run["git"]["source_digest"]) == 16  # (what changes it: test_dirty_tree_counts_untracked_sources)
    rows = data["rows"]
    assert {r["suite"] for r in rows} == {"ops", "block", "step"}
    benches = {r["bench"] for r in rows}
    assert {
        "routed_linear",
        "mask_ln_modulate",
        "gated_residual_ln_modulate",
        "routing_plan",
        "expert_mlp",
        "Switch-DiT block",
        "DiT block",
        "train_step",
    } <= benches
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd", "step"}
    assert {r["dtype"] for r in rows if r["suite"] == "step"} == {"bf16-autocast", "fp16-autocast+scaler"}
    # Every row ran: the fast path (every strategy, auto) as well as the harness's own variants.
    failed = [(r["bench"], r["variant"], r["mode"], r["reason"]) for r in rows if r["status"] != "ok"]
    assert not failed, failed
    assert {r["extra"]["role"] for r in rows} == {"strategy", "auto", "baseline", "floor"}
    assert all(r["provenance"]["torch"] == torch.__version__ for r in rows)
    # Every routed-linear baseline of the issue is in the same run.
    variants = {r["variant"] for r in rows if r["bench"] == "routed_linear"}
    assert {"auto", "reference", "reference+compile", "official", "dense_linear"} <= variants
    # ... and every strategy the op registers (the sweep lists what switch_dit.ops.strategies returns)
    from benchmarks import adapters
    from switch_dit import ops

    assert set(ops.strategies("expert_mask")) - {"auto", "triton"} <= variants
    norm_variants = {r["variant"] for r in rows if r["bench"] == "mask_ln_modulate"}
    assert set(adapters.strategies("mask_ln_modulate")) <= norm_variants
    # DiffMoE's expert MLP: every strategy, auto, the compiled twin and the dense-MLP floor, each
    # in every mode, at capacity 1 (E * C = S rows: the dense MLP's activated work)
    moe = [r for r in rows if r["bench"] == "expert_mlp"]
    moe_variants = set(adapters.strategies("expert_mlp")) | {"auto", "reference+compile", "dense_mlp"}
    assert {(r["variant"], r["mode"]) for r in moe} == {(v, m) for v in moe_variants for m in ("fwd", "bwd", "fwd+bwd")}
    assert {r["extra"]["role"] for r in moe if r["variant"] == "dense_mlp"} == {"floor"}
    for sh in (r["shape"] for r in moe):
        assert sh["S"] == sh["B"] * sh["L"] == sh["E"] * sh["C"] and sh["H"] == 4 * sh["D"] and sh["E"] == 16
    # The reference code's model after switch_dit.accelerate has its step row.
    assert any(r["variant"] == "patched" and r["status"] == "ok" for r in rows if r["bench"] == "train_step")


def test_smoke_rows_carry_timings_and_derived_figures(smoke):
    _, data, _ = smoke
    for r in data["rows"]:
        if r["status"] != "ok":
            assert r["reason"]
            continue
        ms = r["ms"]
        assert 0 < ms["p20"] <= ms["median"] <= ms["p80"]
        assert r["floor_ms"] > 0 and r["over_floor"] > 0
        assert r["work"]["bytes"] > 0
        if r["suite"] != "ops" or r["bench"] != "routing_plan":
            assert r["work"]["flops"] > 0 and r["tflops"] > 0
        if r["suite"] == "step":
            assert r["extra"]["mfu_datasheet"] is None  # a CPU has no datasheet entry: nothing is claimed
            assert r["extra"]["first_step_s"] >= 0


def test_smoke_results_have_every_field_make_gpu_needs(smoke):
    """The JSON carries every field that the report, the targets and make gpu's summary read,
    and the check itself notices a missing one."""
    _, data, _ = smoke
    assert gpu.missing_fields(data) == []
    broken = json.loads(json.dumps(data))
    del broken["rows"][0]["provenance"]["commit"]
    step = next(r for r in broken["rows"] if r["suite"] == "step" and r["status"] == "ok")
    del step["extra"]["mfu_measured_peak"]
    broken["rows"] = [r for r in broken["rows"] if r["variant"] not in ("dense_linear", "dense_mlp")]
    missing = gpu.missing_fields(broken)
    assert any(m.endswith("provenance.commit") for m in missing)
    assert any(m.endswith("extra.mfu_measured_peak") for m in missing)
    assert "a ops/routed_linear/dense_linear row" in missing
    assert "a ops/expert_mlp/dense_mlp row" in missing
    summary = gpu.summary(data, gpu.phases(), dry=True, wall_s=1.0, json_name="x.json")
    for heading in ("## Phases", "## Targets", "## Measured against the analytic model", "## What to do"):
        assert heading in summary


def test_make_gpu_fits_its_budgets_and_file_limit():
    """Phase budgets fit the 8 minutes (GPU) and 5 minutes (dry run); at most 8 files come back."""
    assert sum(p.budget_s for p in gpu.phases()) <= gpu.WALL_BUDGET_S - 20
    # the dry build only checks the extension that `make test` built (seconds; its budget allows a
    # build from scratch)
    assert sum(p.dry_budget_s for p in gpu.phases() if p.name != "build") + 20 <= gpu.DRY_WALL_BUDGET_S
    assert len(gpu.FILES) + 1 <= 8  # + the results JSON
    assert [p.name for p in gpu.phases()] == ["build", "tests", "ops", "block", "step"]


def test_a_phase_is_stopped_at_its_budget(tmp_path):
    import io
    import sys

    log = io.StringIO()
    t0 = time.monotonic()
    rc, took = gpu.run_command(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2.0, log
    )
    assert rc is None and took < 20 and time.monotonic() - t0 < 20
    assert "started" in log.getvalue()
    rc, _ = gpu.run_command([sys.executable, "-c", "raise SystemExit(3)"], 30.0, log)
    assert rc == 3


def test_smoke_report_table_chart_and_section(smoke):
    out, data, _ = smoke
    table = (out / report.TABLE).read_text()
    for heading in ("# Benchmark results", "### Ops", "### Blocks", "### Training step"):
        assert heading in table
    assert data["device"]["name"] in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed: no chart")
    assert (out / report.CHART).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = report.performance_section(out)
    assert section.startswith("## Performance") and "smoke" in section
    # Regenerating from the kept file alone gives the same table.
    assert report.regenerate(out)[0].read_text() == table


def _gpu_results(tmp_path: Path) -> Path:
    """A hand-made GPU results file with known times, to check the report's arithmetic."""
    peaks = env.peaks_record(env.Peaks({"bf16": 790e12, "fp16": 790e12, "fp32": 50e12}, 3.0e12, "measured"))
    res = Results(
        tmp_path / "nvidia-h100-80gb-hbm3-2026-01-01.json",
        {"name": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3", "kind": "cuda"},
        peaks,
        env.peaks_record(env.datasheet_for("NVIDIA H100 80GB HBM3")),
    )
    run = res.start_run(
        {
            "command": "python -m benchmarks",
            "mode": "full",
            "started": "t",
            "timer": "do_bench",
            "git": {"commit": "abc", "dirty": False},
            "versions": {"torch": "x"},
        }
    )

    def add(suite, bench, variant, mode, shape, dtype, median, **extra):
        res.add(
            make_row(
                suite=suite,
                bench=bench,
                variant=variant,
                mode=mode,
                shape=shape,
                dtype=dtype,
                ms={"median": median, "p20": median * 0.99, "p80": median * 1.01},
                work={"flops": 1e12, "bytes": 1e9},
                peaks=peaks,
                run=run,
                extra=extra,
            )
        )

    op = {"B": 32, "L": 256, "D": 1152, "M": 3, "k": 2}
    for variant, ms in (("fast", 1.1), ("dense_linear", 1.0), ("reference", 5.5), ("official", 11.0)):
        add("ops", "routed_linear", variant, "fwd+bwd", op, "bf16", ms)
    moe = {"B": 32, "L": 256, "D": 1152, "S": 8192, "E": 16, "H": 4608, "C": 512}
    # the target takes the best fast-path row (bmm here), not the reference strategy
    for variant, role, ms in (("bmm", "strategy", 1.2), ("fused", "strategy", 1.5), ("reference", "strategy", 0.9)):
        add("ops", "expert_mlp", variant, "fwd+bwd", moe, "bf16", ms, role=role)
    add("ops", "expert_mlp", "dense_mlp", "fwd+bwd", moe, "bf16", 1.0, role="floor")
    for fam, variant, ms in (
        ("Switch-DiT", "fast", 8.0),
        ("Switch-DiT", "reference", 16.0),
        ("DiT", "reference", 10.0),
    ):
        add(
            "block",
            f"{fam} block",
            variant,
            "fwd+bwd",
            {"model": f"{fam}-XL/2", "depth": 1, "B": 32},
            "bf16-autocast",
            ms,
        )
    step = {"depth": 28, "B": 32}
    add(
        "step",
        "train_step",
        "fast+compile",
        "step",
        {"model": "Switch-DiT-XL/2", **step},
        "bf16-autocast",
        40.0,
        mfu_datasheet=0.6,
    )
    add(
        "step",
        "train_step",
        "reference+compile",
        "step",
        {"model": "Switch-DiT-XL/2", **step},
        "bf16-autocast",
        60.0,
        mfu_datasheet=0.4,
    )
    # eager reference slower than compiled: the target takes the best reference variant
    add("step", "train_step", "reference", "step", {"model": "Switch-DiT-XL/2", **step}, "bf16-autocast", 90.0)
    res.add(
        make_row(
            suite="step",
            bench="train_step",
            variant="fast",
            mode="step",
            shape={"model": "Switch-DiT-XL/2", **step},
            dtype="bf16-autocast",
            status="skipped",
            reason="time limit reached",
            peaks=peaks,
            run=run,
        )
    )
    return tmp_path


def test_report_targets_from_known_numbers(tmp_path):
    folder = _gpu_results(tmp_path)
    section = report.performance_section(folder)
    assert "NVIDIA H100" in section and "smoke" not in section
    assert "D=1152: 1.10x | <= 1.25x | pass" in section  # fast / dense
    assert "D=1152: 5.00x | >= 4.0x | pass" in section  # reference / fast
    assert "D=1152: 10.00x" in section  # official / fast
    assert "D=1152: 1.20x | <= 1.3x | pass" in section  # best fast expert MLP (bmm) / dense MLP
    assert "XL/2: 0.80x | < 1.0x | pass" in section  # fast Switch block / reference DiT block
    assert "XL/2: 2.00x | >= 1.5x | pass" in section  # reference Switch block / fast
    assert "vs reference+compile: 1.50x | >= 1.3x | pass" in section  # best reference (compiled) / fast
    assert "fast: 60.0% | >= 55% | pass" in section
    assert "| not measured |" in section  # S/2 has no rows
    by_what = {t["what"]: t for t in report.targets(load(result_files(folder)[0])["rows"])}
    assert all(t["passed"] is not False for t in by_what.values())
    table = report.markdown(folder)
    assert "### Skipped and failed" in table and "time limit reached" in table


def test_a_target_fails_when_a_shape_misses_it(tmp_path):
    folder = _gpu_results(tmp_path)
    path = result_files(folder)[0]
    data = load(path)
    res = Results(path, data["device"], data["peaks"], data["datasheet"])
    for variant, ms in (("fast", 2.0), ("dense_linear", 1.0)):  # the fast op at twice the dense time
        res.add(
            make_row(
                suite="ops",
                bench="routed_linear",
                variant=variant,
                mode="fwd+bwd",
                shape={"B": 32, "L": 256, "D": 384, "M": 3, "k": 2},
                dtype="bf16",
                ms={"median": ms, "p20": ms, "p80": ms},
                run=1,
            )
        )
    dense = next(t for t in report.targets(load(path)["rows"]) if "dense D×D" in t["what"])
    assert dense["values"] == [2.0, 1.1] and dense["passed"] is False
    assert "**FAIL**" in report.performance_section(folder)


def test_rows_of_two_commits_are_marked(tmp_path):
    folder = _gpu_results(tmp_path)
    path = result_files(folder)[0]
    data = load(path)
    res = Results(path, data["device"], data["peaks"], data["datasheet"])
    run = res.start_run(
        {
            "command": "again",
            "mode": "gpu",
            "started": "t",
            "timer": "do_bench",
            "git": {"commit": "def", "dirty": False},
            "versions": {"torch": "x"},
        }
    )
    res.add(
        make_row(
            suite="ops",
            bench="routed_linear",
            variant="reference",
            mode="fwd",
            shape={"B": 32, "L": 256, "D": 1152, "M": 3, "k": 2},
            dtype="bf16",
            ms={"median": 1.0, "p20": 1.0, "p80": 1.0},
            run=run,
            provenance={"commit": "def", "source_digest": "d2"},
        )
    )
    assert "This file mixes rows of 2 sources" in report.markdown(folder)
    assert "**rows of" in report.performance_section(folder)


def test_readme_section_is_written_between_markers(tmp_path):
    folder = _gpu_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.README_START}\nold\n{report.README_END}\n\nafter\n")
    assert report.update_readme(readme, folder)
    text = readme.read_text()
    assert "old" not in text and "## Performance" in text and text.endswith("after\n")
    assert report.update_readme(readme, folder) and readme.read_text() == text  # idempotent
    plain = tmp_path / "plain.md"
    plain.write_text("# no markers\n")
    assert not report.update_readme(plain, folder)


def test_resume_continues_a_kept_file(smoke, tmp_path, monkeypatch):
    """--resume seeds the output folder from benchmarks/results (how a lent machine, which
    returns only $OUT, continues a file) and reruns only the rows that are not ok."""
    out, data, _ = smoke
    kept = tmp_path / "kept"
    kept.mkdir()
    name = result_files(out)[0].name
    (kept / name).write_text((out / name).read_text())
    monkeypatch.setattr(cli, "RESULTS_DIR", kept)
    new_out = tmp_path / "out"
    assert cli.main(["--smoke", "--resume", "--out", str(new_out), "--no-report"]) == 0
    resumed = load(new_out / name)
    assert len(resumed["runs"]) == len(data["runs"]) + 1
    assert resumed["runs"][-1]["counts"]["resumed"] == sum(r["status"] == "ok" for r in data["rows"])
    assert len(resumed["rows"]) == len(data["rows"])


def test_results_merge_resume_and_failures(tmp_path):
    """A second run on the same file keeps the first run's rows, replaces rows with the same
    key, and --resume skips what is already ok; failures become rows, never crashes."""
    info = {"name": "CPU test", "slug": "cpu-test", "kind": "cpu"}
    peaks = env.peaks_record(env.Peaks({"bf16": 1e12, "fp16": 1e12, "fp32": 1e12}, 50e9, "test"))
    path = tmp_path / "cpu-test-2026-01-01.json"
    calls = []

    def case(variant, build):
        return Case(
            "ops", "toy", variant, {"n": 4}, "fp32", ("fwd", "bwd"), build, lambda mode: {"flops": 8.0, "bytes": 64.0}
        )

    def ok_build():
        calls.append(1)
        return lambda mode: lambda: torch.ones(4).sum()

    def unavailable():
        raise Unavailable("not landed")

    def broken():
        raise RuntimeError("boom")

    def make_ctx(resume, deadline=float("inf")):
        res = Results(path, info, peaks)
        run = res.start_run(
            {"command": "t", "mode": "smoke", "started": "t", "timer": "perf_counter", "git": {}, "versions": {}}
        )
        return Context(
            device=torch.device("cpu"),
            timer=Timer(torch.device("cpu"), cpu_iters=2),
            results=res,
            run_id=run,
            peaks=peaks,
            resume=resume,
            deadline=deadline,
            log=lambda s: None,
        )

    ctx = make_ctx(resume=False)
    run_cases(ctx, [case("a", ok_build), case("b", unavailable), case("c", broken)])
    assert ctx.counts == {"ok": 2, "skipped": 2, "error": 2, "resumed": 0}
    data = load(path)
    by_variant = {(r["variant"], r["mode"]): r for r in data["rows"]}
    assert by_variant[("b", "fwd")]["reason"] == "not landed"
    assert "RuntimeError: boom" in by_variant[("c", "bwd")]["reason"]

    ctx = make_ctx(resume=True)
    run_cases(ctx, [case("a", ok_build), case("b", ok_build)])
    assert len(calls) == 2  # "a" was resumed, "b" ran again
    assert ctx.counts["resumed"] == 2
    data = load(path)
    assert len(data["runs"]) == 2 and len(data["rows"]) == 6
    assert {r["status"] for r in data["rows"] if r["variant"] == "b"} == {"ok"}
    assert len({row_key(r) for r in data["rows"]}) == 6

    ctx = make_ctx(resume=False, deadline=time.monotonic() - 1)
    run_cases(ctx, [case("d", ok_build)])
    assert len(calls) == 2
    assert all(r["reason"].startswith("time limit") for r in load(path)["rows"] if r["variant"] == "d")

    # A case killed while it runs (here: an exception no handler catches) leaves its rows
    # as "did not finish"; --resume does not lose another call to it.
    def killed():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cases(make_ctx(resume=False), [case("e", killed)])
    rows = [r for r in load(path)["rows"] if r["variant"] == "e"]
    assert len(rows) == 2 and all(r["status"] == "error" and r["reason"] == UNFINISHED for r in rows)
    ctx = make_ctx(resume=True)
    run_cases(ctx, [case("e", ok_build)])
    assert len(calls) == 2
    rows = [r for r in load(path)["rows"] if r["variant"] == "e"]
    assert all(r["status"] == "skipped" and r["reason"].startswith(UNFINISHED + " in an earlier run") for r in rows)


def test_validate_names_the_broken_field(smoke):
    _, data, _ = smoke
    bad = json.loads(json.dumps(data))
    del bad["rows"][0]["ms"]
    with pytest.raises(ValueError, match="'ms'"):
        validate(bad)
    bad = json.loads(json.dumps(data))
    bad["rows"][0]["status"] = "fine"
    with pytest.raises(ValueError, match="status"):
        validate(bad)


@pytest.mark.parametrize("name, gmacs", [("DiT-S/2", 6.06), ("DiT-B/2", 23.01), ("DiT-XL/2", 118.64)])
def test_flop_counter_matches_the_papers_dit_gflops(name, gmacs):
    # The DiT / Switch-DiT papers' "GFLOPs" are multiply-adds (Table 2).
    macs = sum(flops.model_macs(flops.ModelConfig.from_name(name)).values())
    assert macs / 1e9 == pytest.approx(gmacs, rel=2e-3)


def test_model_flops_count_one_expert_gemm_and_the_gate_table_once():
    """Model FLOPs: one D x D expert GEMM per SMoE layer whatever k is (identity (a)); the gate
    table once per step, so it does not grow with the batch."""
    dit = flops.ModelConfig.from_name("DiT-XL/2")
    extra = {
        k: sum(flops.model_macs(flops.ModelConfig.from_name("Switch-DiT-XL/2", top_k=k)).values())
        - sum(flops.model_macs(dit).values())
        for k in (1, 2, 3)
    }
    assert extra[1] == extra[2] == extra[3] == 28 * 256 * 1152 * 1152
    switch = flops.ModelConfig.from_name("Switch-DiT-XL/2")
    table = flops.train_step_flops(switch, 64) - 2 * flops.train_step_flops(switch, 32)
    assert table < 0 and flops.train_step_flops(dit, 64) == 2 * flops.train_step_flops(dit, 32)


@pytest.mark.parametrize("name", ["DiT-S/2", "DTR-S/4", "Switch-DiT-S/2"])
def test_parameter_count_matches_the_model(name):
    from switch_dit import models

    model = models.create(name, hidden_size=64, num_heads=2, depth=2)
    cfg = flops.ModelConfig.from_model(model)
    assert flops.param_count(cfg) == models.count_params(model)["total"]


def test_expert_mlp_work_is_the_dense_mlps_at_capacity_one():
    """E experts taking C = S / E tokens each run S rows: the dense MLP's two GEMMs, backward twice."""
    S, D, H, E = 256, 32, 128, 16
    fwd = flops.expert_mlp_work(S, D, H, E, S // E, 2, "fwd")
    assert fwd["flops"] == 2 * (2 * S * D * H)
    assert fwd["bytes"] == 2 * (2 * S * D + E * (2 * D * H + H + D))  # x in, y out, every expert's weights
    assert flops.expert_mlp_work(S, D, H, E, S // E, 2, "fwd+bwd")["flops"] == 3 * fwd["flops"]


def test_official_algorithm_equals_the_reference_router():
    """The re-implemented official SMoE layer computes the model's m, gradients included,
    also when an expert receives no sample."""
    from switch_dit.ops import expert_mask

    torch.manual_seed(0)
    B, L, D, M, k = 5, 7, 12, 4, 2
    w = torch.randn(M, D, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(M, D, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 2], [2, 0], [0, 1], [1, 2], [2, 1]])  # expert 3 gets nothing
    g = torch.rand(B, k, dtype=torch.float64, requires_grad=True)
    ref = expert_mask(x, w, b, idx, g, backend="reference")
    got = official_expert_mask(x, w, b, idx, g)
    torch.testing.assert_close(got, ref)
    grad = torch.randn_like(ref)
    for a, c in zip(torch.autograd.grad(ref, (x, w, b, g), grad), torch.autograd.grad(got, (x, w, b, g), grad)):
        torch.testing.assert_close(c, a)


def test_official_routers_take_over_a_model(monkeypatch):
    """The block and step 'official' variants really run the official algorithm, and the
    model computes the same function with it."""
    from benchmarks import official
    from benchmarks.modelkit import randomize_zero_parameters
    from switch_dit import models

    torch.manual_seed(0)
    model = (
        models.create(
            "Switch-DiT-S/2", hidden_size=32, num_heads=2, depth=2, input_size=8, num_classes=10, backend="reference"
        )
        .double()
        .eval()
    )
    randomize_zero_parameters(model)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([5, 500, 999]), torch.tensor([1, 2, 3])
    want = model(x, t, y)
    calls = []
    apply = official.GroupedLinear.apply
    monkeypatch.setattr(official.GroupedLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    official.use_official_routers(model)
    torch.testing.assert_close(model(x, t, y), want)
    assert len(calls) == 2  # one grouped linear per block


def test_datasheet_lookup_prefers_the_specific_part_and_knows_no_unknown_device():
    """The specific names (NVL, PCIe) win over the generic one; an unknown GPU and a CPU get no
    datasheet entry, so nothing is claimed for them (only the measured peak)."""
    sxm, pcie, nvl = (env.datasheet_for(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL"))
    assert len({sxm.source, pcie.source, nvl.source}) == 3
    assert env.datasheet_for("NVIDIA H200 NVL").source != env.datasheet_for("NVIDIA H200").source
    assert env.datasheet_for("NVIDIA B300 SXM6") is None
    assert env.datasheet_for(env.device_name(torch.device("cpu"))) is None


def test_dirty_tree_counts_untracked_sources(tmp_path, monkeypatch):
    """An untracked source file makes the tree dirty; a results file or a non-source file does not."""
    import subprocess

    repo = tmp_path / "repo"
    (repo / "switch_dit").mkdir(parents=True)
    (repo / "switch_dit" / "a.py").write_text("x = 1\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)
    monkeypatch.setattr(env, "REPO_ROOT", repo)
    assert env.git_commit()["dirty"] is False
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "results" / "x.json").write_text("{}")
    (repo / "notes.md").write_text("")
    assert env.git_commit()["dirty"] is False
    before = env.git_commit()["source_digest"]
    (repo / "switch_dit" / "b.py").write_text("y = 2\n")
    info = env.git_commit()
    assert info["dirty"] is True and info["source_digest"] != before


def test_cli_lists_the_gpu_plan_and_refuses_to_time_without_a_gpu(capsys):
    assert cli.main(["--quick", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "Switch-DiT-XL/2" in listing and "routed_linear" in listing
    if not torch.cuda.is_available():
        assert cli.main(["--quick", "--only", "ops"]) == 2


@pytest.mark.gpu
def test_host_sync_counter_sees_item():
    from benchmarks.timing import count_host_syncs

    x = torch.ones(4, device="cuda")
    assert count_host_syncs(lambda: x.sum().item(), calls=3) == pytest.approx(1.0)
    assert count_host_syncs(lambda: x * 2, calls=3) == 0


def test_patched_variant_trains_through_the_reference_models_own_loss():
    """The 'patched' rows time the reference-code model after switch_dit.accelerate, its
    aux loss (w_JSD * L_dp) entering the diffusion loss as the prior."""
    from benchmarks.modelkit import build_model
    from switch_dit.diffusion import create_diffusion

    tiny = {"hidden_size": 32, "num_heads": 2, "input_size": 8, "num_classes": 10, "depth": 2}
    adapter = build_model("Switch-DiT-S/2", tiny, "patched", torch.device("cpu"))
    assert type(adapter.model).__name__ == "AcceleratedRefDiT"
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    losses = create_diffusion().training_losses(adapter, x, t, y)
    assert torch.isfinite(losses["loss"]).all() and losses["prior"].item() > 0
    losses["loss"].mean().backward()
    # the prior reaches the gates
    assert all(p.grad is not None for n, p in adapter.named_parameters() if "f_gate" in n)
    with pytest.raises(RuntimeError, match="training-mode forward"):
        adapter.prior_loss(t)
    with pytest.raises(Unavailable, match="Switch-DiT only"):
        build_model("DiT-S/2", tiny, "patched", torch.device("cpu"))


def test_make_gpu_measures_the_target_rows_first():
    """In make gpu's plan the eager cases come before the compiled ones, and among the ops the
    targets' width (XL) before the narrower ones, so a phase cut by its budget keeps the rows that
    decide the targets: the routed linear, the norm ops and DiffMoE's expert MLP at D = 1152."""
    import torch

    from benchmarks import cli as bench_cli
    from benchmarks.runner import Context
    from benchmarks.settings import settings_for

    s = settings_for("gpu")
    ctx = Context(device=torch.device("cpu"), timer=None, results=None, run_id=0, peaks={})
    plan = [c for c in bench_cli._collect(s, ctx, ("ops",)) if c.quick]
    eager = [c for c in plan if not c.compiled]
    assert plan[: len(eager)] == eager  # every eager case before any compiled one
    widths = [c.shape.get("D") for c in eager]
    first_narrow = next(i for i, d in enumerate(widths) if d is not None and d < 1152)
    assert all(d is None or d == 1152 for d in widths[:first_narrow])
    assert all(d is not None and d < 1152 for d in widths[first_narrow:] if d is not None)
    benches_at_xl = {c.bench for c in eager[:first_narrow]}
    assert {"routed_linear", "mask_ln_modulate", "gated_residual_ln_modulate", "expert_mlp"} <= benches_at_xl
