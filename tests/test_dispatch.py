"""The one dispatch of switch_dit.ops: the strategy registry, resolution of ``backend``, the
kernel loader's loud failures, and how "auto" chooses (fake clock, fake GPU; docs/design.md §3)."""

import importlib.abc
import importlib.machinery
import json
import logging
import sys
import warnings

import pytest
import torch

import switch_dit.ops as ops
from switch_dit.ops import autotune, dispatch, strategy_table

OP = "test_dispatch_op"


@pytest.fixture
def fake_op(monkeypatch, tmp_path):
    """A registered op with four strategies, a disk cache in tmp_path, and fresh caches.

    Each impl records its name in ``calls``; "fused" refuses float64."""
    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))
    monkeypatch.setenv("SWITCH_DIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SWITCH_DIT_AUTOTUNE", raising=False)
    autotune.clear_memory_cache()
    calls = []

    def impl(name, scale):
        def run(x, y):
            calls.append(name)
            return x * scale + y

        return run

    dispatch.register(OP, "reference", impl("reference", 2.0))
    dispatch.register(OP, "slow", impl("slow", 2.0))
    dispatch.register(OP, "quick", impl("quick", 2.0))
    dispatch.register(
        OP,
        "fused",
        impl("fused", 2.0),
        supports=lambda x, y: "supports float32 only" if x.dtype == torch.float64 else None,
    )
    dispatch.register(OP, "tool", impl("tool", 2.0), tunable=False)
    yield calls
    autotune.clear_memory_cache()


@pytest.fixture
def fake_gpu(monkeypatch):
    """CPU tensors count as a GPU named like an H100; the clock says quick < fused < reference < slow."""
    monkeypatch.setattr(autotune, "_on_gpu", lambda device: True)
    monkeypatch.setattr(autotune, "_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    timed = []
    seconds = {"quick": 1e-5, "fused": 2e-5, "reference": 3e-5, "slow": 9e-5}

    def measure(strategy, fn):
        timed.append(strategy.name)
        fn()
        return seconds[strategy.name]

    monkeypatch.setattr(autotune, "_measure", measure)
    return timed


def xy(dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return x, torch.randn(3, 4, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------- registry and names


def test_every_op_lists_reference_and_fused():
    for op in (
        "mixed_linear",
        "expert_mask",
        "expert_mask_and_apply",
        "mask_ln_modulate",
        "residual_ln_modulate",
        "gated_residual",
    ):
        names = ops.strategies(op)
        assert names[0] == "reference" and "fused" in names, (op, names)
    assert "emulated" in ops.strategies("gated_residual")


def test_strategies_of_unknown_op_raises():
    with pytest.raises(ValueError, match="unknown op 'nope'.*mixed_linear"):
        ops.strategies("nope")


def test_unknown_strategy_lists_the_valid_ones(fake_op):
    with pytest.raises(ValueError, match=r"'bmmm' is not a strategy of test_dispatch_op.*'reference', 'fused'"):
        dispatch.call(OP, "bmmm", *xy())


def test_reserved_names_cannot_be_registered(fake_op):
    for name in ("auto", "triton", ""):
        with pytest.raises(ValueError, match="reserved or empty"):
            dispatch.register(OP, name, lambda x, y: x)


def test_named_strategy_runs_and_triton_is_fused(fake_op):
    x, y = xy()
    for backend, ran in (("slow", "slow"), ("triton", "fused"), ("fused", "fused"), ("tool", "tool")):
        fake_op.clear()
        torch.testing.assert_close(dispatch.call(OP, backend, x, y), 2 * x + y)
        assert fake_op == [ran]


def test_named_strategy_that_cannot_run_says_why(fake_op):
    with pytest.raises(
        ValueError,
        match=r"'fused' cannot run test_dispatch_op on these inputs "
        r"\(torch.float64 on cpu\): supports float32 only",
    ):
        dispatch.call(OP, "fused", *xy(torch.float64))


def test_empty_input_runs_the_reference(fake_op):
    x, y = torch.zeros(0, 4), torch.zeros(0, 4)
    for backend in ("fused", "slow", None):
        fake_op.clear()
        dispatch.call(OP, backend, x, y)
        assert fake_op == ["reference"]
    assert "empty input" in ops.explain(OP, x, y, backend="slow")


def test_check_backend_knows_every_registered_name(fake_op):
    assert dispatch.check_backend(None) == "auto"
    for name in ("auto", "reference", "fused", "triton", "quick", "emulated"):
        assert dispatch.check_backend(name) == name
    with pytest.raises(ValueError, match="backend must be None or one of .*'reference'"):
        dispatch.check_backend("cuda")


def test_real_ops_reject_unsupported_strategy_with_reason():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    w = torch.randn(3, 8, 8, dtype=torch.float64)
    idx, g = torch.tensor([[0, 1], [2, 1]]), torch.rand(2, 2)
    with pytest.raises(ValueError, match="'fused' cannot run expert_mask.*dtype float16, bfloat16, float32"):
        ops.expert_mask(x, w, None, idx, g, backend="fused")


# ---------------------------------------------------------------------------- kernel loader: loud failures


@pytest.fixture
def fresh_loader(monkeypatch):
    monkeypatch.setattr(dispatch, "_KERNELS", {})
    monkeypatch.setattr(dispatch, "_warned_no_triton", False)
    for name in ("switch_dit.kernels.routed_linear", "switch_dit.kernels.norm_modulate"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_missing_triton_warns_once_and_auto_uses_the_reference(monkeypatch, fresh_loader):
    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" now fails as if not installed
    with pytest.warns(RuntimeWarning, match="Triton is not installed") as record:
        assert dispatch.kernels("routed_linear") is None
        assert dispatch.kernels("norm_modulate") is None
    assert len([w for w in record if "Triton" in str(w.message)]) == 1
    x = torch.randn(2, 3, 8)
    w = torch.randn(3, 8, 8) * 0.1
    idx, g = torch.tensor([[0, 1], [2, 1]]), torch.rand(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: no second warning
        torch.testing.assert_close(
            ops.expert_mask(x, w, None, idx, g), ops.mixed_linear_reference(x, w, None, idx, g, add_one=True)
        )
        with pytest.raises(ValueError, match="'triton' cannot run expert_mask.*needs Triton, which is not installed"):
            ops.expert_mask(x, w, None, idx, g, backend="triton")
        with pytest.raises(ValueError, match="needs Triton"):
            ops.gated_residual(x, x, x[:, 0], backend="fused")


class _BrokenKernels(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``switch_dit.kernels.routed_linear`` fail as a buggy module would."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, fullname, path, target=None):
        if fullname == "switch_dit.kernels.routed_linear":
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        NameError("name 'tl' is not defined"),
        ImportError("cannot import name 'tensor_descriptor' from 'triton.language'"),
        ModuleNotFoundError("No module named 'scipy'", name="scipy"),
    ],
)
def test_broken_kernels_module_raises(monkeypatch, fresh_loader, error):
    monkeypatch.setattr(sys, "meta_path", [_BrokenKernels(error), *sys.meta_path])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error), match=str(error.args[0])[:20]):
            dispatch.kernels("routed_linear")


# ---------------------------------------------------------------------------- auto


def test_auto_on_cpu_is_the_reference_without_timing(fake_op, monkeypatch):
    monkeypatch.setattr(autotune, "_measure", lambda *a: pytest.fail("no timing on the CPU"))
    x, y = xy()
    dispatch.call(OP, None, x, y)
    dispatch.call(OP, "auto", x, y)
    assert fake_op == ["reference", "reference"]
    assert "cpu tensors run the reference" in ops.explain(OP, x, y)


def test_auto_times_once_picks_the_fastest_and_caches_on_disk(fake_op, fake_gpu, tmp_path, caplog):
    x, y = xy()
    with caplog.at_level(logging.DEBUG, logger="switch_dit.ops"):
        out = dispatch.call(OP, "auto", x, y)
    torch.testing.assert_close(out, 2 * x + y)
    assert sorted(fake_gpu) == ["fused", "quick", "reference", "slow"]  # "tool" is not tunable
    assert fake_op[-1] == "quick"
    assert any("auto chose 'quick'" in r.getMessage() for r in caplog.records)
    saved = json.loads((tmp_path / "strategies.json").read_text())
    (entry,) = saved["choices"].values()
    assert entry["strategy"] == "quick" and entry["seconds"]["slow"] == 9e-5

    fake_gpu.clear()
    fake_op.clear()
    dispatch.call(OP, None, x, y)
    assert fake_gpu == [] and fake_op == ["quick"]  # cached in memory
    assert "cached" in ops.explain(OP, x, y)

    autotune.clear_memory_cache()  # a new process: read back from disk, no timing
    dispatch.call(OP, None, x, y)
    assert fake_gpu == [] and fake_op[-1] == "quick"

    dispatch.call(OP, None, torch.randn(5, 4), torch.randn(5, 4))  # a new shape is timed
    assert len(fake_gpu) == 4
    assert len(json.loads((tmp_path / "strategies.json").read_text())["choices"]) == 2


def test_a_decided_call_asks_no_strategy_again(fake_op, fake_gpu, monkeypatch):
    """After the first call, a call with the same signature is one lookup: no ``supports``, no timing."""
    x, y = xy()
    dispatch.call(OP, None, x, y)
    asked = []
    fused = dispatch._REGISTRY[OP]["fused"]
    monkeypatch.setitem(
        dispatch._REGISTRY[OP], "fused", dispatch.Strategy("fused", fused.impl, lambda *a: asked.append(1))
    )
    fake_gpu.clear()
    for _ in range(3):
        dispatch.call(OP, None, torch.randn(3, 4), torch.randn(3, 4))
    assert asked == [] and fake_gpu == [] and fake_op[-3:] == ["quick"] * 3
    monkeypatch.setenv("SWITCH_DIT_AUTOTUNE", "0")
    for _ in range(3):
        dispatch.call(OP, None, x, y)
    assert len(asked) == 1 and fake_op[-1] == "fused"  # the table, decided once


def test_auto_skips_strategies_that_cannot_run(fake_op, fake_gpu):
    dispatch.call(OP, None, *xy(torch.float64))
    assert "fused" not in fake_gpu and len(fake_gpu) == 3


def test_timing_with_gradients_leaves_grad_untouched(fake_op, fake_gpu):
    x, y = xy(requires_grad=True)
    out = dispatch.call(OP, None, x, y)
    assert x.grad is None
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("predicate", ["_capturing", "_compiling"])
def test_no_timing_under_capture_or_tracing(fake_op, fake_gpu, monkeypatch, predicate):
    monkeypatch.setattr(autotune, predicate, lambda: True)
    x, y = xy()
    dispatch.call(OP, None, x, y)
    assert fake_gpu == []
    assert fake_op == ["fused"]  # the table has no row for this op: "fused" where it can run
    assert "shipped table" in ops.explain(OP, x, y)


def test_capture_uses_a_choice_measured_before(fake_op, fake_gpu, monkeypatch):
    x, y = xy()
    dispatch.call(OP, None, x, y)  # eager warm-up: timed, "quick"
    fake_gpu.clear()
    monkeypatch.setattr(autotune, "_capturing", lambda: True)
    dispatch.call(OP, None, x, y)
    assert fake_gpu == [] and fake_op[-1] == "quick"


@pytest.mark.parametrize("how", ["env", "deterministic"])
def test_autotune_off_and_deterministic_use_the_table_only(fake_op, fake_gpu, monkeypatch, how):
    x, y = xy()
    dispatch.call(OP, None, x, y)  # measured: "quick"
    fake_gpu.clear()
    if how == "env":
        monkeypatch.setenv("SWITCH_DIT_AUTOTUNE", "0")
    else:
        monkeypatch.setattr(autotune, "_deterministic", lambda: True)
    dispatch.call(OP, None, x, y)
    assert fake_gpu == [] and fake_op[-1] == "fused"


def test_unwritable_cache_keeps_the_choice_in_memory(fake_op, fake_gpu, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SWITCH_DIT_CACHE_DIR", str(blocker / "sub"))  # a file where a folder should be
    x, y = xy()
    dispatch.call(OP, None, x, y)
    fake_gpu.clear()
    dispatch.call(OP, None, x, y)
    assert fake_gpu == [] and fake_op[-1] == "quick"


def test_corrupt_cache_file_is_ignored(fake_op, fake_gpu, tmp_path):
    (tmp_path / "strategies.json").write_text("{not json")
    dispatch.call(OP, None, *xy())
    assert len(fake_gpu) == 4
    assert json.loads((tmp_path / "strategies.json").read_text())["version"] == 1


# ---------------------------------------------------------------------------- the shipped table


def test_table_lookup_by_device_pattern_with_fallbacks():
    available = ["reference", "fused", "bmm"]
    assert strategy_table.lookup("NVIDIA H100 80GB HBM3", "expert_mask", torch.bfloat16, available)[0] == "bmm"
    assert (
        strategy_table.lookup("NVIDIA H100 80GB HBM3", "expert_mask", torch.bfloat16, ["reference", "fused"])[0]
        == "fused"
    )
    assert strategy_table.lookup("NVIDIA H100 80GB HBM3", "expert_mask", torch.float32, available)[0] == "bmm"
    name, source = strategy_table.lookup("NVIDIA A100-SXM4-80GB", "mask_ln_modulate", torch.float32, available)
    assert name == "fused" and "A100" in source and "not measured" in source
    assert strategy_table.lookup("Tesla T4", "gated_residual", torch.float16, ["reference"])[0] == "reference"
    assert strategy_table.lookup("NVIDIA H200", "some_new_op", torch.float16, available)[0] == "fused"
    assert strategy_table.lookup("NVIDIA H200", "some_new_op", torch.float16, ["reference"])[0] == "reference"
    for device, rows in strategy_table.TABLE.items():
        assert all(order[-1] in ("reference", "fused") for order in rows.values()), device


@pytest.mark.parametrize("device", ["A100", "H100", "H200"])
def test_table_follows_the_performance_model_for_bf16(device):
    """Among the cuBLAS strategies (whose model numbers are trustworthy) the shipped bf16 order of the
    routed linear is the analytic model's ranking at XL shapes; "fused" is placed by the documented
    reading of the kernels, which the model cannot see."""
    from switch_dit import perf_model

    shape = dict(B=32, L=256, D=1152, M=3, k=2)
    order = [s for s in strategy_table.TABLE[device][("mixed_linear", torch.bfloat16)] if s != "fused"]
    predicted = {s: perf_model.estimate("mixed_linear", s, shape, torch.bfloat16, device.lower()).time_s for s in order}
    assert order == sorted(order, key=predicted.get) == ["bmm", "grouped", "reference"]
    assert "predicted" in strategy_table.STATUS[device]


def test_runs_reference_is_autos_cpu_rule(monkeypatch):
    """Where a model has two ways of writing one computation, "auto" follows the ops' rule."""
    x = torch.zeros(2)
    assert dispatch.runs_reference("reference", x) and dispatch.runs_reference("auto", x)
    assert dispatch.runs_reference(None, x)
    assert not dispatch.runs_reference("fused", x) and not dispatch.runs_reference("bmm", x)
    monkeypatch.setattr(dispatch, "on_gpu", lambda device: True)
    assert not dispatch.runs_reference("auto", x) and dispatch.runs_reference("reference", x)


def test_auto_traces_into_one_graph_without_timing(monkeypatch):
    """torch.compile(fullgraph=True) follows auto's code on a (fake) GPU: the shipped table decides,
    nothing is timed, no graph break; the result equals the reference twin."""
    monkeypatch.setattr(autotune, "_on_gpu", lambda device: True)
    monkeypatch.setattr(autotune, "_measure", lambda *a: pytest.fail("no timing while torch.compile traces"))
    autotune.clear_memory_cache()
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    z, y, gate = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g), torch.randn(2, 8, generator=g)
    compiled = torch.compile(lambda *a: ops.gated_residual(*a, backend=None) * 2, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(z, y, gate), (z + gate[:, None] * y) * 2)
    autotune.clear_memory_cache()


def test_auto_times_every_real_strategy_forward_and_backward(monkeypatch, tmp_path):
    """On a (fake) GPU, auto runs each registered strategy of expert_mask_and_apply once through
    the timer, forward and backward, and then runs the one the clock calls fastest."""
    monkeypatch.setenv("SWITCH_DIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SWITCH_DIT_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "_on_gpu", lambda device: True)
    autotune.clear_memory_cache()
    timed = {}

    def measure(strategy, fn):
        grads = fn()  # the backward's gradients (autograd.grad), since the inputs require them
        timed[strategy.name] = [g for g in grads if g is not None]
        return 1e-6 if strategy.name == "reference" else 1e-5

    monkeypatch.setattr(autotune, "_measure", measure)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    w, b = (0.1 * torch.randn(3, 8, 8, generator=g)).requires_grad_(), torch.randn(3, 8, generator=g)
    idx, coef = torch.tensor([[0, 2], [1, 1]]), torch.rand(2, 2, generator=g)
    m, r = ops.expert_mask_and_apply(x, w, b, idx, coef)
    assert set(timed) == {s for s in ops.strategies("expert_mask_and_apply") if s != "emulated"}
    want = ops.mixed_linear_reference(x, w, b, idx, coef, add_one=True)
    torch.testing.assert_close(m, want)
    torch.testing.assert_close(r, x * want)
    assert x.grad is None and w.grad is None  # timing left no gradients behind
    for name, grads in timed.items():  # every strategy's backward agrees with the reference's
        assert len(grads) == 2, name
        for got, ref in zip(grads, timed["reference"]):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=name)
    autotune.clear_memory_cache()


def test_backend_for_maps_a_name_the_op_lacks_to_auto():
    assert dispatch.backend_for("mask_ln_modulate", "bmm") == "auto"  # a routed-linear strategy
    assert dispatch.backend_for("expert_mask", "bmm") == "bmm"
    assert dispatch.backend_for("expert_mask", "emulated") == "auto"  # a norm-op strategy
    for name in (None, "auto", "reference", "fused", "triton"):
        assert dispatch.backend_for("gated_residual", name) == name
    assert dispatch.backend_for("gated_residual", "gpu") == "gpu"  # unknown everywhere: the op will say so
    with pytest.raises(ValueError, match="'gpu' is not a strategy of gated_residual"):
        ops.gated_residual(
            torch.zeros(1, 2, 4),
            torch.zeros(1, 2, 4),
            torch.zeros(1, 4),
            backend=dispatch.backend_for("gated_residual", "gpu"),
        )
