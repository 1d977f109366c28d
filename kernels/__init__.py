"""Triton kernels of switch-dit, installed as ``switch_dit.kernels``.

Kernels are pure functions of tensors (launchers plus ``@triton.jit`` bodies);
autograd and ``torch.library`` registration live in ``switch_dit.ops``.
"""
