"""switch-dit: fused kernels and reference models for Switch Diffusion Transformers."""

__version__ = "0.1.0"
from switch_dit.accelerate import accelerate  # noqa: E402,F401  drop-in for the reference code (issue 9)
