"""Sampling from a trained checkpoint: the reference's samplers (``ldmkit.reference.samplers.sample``: DDPM,
DDIM, Heun or DPM-Solver++(2M), optionally with classifier-free guidance, A9) run on torch tensors with the
U-Net (``diffusion.torch_model``), then the VAE decoder on z_0 · latent_scale (V2) and the centred crop to the
data's own size (``Config.output_size``: 28×28 for the built-in digits, which the VAE sees padded to 32×32). Used by
``ldmkit sample CHECKPOINT``, ``ldmkit eval``, the ONNX export's parity check and training's sample grids.

Noise is drawn on the CPU from ``torch.Generator().manual_seed(seed)`` (x_T first, then one slot per
step for the stochastic samplers) and moved to the device, so a seed gives the same images on any device.
"""

from __future__ import annotations

import numpy as np
import torch

from ldmkit.common import DEFAULT_SAMPLER, DEFAULT_STEPS, check_stages, sampling_stages
from ldmkit.reference import samplers as R

from .config import Config
from .data import center_crop
from .diffusion import torch_model
from .models import VAE, UNet


def models_from_checkpoint(ckpt: dict, device="cpu", ema: bool = True):
    """(config, vae, unet) in eval mode on ``device`` from a loaded checkpoint dict (the U-Net's EMA
    weights unless ``ema`` is False)."""
    config = Config.from_dict(ckpt["config"])
    if config.latent_scale is None:
        raise ValueError("the checkpoint has no latent_scale: its training stopped before the U-Net stage")
    vae = VAE.from_config(config.vae)
    vae.load_state_dict(ckpt["vae"])
    unet = UNet.from_config(config.unet)
    unet.load_state_dict(ckpt["ema" if ema else "unet"])
    return config, vae.to(device).eval(), unet.to(device).eval()


def sample_noise(config: Config, n: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T (n, C, H, W), loop noise (steps, n, C, H, W)) in float32 from a CPU generator seeded ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    shape = (n, *config.latent_shape)
    return torch.randn(shape, generator=g), torch.randn((steps, *shape), generator=g)


@torch.no_grad()
def generate(config: Config, vae: VAE, unet: UNet, n: int, labels=None, sampler: str = DEFAULT_SAMPLER,
             steps: int = DEFAULT_STEPS, eta: float = 0.0, guidance: float | None = None, seed: int = 0,
             noise=None, guidance_rescale: float = 0.0) -> np.ndarray:
    """n images (n, C, H, W) float32 in [0, 1], (H, W) = ``config.output_size``. ``labels``: None (all classes in
    turn for a conditional model), a class id, or n class ids (``R.class_labels``); ``guidance`` w of A9 (None:
    plain conditional sampling), ``guidance_rescale`` its φ of R3 (0: none).
    ``noise``: optional (x_T, loop noise) as from ``sample_noise`` (overrides ``seed``)."""
    k = config.unet.num_classes
    schedule = config.diffusion.make_schedule()
    null_class = k if k else None
    R.check_sampling(schedule, sampler, steps, eta, guidance, null_class, guidance_rescale)
    y = R.class_labels(n, k, labels)
    device = next(unet.parameters()).device
    x_T, loop = noise if noise is not None else sample_noise(config, n, steps, seed)
    z = R.sample(torch_model(unet), x_T.to(device), schedule, sampler, steps, eta, loop.to(device),
                 config.diffusion.prediction, y, guidance, null_class, guidance_rescale=guidance_rescale)
    scaled = z * config.latent_scale
    images = center_crop(vae.decode(scaled), config.output_size)
    check_stages(sampling_stages(config.latent_scale, sampler, guidance),
                 [bool(torch.isfinite(v).all()) for v in (z, scaled, images)])
    return ((images.float().clamp(-1, 1) + 1) / 2).cpu().numpy()
