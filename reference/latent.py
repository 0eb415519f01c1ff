"""Latent-diffusion glue (docs/formulas.md: V1, V2): the latent scale, and the way back to pixels.

The diffusion runs on scaled latents z/std(z), so it sees unit variance whatever the VAE's latent scale;
a sample z_0 of the reverse process is decoded as Decoder(z_0 · std(z)). Latents are (N, C, H, W).
"""

from __future__ import annotations

from ._checks import as_float_array, check_real


def latent_std(latents) -> float:
    """V1: std(z), one scalar over every element of the training latents (Rombach et al.'s scale factor is
    1/std(z)); latents (N, ...) with at least 2 elements and nonzero spread."""
    z = as_float_array(latents, "latents")
    if z.size < 2:
        raise ValueError(f"latents must hold at least 2 values to estimate a scale, got {z.size}")
    std = float(z.std())
    if not std > 0:
        raise ValueError("latents have zero spread: the latent scale std(z) must be > 0")
    return std


def scale_latents(z, std: float):
    """V1: z_scaled = z / std(z), what the diffusion model is trained on; shape of z."""
    std = check_real(std, "std", 0.0, low_open=True)
    return as_float_array(z, "z") / std


def unscale_latents(z0, std: float):
    """V2: the decoder's input z_0 · std(z) after the reverse process in scaled-latent space; shape of z0."""
    std = check_real(std, "std", 0.0, low_open=True)
    return as_float_array(z0, "z0") * std


def decode_sample(decoder, z0, std: float):
    """V2: sample = Decoder(z_0 · std(z)), for any callable ``decoder`` (NumPy function, ONNX session wrapper)."""
    if not callable(decoder):
        raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
    return decoder(unscale_latents(z0, std))
