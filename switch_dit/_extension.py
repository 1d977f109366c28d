"""Loader of the compiled extension ``switch_dit._C`` (C++/CUDA ops from ``csrc/``).

Importing the library registers its ops with the dispatcher (``torch.ops.switch_dit.*``).
The extension is optional: when it was not built, cannot be loaded, or is disabled with
``SWITCH_DIT_DISABLE_EXTENSION=1``, callers fall back to PyTorch and :func:`warn_fallback`
says so once per process.
"""

from __future__ import annotations

import os
import warnings

import torch

DISABLE_ENV = "SWITCH_DIT_DISABLE_EXTENSION"


class ExtensionFallbackWarning(UserWarning):
    """The compiled kernels are unavailable and a pure-PyTorch implementation runs instead."""


def _load() -> str | None:
    """Import the library; None on success, else why it is unavailable."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    try:
        from switch_dit import _C  # noqa: F401  (the import runs the op registrations)
    except Exception as exc:  # not built, or built against another torch
        return f"{type(exc).__name__}: {exc}"
    return None


load_error: str | None = _load()


def available() -> bool:
    """True when switch_dit._C is loaded."""
    return load_error is None


def has_kernel(qualname: str, device_type: str) -> bool:
    """True when the loaded extension registered a kernel of op ``qualname`` for ``device_type``
    ("cpu", "cuda"): a build without nvcc has CPU kernels only."""
    if not available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, device_type.upper())
    except Exception:  # private API: if it moves, assume the kernel exists and let the op decide
        return True


_warned = False


def warn_fallback(what: str, reason: str) -> None:
    """Warn, once per process, that ``what`` runs in PyTorch instead of the compiled kernels."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"switch_dit: {what} uses its pure-PyTorch fallback (same results, slower, more launches) "
        f"because {reason}. Rebuild the extension with `pip install -e . --no-build-isolation` "
        "(needs a C++ compiler; nvcc for the CUDA kernels).",
        ExtensionFallbackWarning,
        stacklevel=3,
    )
