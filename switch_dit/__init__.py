"""switch-dit: fused kernels and reference models for Switch Diffusion Transformers."""

__version__ = "0.1.0"
__all__ = ["accelerate"]


def __getattr__(name):
    # Lazy, so that `import switch_dit.cli` can set OpenMP's environment before torch loads.
    if name == "accelerate":
        from switch_dit.accelerate import accelerate

        return accelerate
    raise AttributeError(f"module 'switch_dit' has no attribute {name!r}")
