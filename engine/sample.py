"""Sampling from a trained checkpoint with the engine's samplers (engine/diffusion.py): latents by DDPM,
DDIM, Heun or DPM-Solver++(2M), optionally with classifier-free guidance (A9), then the VAE decoder on
z_0 · latent_scale (V2). Used by ``ldmkit sample CHECKPOINT`` and by training's sample grids.

Noise is drawn on the CPU from ``torch.Generator().manual_seed(seed)`` (x_T first, then one slot per
step for the stochastic samplers) and moved to the device, so a seed gives the same images on any device.
"""

from __future__ import annotations

import numpy as np
import torch

from ldmkit.reference.schedules import Schedule, respace, timesteps

from . import diffusion as D
from .config import Config
from .models import VAE, UNet

SAMPLERS = ("ddim", "ddpm", "heun", "dpmpp2m")
SPACING = "trailing"  # the step list starts at t = T (Lin et al.); see reference.schedules.timesteps


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


def resolve_labels(config: Config, n: int, class_id: int | None):
    """Labels for n samples: all ``class_id``, or 0, 1, …, K−1 repeated for a conditional model (None for
    an unconditional one). ValueError for a class id out of range or asked of an unconditional model."""
    k = config.unet.num_classes
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if class_id is not None:
        if k == 0:
            raise ValueError("--class was given but the model is unconditional (trained without labels)")
        if not 0 <= class_id < k:
            raise ValueError(f"class id must be in 0..{k - 1}, got {class_id}")
        return np.full(n, class_id, dtype=np.int64)
    return None if k == 0 else np.arange(n, dtype=np.int64) % k


def check_sampling_args(config: Config, sampler: str, steps: int, eta: float, guidance: float | None):
    """ValueError naming the argument for an unknown sampler, steps outside 1..T, a negative η, η with a
    sampler that has none, or guidance on an unconditional model."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    T = config.diffusion.T
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T} (the model's T), got {steps}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only, got eta={eta} with {sampler!r}")
    if guidance is not None:
        if config.unet.num_classes == 0:
            raise ValueError("--guidance was given but the model is unconditional (no null class to guide from)")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")


def sample_noise(config: Config, n: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T (n, C, H, W), loop noise (steps, n, C, H, W)) in float32 from a CPU generator seeded ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    shape = (n, *config.latent_shape)
    return torch.randn(shape, generator=g), torch.randn((steps, *shape), generator=g)


@torch.no_grad()
def generate(config: Config, vae: VAE, unet: UNet, n: int, labels=None, sampler: str = "ddim", steps: int = 50,
             eta: float = 0.0, guidance: float | None = None, seed: int = 0, noise=None) -> np.ndarray:
    """n images (n, C, H, W) float32 in [0, 1]. ``labels`` (n,) class ids or None; ``guidance`` w of A9
    (None: 1.0, i.e. plain conditional sampling). ``noise``: optional (x_T, loop noise) as from
    ``sample_noise`` (overrides ``seed``)."""
    check_sampling_args(config, sampler, steps, eta, guidance)
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels must have n = {n} entries, got {len(labels)}")
    device = next(unet.parameters()).device
    x_T, loop = noise if noise is not None else sample_noise(config, n, steps, seed)
    x_T, loop = x_T.to(device), loop.to(device)
    schedule = Schedule.named(config.diffusion.schedule, config.diffusion.T)
    pred = config.diffusion.prediction

    def model(x, t, y):
        return unet(x, t, y)

    y = None
    if labels is not None:
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
        w = 1.0 if guidance is None else float(guidance)
        if w != 1.0:
            model = D.cfg(model, w, null_class=config.unet.num_classes)
    ts = timesteps(steps, config.diffusion.T, SPACING)
    if sampler == "ddpm":
        z = D.ddpm_sample(model, x_T, respace(schedule, ts), "beta_tilde", loop, pred, y)
    elif sampler == "ddim":
        z = D.ddim_sample(model, x_T, schedule, ts, eta, loop, pred, y)
    elif sampler == "heun":
        z = D.heun_sample(model, x_T, schedule, ts, pred, y)
    else:
        z = D.dpmpp_2m_sample(model, x_T, schedule, ts, pred, y)
    images = vae.decode(z * config.latent_scale)
    return ((images.float().clamp(-1, 1) + 1) / 2).cpu().numpy()
