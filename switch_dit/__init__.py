"""switch-dit: fused kernels and reference models for Switch Diffusion Transformers."""

__version__ = "0.1.0"
