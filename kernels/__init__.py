"""Triton kernels of switch-dit, installed as ``switch_dit.kernels``.

Kernels are pure functions of tensors (launchers plus ``@triton.jit`` bodies);
autograd, dispatch and ``torch.library`` registration live in ``switch_dit.ops``.

The source folder is the repository's top-level ``kernels/``. ``setup.py`` installs it as
``switch_dit.kernels`` (``package_dir``), and the symlink ``switch_dit/kernels -> ../kernels``
makes a plain checkout (editors, ruff, ``python -m pytest`` from the root) see the same name.

This package's ``__init__`` does not import Triton: the ops read ``INTERPRET`` and
``sm_count`` from here whether or not Triton is installed.
"""

from __future__ import annotations

import functools
import os

# @triton.jit reads TRITON_INTERPRET when a kernel module is imported: kernels are interpreted
# (CPU tensors allowed) exactly when this is true. Read once, here, for every kernel module.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 4 for the interpreter's CPU device."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())
