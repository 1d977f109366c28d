"""The Stable Diffusion VAE of latent models: one loader, its constants, encode and decode.

    vae = load_vae("ema", device)     diffusers' AutoencoderKL (sd-vae-ft-ema / -mse, a hub id or a folder)
    z = encode(vae, images, gen)      images (B, 3, S, S) in [-1, 1] -> latents (B, 4, S/8, S/8) * SCALE
    x = decode(vae, z)                latents -> images in [-1, 1]

Latent models (DiT, Switch-DiT on ImageNet) train on ``SCALE`` times the VAE's latents, so
that they have a standard deviation near 1; decoding divides by it again. ``extract-latents``
(``switch_dit.latents``) encodes, ``switch-dit sample`` decodes.
"""

from __future__ import annotations

import torch

__all__ = ["SCALE", "NAMES", "load_vae", "encode", "decode"]

SCALE = 0.18215  # Stable Diffusion's latent scale (DiT and LDM divide by it before decoding)
NAMES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(name: str = "ema", device="cpu"):
    """diffusers' AutoencoderKL in eval mode without gradients: "ema" / "mse" (the SD VAEs
    DiT uses), a Hugging Face hub id or a local folder.

    Raises ImportError saying what to install without diffusers, RuntimeError when the weights
    can be neither found locally nor downloaded.
    """
    repo = NAMES.get(name, name)
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise ImportError("the VAE of latent models is diffusers' AutoencoderKL: pip install diffusers") from e
    try:
        vae = AutoencoderKL.from_pretrained(repo)
    except Exception as e:  # hub errors come in many classes (OSError, HTTPError, ...)
        raise RuntimeError(
            f"could not load the VAE {repo!r}: {e}. The weights are downloaded from the Hugging "
            "Face hub on first use; without internet access, download them elsewhere and pass "
            "their local folder (--vae PATH)"
        ) from e
    vae = vae.to(device).eval().requires_grad_(False)
    vae.name = repo
    return vae


@torch.no_grad()
def encode(vae, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images (B, 3, S, S) in [-1, 1] -> scaled latents (B, 4, S/8, S/8): a sample of the
    encoder's Gaussian (as DiT's training does), drawn from ``generator``."""
    device = next(vae.parameters()).device
    return vae.encode(images.to(device)).latent_dist.sample(generator=generator) * SCALE


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w) float32 in [-1, 1], ``batch_size`` at a time."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
        raise ValueError(f"latents must be a (B, 4, h, w) tensor, got {tuple(getattr(latents, 'shape', ()))}")
    dtype = next(vae.parameters()).dtype
    out = [vae.decode((z / SCALE).to(dtype)).sample.float() for z in latents.split(batch_size)]
    return torch.cat(out).clamp(-1, 1)
