"""One dispatch for every op of ``switch_dit.ops``: named strategies, and the choice of one per call.

Vocabulary (docs/design.md §3). An *op* is a public function of ``switch_dit.ops``
("mixed_linear", "expert_mask", "expert_mask_and_apply", "mask_ln_modulate",
"residual_ln_modulate", "gated_residual", ...). A *strategy* is one complete implementation
of it, forward and backward, selected with ``backend="<name>"``. The names:

  "reference"  the plain PyTorch twin, which every op has: the ground truth of the tests,
               any dtype (float64 and gradcheck included), any device.
  "fused"      the Triton kernels of ``switch_dit.kernels`` (alias: "triton"); CUDA tensors,
               or CPU tensors when TRITON_INTERPRET=1 was set before Triton was imported.
  others       whatever the op's modules register: "emulated" (the norm ops' custom ops and
               hand-written backward with each kernel replaced by its PyTorch formula, to
               check that backward in float64 anywhere), cuBLAS compositions ("bmm",
               "grouped", ...), "compiled" (torch.compile'd reference). ``strategies(op)``
               lists them; an unknown name raises a ValueError that lists them.
  "auto"/None  the fastest strategy that supports the call (``choose``, below).

Registering a strategy (the op's module does it at import)::

    register(op, name, impl, supports=None, tunable=True)

``impl(*args, **kw)`` has the op's public signature without ``backend`` and receives
arguments the op has already validated (and cast, under autocast). ``supports(*args, **kw)``
returns None when ``impl`` can run on those arguments, else the reason it cannot (a short
phrase such as "needs x of dtype float16, bfloat16 or float32"). ``tunable=False`` keeps a
strategy out of "auto" (test tools such as "emulated").

Resolution (``call``; the backend string is checked once per op call):
  1. None -> "auto", "triton" -> "fused"; any other unknown name raises ValueError.
  2. Empty input (a tensor argument with no elements) runs "reference": there is nothing
     to compute, and a custom op may not return several empty tensors (they alias).
  3. A named strategy that cannot run on these arguments raises ValueError with the reason.
  4. "auto" asks ``choose`` (see ``switch_dit.ops.autotune``): "reference" on CPU tensors,
     else the fastest supported strategy, timed once per (device, dtype, op, shapes) or read
     from the shipped table where timing is not allowed.

``explain(op, *args, **kw)`` says which strategy a call would run and why; a choice made by
"auto" is also logged at debug level on the ``switch_dit.ops`` logger.

Plumbing shared by the kernel-backed strategies lives here too: ``kernels(name)`` imports a
kernels module once (loud on failure, except for a missing Triton), ``on_device(t)`` makes
t's CUDA device current for a Triton launch, ``no_autocast(device_type)`` switches autocast
off inside an op body.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import warnings
from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = [
    "register",
    "strategies",
    "call",
    "resolve",
    "explain",
    "check_backend",
    "backend_for",
    "runs_reference",
    "kernels_unavailable",
    "Strategy",
    "on_gpu",
    "kernels",
    "on_device",
    "no_autocast",
    "autocast_inputs",
    "REFERENCE",
    "FUSED",
    "AUTO",
    "ALIASES",
]

log = logging.getLogger("switch_dit.ops")

REFERENCE, FUSED, AUTO = "reference", "fused", "auto"
ALIASES = {"triton": FUSED}


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    impl: Callable
    supports: Optional[Callable] = None  # (*args, **kw) -> None | reason it cannot run
    tunable: bool = True  # considered by "auto"

    def why_not(self, args, kw) -> Optional[str]:
        return None if self.supports is None else self.supports(*args, **kw)


_REGISTRY: dict[str, dict[str, Strategy]] = {}
_KNOWN_NAMES: set[str] = set()  # every registered strategy name, of any op


def register(op: str, name: str, impl: Callable, *, supports: Optional[Callable] = None, tunable: bool = True) -> None:
    """Add strategy ``name`` of ``op`` (see the module doc); registering a name again replaces it."""
    if name in (AUTO, *ALIASES) or not name or not isinstance(name, str):
        raise ValueError(f"strategy name {name!r} is reserved or empty (reserved: {AUTO!r}, {sorted(ALIASES)})")
    _REGISTRY.setdefault(op, {})[name] = Strategy(name, impl, supports, tunable)
    _KNOWN_NAMES.add(name)


def strategies(op: str) -> tuple[str, ...]:
    """The strategy names of ``op``, "reference" first (plus "auto", and the alias "triton" for "fused")."""
    table = _strategies_of(op)
    return (REFERENCE, *sorted(n for n in table if n != REFERENCE))


def _strategies_of(op: str) -> dict[str, Strategy]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; the ops with strategies are {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def _all_names() -> set[str]:
    return {name for table in _REGISTRY.values() for name in table} | {AUTO, *ALIASES}


def check_backend(backend: Optional[str]) -> str:
    """A module's ``backend`` setting (it applies to several ops): None -> "auto", aliases kept;
    a name no op has raises ValueError. Each op call still checks the name against its own strategies."""
    backend = AUTO if backend is None else backend
    if not isinstance(backend, str) or backend not in _all_names():
        raise ValueError(f"backend must be None or one of {sorted(_all_names())}, got {backend!r}")
    return backend


def backend_for(op: str, backend: Optional[str]) -> Optional[str]:
    """The backend a module's setting gives ``op``: the setting itself where ``op`` has that
    strategy (or it is "auto"/None/an alias), else "auto". So a model-wide "bmm" runs the routed
    ops as "bmm", and the norm ops, which have no "bmm", choose their own strategy."""
    if backend in _KNOWN_NAMES and backend not in _strategies_of(op) and backend not in ALIASES:
        return AUTO
    return backend  # (a name no op has goes on, and the op says which names it takes)


def on_gpu(device: torch.device) -> bool:
    """Tensors on this device may run the GPU strategies; elsewhere "auto" is "reference"."""
    return device.type == "cuda"


def runs_reference(backend: Optional[str], x: Tensor) -> bool:
    """Whether a module's ``backend`` means the model code as written, in plain PyTorch, for x:
    "reference", or "auto"/None where "auto" gives every op its reference (not ``on_gpu``).

    For the few places where a model has two ways of writing one computation, not two
    strategies of one op: the block as written vs through the fused ops, each router's gate vs
    one GEMM for all gates. Everything else is decided per op call."""
    if backend == REFERENCE:
        return True
    return (backend is None or backend == AUTO) and not on_gpu(x.device)


# --------------------------------------------------------------------------- resolution


def _tensors(args, kw) -> list[Tensor]:
    return [a for a in (*args, *kw.values()) if isinstance(a, Tensor)]


def resolve(op: str, backend: Optional[str], *args, **kw) -> tuple[Strategy, str]:
    """The strategy ``call`` would run, and why (a phrase)."""
    table = _strategies_of(op)
    name = AUTO if backend is None else ALIASES.get(backend, backend)
    if name != AUTO and name not in table:
        raise ValueError(
            f"backend {backend!r} is not a strategy of {op}: expected None, 'auto' or one of "
            f"{strategies(op)} ('triton' is an alias of 'fused')"
        )
    tensors = _tensors(args, kw)
    if any(t.numel() == 0 for t in tensors):
        return table[REFERENCE], "empty input: nothing to compute"
    if name != AUTO:
        reason = table[name].why_not(args, kw)
        if reason is not None:
            device = tensors[0].device if tensors else "?"
            dtype = tensors[0].dtype if tensors else "?"
            raise ValueError(f"backend {backend!r} cannot run {op} on these inputs ({dtype} on {device}): {reason}")
        return table[name], "named by backend"
    from switch_dit.ops import autotune  # the choice of "auto"; imports this module

    return autotune.choose(op, table, args, kw)


def call(op: str, backend: Optional[str], *args, **kw):
    """Run ``op`` with the strategy ``backend`` names (or "auto" chooses) on validated arguments."""
    strategy, _ = resolve(op, backend, *args, **kw)
    return strategy.impl(*args, **kw)


def explain(op: str, *args, backend: Optional[str] = None, **kw) -> str:
    """Which strategy ``switch_dit.ops.<op>(*args, backend=backend, **kw)`` runs, and why.

    Example: ``explain("expert_mask", x, w, b, idx, g)`` -> "expert_mask: 'fused' (auto: ...)".
    Resolving may time the candidates once, exactly as the call itself would.
    """
    strategy, why = resolve(op, backend, *args, **kw)
    return f"{op}: {strategy.name!r} ({why})"


# --------------------------------------------------------------------------- kernel plumbing

_KERNELS: dict[str, Optional[ModuleType]] = {}
_warned_no_triton = False


def kernels(name: str) -> Optional[ModuleType]:
    """``switch_dit.kernels.<name>``, imported once; None when Triton itself is not installed.

    A missing Triton is said once (a RuntimeWarning) and "auto" then uses the other
    strategies. Any other import failure (a broken kernels module, a Triton too old for it)
    raises: a silent fallback would hide a bug behind a slow path.
    """
    global _warned_no_triton
    if name not in _KERNELS:
        try:
            _KERNELS[name] = importlib.import_module(f"switch_dit.kernels.{name}")
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] != "triton":
                raise
            _KERNELS[name] = None
            if not _warned_no_triton:
                _warned_no_triton = True
                warnings.warn(
                    "Triton is not installed: the 'fused' strategies are unavailable and backend='auto' "
                    "uses the others (pip install triton to get them)",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _KERNELS[name]


def kernels_unavailable(name: str, dtypes: tuple, x: Tensor) -> Optional[str]:
    """Why the kernels of module ``name`` cannot take x (None if they can): the "fused" ``supports``."""
    module = kernels(name)
    if module is None:
        return "needs Triton, which is not installed"
    if x.dtype not in dtypes:
        return f"supports x of dtype {', '.join(str(d).replace('torch.', '') for d in dtypes)}, not {x.dtype}"
    if not x.is_cuda and not module.INTERPRET:
        return (
            f"needs CUDA tensors (x is on {x.device}), or TRITON_INTERPRET=1 set before Triton is imported "
            "to run the kernels on the CPU"
        )
    return None


def on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it t's (a no-op for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def autocast_inputs(x: Tensor, *others: Optional[Tensor]) -> tuple:
    """(x, *others) as F.linear takes them under autocast on x's device: in the autocast dtype
    (None stays None; float64 stays, as autocast leaves it); unchanged when autocast is off.
    The ops then run their strategies with autocast off on tensors of one dtype."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev) or x.dtype == torch.float64:
        return (x, *others)
    dt = torch.get_autocast_dtype(dev)
    return tuple(None if t is None else t.to(dt) for t in (x, *others))


def no_autocast(device_type: str):
    """Autocast off inside an op body, entered only when it is on (entering costs time)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
