"""switch-dit: fused kernels and reference models for Switch Diffusion Transformers."""

__version__ = "0.1.0"
__all__ = ["accelerate"]


def __getattr__(name):
    # Lazy: importing the package (for example its command line, which must set OpenMP's
    # environment before torch loads) does not import torch.
    if name == "accelerate":
        from switch_dit.dropin import accelerate

        return accelerate
    raise AttributeError(f"module 'switch_dit' has no attribute {name!r}")
