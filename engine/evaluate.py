"""Evaluation of a checkpoint on the test split: a bound on the pixel NLL in bits/dim through the
reference's VLB (L1, L6), the VAE's reconstruction error, statistics of samples, and their quality against the
held-out test split (``engine.quality``: a classifier's accuracy and the Fréchet distance of Q2, with the
real-vs-real floor).

How the latent NLL relates to pixels. For an image x with encoder q(z given x), decoder p(x given z) and
the diffusion prior p(z), the ELBO gives −log p(x) ≤ E_q[−log p(x given z)] + E_q[log q(z given x)] +
E_q[−log p(z)]. The diffusion runs on z_s = z/c (c = latent_scale, V1), so −log p(z) = −log p_s(z/c) +
d_z log c, and −log p_s(z_s) ≤ the diffusion VLB with a continuous Gaussian L_0 (``losses.vlb_terms`` with
levels=None). The decoder term is the discretised Gaussian (K5) of the 8-bit pixels around the decoder's
mean with its fixed log-variance. Each expectation is one Monte Carlo draw per image; the sum, divided by
D·ln 2, is an upper bound on the NLL in bits per pixel dimension D. The images are the 28×28 digits padded
to 32×32 with black; since p(x₂₈) ≥ p(x₂₈, black border), total bits / 784 also bounds the 28×28 NLL.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ldmkit.common import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_SAMPLES
from ldmkit.reference import losses
from ldmkit.reference.kl import discretized_gaussian_log_likelihood, gaussian_log_likelihood
from ldmkit.reference.samplers import check_sampling

from . import quality
from .config import Config
from .data import center_crop, load_dataset
from .models import VAE, UNet
from .sample import generate


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@torch.no_grad()
def reconstruction(vae: VAE, images: torch.Tensor, device, batch_size: int = 500) -> dict:
    """VAE reconstruction through the posterior mean: MSE and PSNR in [0, 1] pixel units."""
    se, n = 0.0, 0
    for sl in _batches(len(images), batch_size):
        x = images[sl].to(device)
        recon = vae.decode(vae.encode(x)[0]).float().clamp(-1, 1)
        se += float(((recon - x) / 2).pow(2).sum())
        n += x.numel()
    mse = se / n
    return {"recon_mse": mse, "recon_psnr_db": 10 * math.log10(1.0 / mse)}


@torch.no_grad()
def nll_bits_per_dim(config: Config, vae: VAE, unet: UNet, images: torch.Tensor, device, seed: int = 0,
                     batch_size: int = 100) -> dict:
    """The upper bound on −log p(x) of the module docstring, per image, in bits per pixel dimension, with
    its three parts in nats; the U-Net is called through torch, the VLB is the reference's."""
    if config.vae.likelihood != "gaussian":
        raise ValueError("the NLL bound needs the gaussian reconstruction likelihood (discretised to 8 bits)")
    schedule = config.diffusion.make_schedule()
    c = float(config.latent_scale)
    null = config.unet.num_classes if config.unet.num_classes else None
    rng = np.random.default_rng(seed)

    def model(z_t, t, y=None):
        z = torch.from_numpy(z_t).float().to(device)
        yy = None if null is None else torch.full((len(z),), null, dtype=torch.long, device=device)
        return unet(z, torch.from_numpy(t).to(device), yy).double().cpu().numpy()

    parts = {"decoder_nats": [], "posterior_nats": [], "prior_nats": []}
    for sl in _batches(len(images), batch_size):
        x = images[sl].to(device)
        mean, logvar = (v.double() for v in vae.encode(x))
        z = mean + (0.5 * logvar).exp() * torch.from_numpy(rng.standard_normal(tuple(mean.shape))).to(device)
        x_np = np.round((x.double().cpu().numpy() + 1) * 127.5) / 127.5 - 1  # exactly on the 8-bit grid
        recon = vae.decode(z.float()).double().cpu().numpy()
        decoder = -discretized_gaussian_log_likelihood(x_np, recon, 0.5 * config.vae.recon_logvar, levels=256)
        z_np, m_np, lv_np = (v.cpu().numpy() for v in (z, mean, logvar))
        posterior = gaussian_log_likelihood(z_np, m_np, lv_np)
        vlb = losses.vlb_terms(model, z_np / c, schedule, rng, prediction=config.diffusion.prediction, levels=None)
        dz = int(np.prod(z_np.shape[1:]))
        parts["decoder_nats"].append(decoder.reshape(len(x_np), -1).sum(1))
        parts["posterior_nats"].append(posterior.reshape(len(x_np), -1).sum(1))
        parts["prior_nats"].append(vlb["total"] + dz * math.log(c))
    per_image = {k: np.concatenate(v) for k, v in parts.items()}
    total = per_image["decoder_nats"] + per_image["posterior_nats"] + per_image["prior_nats"]
    d = int(np.prod(images.shape[1:]))
    bits = total / (d * math.log(2))
    stderr = float(bits.std(ddof=1) / math.sqrt(len(bits))) if len(bits) > 1 else None  # JSON has no NaN
    return {"nll_bits_per_dim": float(bits.mean()), "nll_bits_per_dim_stderr": stderr, "nll_dims": d,
            "nll_bits_per_dim_28x28": float(total.mean() / (784 * math.log(2))) if images.shape[-1] == 32 else None,
            "nll_images": len(bits), **{k: float(v.mean()) for k, v in per_image.items()}}


def check_sample_count(config: Config, per_class: int) -> int:
    """The number of samples ``eval_samples`` draws, ``per_class`` of each class (10·per_class unconditionally),
    checked against ``common.MAX_SAMPLES`` before anything is allocated; ValueError otherwise."""
    k = config.unet.num_classes
    n = (k or 10) * per_class
    if n > MAX_SAMPLES:
        raise ValueError(f"eval would draw {n} samples ({per_class} per class for {k or 10} classes), more than the "
                         f"{MAX_SAMPLES} one call may: use --per-class {max(MAX_SAMPLES // (k or 10), 1)} or less"
                         + (" (or 0)" if MAX_SAMPLES < k else ""))
    return n


def eval_samples(config: Config, vae: VAE, unet: UNet, per_class: int, sampler: str = DEFAULT_SAMPLER,
                 steps: int = DEFAULT_STEPS, guidance: float | None = DEFAULT_GUIDANCE, seed: int = 0,
                 guidance_rescale: float = 0.0):
    """(samples (n, C, H, W) in [0, 1], labels (n,) or None): ``per_class`` samples of each class, in class
    order, for a conditional model (guidance w of A9, None for plain conditional sampling; its rescale φ, R3),
    or 10·per_class unconditional ones; one ``generate`` call from ``seed``."""
    k = config.unet.num_classes
    n = check_sample_count(config, per_class)
    labels = np.repeat(np.arange(k), per_class) if k else None
    samples = generate(config, vae, unet, n, labels, sampler, steps, guidance=guidance if k else None, seed=seed,
                       guidance_rescale=guidance_rescale if k else 0.0)
    return samples, labels


def class_fidelity(samples: np.ndarray, labels, train_images, train_labels, test_images, test_labels) -> dict:
    """Sample statistics: pixel mean/std of samples against the test set, and the accuracy of a
    nearest-class-mean classifier (class means of the training images) on samples of each requested class,
    beside its accuracy on the real test images (what "recognisable" can reach for that classifier)."""
    test01 = ((test_images + 1) / 2).numpy()
    out = {"sample_pixel_mean": float(samples.mean()), "sample_pixel_std": float(samples.std()),
           "test_pixel_mean": float(test01.mean()), "test_pixel_std": float(test01.std()), "samples": len(samples)}
    if labels is not None and train_labels is not None and test_labels is not None:
        k = int(labels.max()) + 1
        train01 = ((train_images + 1) / 2).numpy().reshape(len(train_images), -1)
        means = np.stack([train01[train_labels.numpy() == c].mean(0) for c in range(k)])

        def classify(x):
            x = x.reshape(len(x), -1)
            return np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)

        out["nearest_mean_accuracy_samples"] = float((classify(samples) == labels).mean())
        out["nearest_mean_accuracy_test"] = float((classify(test01) == test_labels.numpy()).mean())
    return out


def sample_quality(samples: np.ndarray, labels, train_images, train_labels, test_images, test_labels,
                   num_classes: int | None = None) -> dict:
    """The measure of ``engine.quality`` (classifier accuracy, Fréchet distance (Q2) to the held-out test
    split, the real-vs-real floor and the ratio), with the classifier trained here on the training split;
    images as ``load_dataset`` gives them ([−1, 1]). A dataset without labels gives {"quality_skipped": why}."""
    if train_labels is None:
        return {"quality_skipped": "the dataset has no labels to train the quality classifier on"}
    reference = quality.build_reference((train_images + 1) / 2, train_labels, (test_images + 1) / 2,
                                        test_labels, num_classes)
    return {**quality.measure(reference, samples, labels), "quality_held_out_images": len(test_images),
            "quality_classifier_accuracy": reference.held_out_accuracy,
            "quality_classifier_seconds": reference.train_seconds}


def evaluate(ckpt: dict, device, nll_images: int = 100, per_class: int = 50, seed: int = 0,
             sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, guidance: float | None = None,
             guidance_rescale: float = 0.0) -> dict:
    """All of the above for a loaded checkpoint dict; returns a JSON-ready dict. The samples (``per_class`` of
    each class; 0 skips them) come from ``sampler`` with ``steps``, ``guidance`` (default
    ``DEFAULT_GUIDANCE`` for a conditional model) and ``guidance_rescale`` (R3), checked before anything runs
    when there are samples to draw. The reconstruction and the NLL bound see the image_size×image_size images
    the VAE works at; the samples and the real images they are measured against are at the data's own size
    (``Config.output_size``)."""
    from .sample import models_from_checkpoint

    config, vae, unet = models_from_checkpoint(ckpt, device)
    k = config.unet.num_classes or None
    if guidance is None and k:
        guidance = DEFAULT_GUIDANCE
    if per_class:
        check_sampling(config.diffusion.make_schedule(), sampler, steps, 0.0, guidance, k, guidance_rescale)
        check_sample_count(config, per_class)
    spec, size = config.data["spec"], config.vae.image_size
    test_x, test_y, _ = load_dataset(spec, "test", size, k)
    train_x, train_y, _ = load_dataset(spec, "train", size, k)
    result = {"checkpoint_step": ckpt["step"], "test_images": len(test_x)}
    result.update(reconstruction(vae, test_x, device))
    if nll_images:
        result.update(nll_bits_per_dim(config, vae, unet, test_x[:nll_images], device, seed))
    if per_class:
        samples, labels = eval_samples(config, vae, unet, per_class, sampler, steps, guidance, seed, guidance_rescale)
        # samples come at the data's own size: the real images are measured at that size too
        train_x, test_x = (center_crop(x, config.output_size) for x in (train_x, test_x))
        result.update(class_fidelity(samples, labels, train_x, train_y, test_x, test_y))
        result["sampler"] = f"{sampler} {steps} steps, guidance {guidance if k else 'none'}"
        result.update({"quality_sampler": sampler, "quality_steps": steps, "quality_guidance": guidance,
                       "quality_guidance_rescale": guidance_rescale if k else 0.0})
        result.update(sample_quality(samples, labels, train_x, train_y, test_x, test_y, k))
    return result
