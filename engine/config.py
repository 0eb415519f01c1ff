"""Configuration: plain dataclasses saved into the checkpoint, and the named presets.

Every field is a plain type (int, float, str, bool, tuple of ints, dict, or None), so ``to_dict()`` gives
a structure that ``torch.load(..., weights_only=True)`` reads back, and ``from_dict`` rebuilds the
dataclass, refusing unknown or missing keys and wrong types with a ValueError that names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ldmkit.common import MAX_T, from_dict, to_plain
from ldmkit.reference.posterior import PREDICTIONS
from ldmkit.reference.schedules import SCHEDULE_NAMES, Schedule

LIKELIHOODS = ("gaussian", "bernoulli")
PRECISIONS = ("fp32", "bf16")

# Bounds checked before anything is built (README, "Reliability and limits"); MAX_T lives in ldmkit.common.
MAX_IMAGE_SIZE = 1024
MAX_CHANNELS = 4096  # base_channels · each channel_mult entry
MAX_LEVELS = 6  # len(channel_mult)
MAX_BLOCKS = 16  # num_res_blocks
MAX_CLASSES = 100_000
MAX_STEPS = 10**9  # every step count, and a checkpoint's step
MAX_BATCH = 65_536
MAX_SEED = 2**63 - 1
GRID_PER_CLASS = 8  # images of each class in a training sample grid (train.sample_every)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_range(obj, lo, hi, *names: str) -> None:
    """Each named field in [lo, hi]; NaN and ±inf fail (every comparison with NaN is False)."""
    for name in names:
        value = getattr(obj, name)
        _require(lo <= value <= hi, f"{type(obj).__name__}.{name} must be in [{lo}, {hi}], got {value}")


def _check_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{type(obj).__name__}.{name} must be > 0, got {value}")


def _check_channels(obj, base: int, mult: tuple[int, ...], groups: int) -> None:
    name = type(obj).__name__
    _require(1 <= len(mult) <= MAX_LEVELS and all(m >= 1 for m in mult),
             f"{name}.channel_mult must be a tuple of 1..{MAX_LEVELS} ints >= 1, got {mult}")
    _require(base * max(mult) <= MAX_CHANNELS,
             f"{name}: channels base_channels*mult = {base * max(mult)} must be at most {MAX_CHANNELS}")
    for m in mult:
        _require(base * m % groups == 0,
                 f"{name}: channels base_channels*mult = {base * m} must be divisible by groups = {groups}")


@dataclass
class VAEConfig:
    """The stage-1 autoencoder; downsampling factor f = 2^(len(channel_mult) − 1).

    ``likelihood`` is the decoder's p(x|z): "gaussian" with the fixed log-variance ``recon_logvar`` (the
    ``recon_logvar`` of ``reference.losses.vae_loss``: MSE up to scale), or "bernoulli" (the decoder gives
    logits of the pixel intensities (x + 1)/2 in [0, 1]; ``recon_logvar`` is unused).
    """

    in_channels: int = 1
    image_size: int = 32
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    latent_channels: int = 4
    groups: int = 8
    likelihood: str = "gaussian"
    recon_logvar: float = -4.0

    def __post_init__(self):
        _check_positive(self, "in_channels", "image_size", "base_channels", "num_res_blocks", "latent_channels",
                        "groups")
        _check_range(self, 1, 4, "in_channels")
        _check_range(self, 1, MAX_IMAGE_SIZE, "image_size")
        _check_range(self, 1, MAX_CHANNELS, "base_channels", "latent_channels", "groups")
        _check_range(self, 1, MAX_BLOCKS, "num_res_blocks")
        _check_range(self, -30.0, 30.0, "recon_logvar")
        _check_channels(self, self.base_channels, self.channel_mult, self.groups)
        _require(self.image_size % self.downsampling == 0,
                 f"VAEConfig.image_size = {self.image_size} must be divisible by the downsampling factor "
                 f"{self.downsampling} (2^(len(channel_mult) - 1))")
        _require(self.likelihood in LIKELIHOODS,
                 f"VAEConfig.likelihood must be one of {list(LIKELIHOODS)}, got {self.likelihood!r}")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.downsampling
        return (self.latent_channels, side, side)


@dataclass
class UNetConfig:
    """The latent denoiser. ``attention_levels`` are indices into ``channel_mult`` (0 = full latent
    resolution) whose blocks get self-attention; the middle block has attention when the deepest level
    does. ``num_classes`` = 0 is unconditional; otherwise class ``num_classes`` is the null class."""

    in_channels: int = 4
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (1,)
    num_heads: int = 4
    num_classes: int = 10
    dropout: float = 0.0
    groups: int = 8

    def __post_init__(self):
        _check_positive(self, "in_channels", "base_channels", "num_res_blocks", "num_heads", "groups")
        _check_range(self, 1, MAX_CHANNELS, "in_channels", "base_channels", "num_heads", "groups")
        _check_range(self, 1, MAX_BLOCKS, "num_res_blocks")
        _check_range(self, 0, MAX_CLASSES, "num_classes")
        _check_channels(self, self.base_channels, self.channel_mult, self.groups)
        _require(self.base_channels % 2 == 0, f"UNetConfig.base_channels must be even, got {self.base_channels}")
        levels = len(self.channel_mult)
        _require(all(0 <= a < levels for a in self.attention_levels),
                 f"UNetConfig.attention_levels must be in 0..{levels - 1}, got {self.attention_levels}")
        for a in self.attention_levels:
            ch = self.base_channels * self.channel_mult[a]
            _require(ch % self.num_heads == 0,
                     f"UNetConfig: {ch} channels at attention level {a} are not divisible by "
                     f"num_heads = {self.num_heads}")
        _require(self.num_classes >= 0, f"UNetConfig.num_classes must be >= 0, got {self.num_classes}")
        _require(0.0 <= self.dropout < 1.0, f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass
class DiffusionConfig:
    """The forward process and the U-Net's objective: a named schedule of ``reference.schedules.Schedule.named``
    with T steps, rescaled to zero terminal SNR (R2) when ``zero_terminal_snr``; what the U-Net predicts;
    and its loss weighting: ``min_snr_gamma`` None for the plain MSE in the prediction's own space (L4/L5),
    or γ > 0 for Min-SNR-γ weights (R1, γ = 5 in the paper)."""

    schedule: str = "linear"
    T: int = 1000
    prediction: str = "eps"
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None

    def __post_init__(self):
        _require(self.schedule in SCHEDULE_NAMES,
                 f"DiffusionConfig.schedule must be one of {list(SCHEDULE_NAMES)}, got {self.schedule!r}")
        _check_range(self, 1, MAX_T, "T")
        _require(self.prediction in PREDICTIONS,
                 f"DiffusionConfig.prediction must be one of {list(PREDICTIONS)}, got {self.prediction!r}")
        _require(isinstance(self.zero_terminal_snr, bool),
                 f"DiffusionConfig.zero_terminal_snr must be true or false, got {self.zero_terminal_snr!r}")
        _require(not (self.zero_terminal_snr and self.prediction == "eps"),
                 "DiffusionConfig: zero_terminal_snr needs prediction 'v' or 'x0': at t = T the schedule has "
                 "alpha_bar = 0, where an eps-model's x0 = (x_T - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) "
                 "divides by zero (diffusers lets it, and samples NaN)")
        _require(not (self.zero_terminal_snr and self.T < 2), "DiffusionConfig: zero_terminal_snr needs T >= 2")
        _require(self.min_snr_gamma is None or self.min_snr_gamma > 0,
                 f"DiffusionConfig.min_snr_gamma must be > 0 (Min-SNR-gamma) or null (uniform), "
                 f"got {self.min_snr_gamma!r}")

    def make_schedule(self) -> Schedule:
        """The reference schedule this config describes (float64 tables, math-indexed)."""
        return Schedule.named(self.schedule, self.T, zero_terminal_snr=self.zero_terminal_snr)


@dataclass
class TrainConfig:
    """Both training stages: VAE (``vae_*``, ``kl_weight``) then U-Net (the rest). Steps are optimizer steps."""

    seed: int = 0
    vae_steps: int = 1000
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    unet_steps: int = 5000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_drop_prob: float = 0.1
    weight_decay: float = 0.0
    sample_every: int = 0
    checkpoint_every: int = 1000
    log_every: int = 50
    precision: str = "fp32"
    compile: bool = False

    def __post_init__(self):
        _check_positive(self, "vae_batch_size", "vae_lr", "batch_size", "lr", "grad_clip")
        for name in ("seed", "vae_steps", "unet_steps", "warmup_steps", "sample_every", "checkpoint_every",
                     "log_every", "kl_weight", "weight_decay"):
            _require(getattr(self, name) >= 0, f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        _check_range(self, 0, MAX_SEED, "seed")
        _check_range(self, 0, MAX_STEPS, "vae_steps", "unet_steps", "warmup_steps", "sample_every",
                     "checkpoint_every", "log_every")
        _check_range(self, 1, MAX_BATCH, "vae_batch_size", "batch_size")
        _check_range(self, 0.0, 10.0, "vae_lr", "lr", "weight_decay")  # > 0 for the rates: checked above
        _check_range(self, 0.0, 1e6, "kl_weight", "grad_clip")
        _require(0.0 <= self.ema_decay < 1.0, f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        _require(0.0 <= self.cond_drop_prob < 1.0,
                 f"TrainConfig.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        _require(self.precision in PRECISIONS,
                 f"TrainConfig.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")


@dataclass
class Config:
    """Everything a run needs. ``data`` is the dataset description of ``engine.data.load_dataset`` (training
    records its ``content_size`` [height, width], the data's own size before padding to ``vae.image_size``,
    at which sampling returns images: ``output_size``); ``latent_shape`` (C, H, W) and ``latent_scale`` (1/std
    of the cached latents) are filled in after stage 1."""

    data: dict = field(default_factory=lambda: {"spec": "mnist"})
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    latent_shape: tuple[int, ...] | None = None
    latent_scale: float | None = None

    def __post_init__(self):
        _require(self.unet.in_channels == self.vae.latent_channels,
                 f"Config: unet.in_channels = {self.unet.in_channels} must equal vae.latent_channels = "
                 f"{self.vae.latent_channels}")
        side = self.vae.latent_shape[1]
        _require(side % self.unet.downsampling == 0,
                 f"Config: the {side}x{side} latent is not divisible by the U-Net's downsampling factor "
                 f"{self.unet.downsampling}; use fewer unet.channel_mult levels")
        _require(self.latent_shape is None or tuple(self.latent_shape) == self.vae.latent_shape,
                 f"Config.latent_shape = {self.latent_shape} does not match the VAE's {self.vae.latent_shape}")
        _require(self.latent_scale is None or 1e-6 <= self.latent_scale <= 1e6,
                 f"Config.latent_scale must be in [1e-06, 1000000.0] (1/std of the latents), got {self.latent_scale}")
        _require(isinstance(self.data.get("spec"), str),
                 f"Config.data must hold 'spec', a string (the dataset: 'mnist' or a path), got {self.data!r:.80}")
        size, s = self.data.get("content_size"), self.vae.image_size
        _require(size is None or (isinstance(size, (list, tuple)) and len(size) == 2
                                  and all(type(v) is int and 1 <= v <= s for v in size)),
                 f"Config.data.content_size must be [height, width], ints in 1..{s} (vae.image_size), got {size!r}")

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the images sampling returns: ``data.content_size`` (the centred window of the
        image_size×image_size images the VAE works at, ``engine.data.center_crop``), or (image_size, image_size)
        for a config without it (a checkpoint written before ldmkit recorded it: no crop)."""
        size = self.data.get("content_size")
        return (self.vae.image_size,) * 2 if size is None else (size[0], size[1])

    def to_dict(self) -> dict:
        """Plain nested dict (tuples become lists) for the checkpoint."""
        return to_plain(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """Inverse of ``to_dict``; ValueError naming any unknown, missing or mistyped key. A config written
        before ``diffusion.zero_terminal_snr`` and ``diffusion.min_snr_gamma`` existed is read with them
        as they behaved then (``DIFFUSION_BEFORE_REFINEMENTS``)."""
        if isinstance(d, dict) and isinstance(d.get("diffusion"), dict):
            d = {**d, "diffusion": {**DIFFUSION_BEFORE_REFINEMENTS, **d["diffusion"]}}
        return from_dict(cls, d, "config")


DIFFUSION_BEFORE_REFINEMENTS = {"zero_terminal_snr": False, "min_snr_gamma": None}
"""The diffusion options added by the refinements (issue 10), at the values that reproduce older checkpoints."""


def _demo() -> Config:
    """Built-in digits on a 2-core CPU in about 8 minutes (482 s measured): VAE 330 steps (~45 s, 3 epochs of the 7,000
    training digits) → 4×8×8 latents; U-Net 1,500 steps of 128 predicting v (R5; ~420 s, 0.28 s/step); the
    default sampler (DPM-Solver++(2M), 10 steps, CFG 1.15) for 80 digits ~4 s with start-up. Measured on an idle
    2-core CPU with torch.set_num_threads(2). BENCHMARKS.md, "Training recipes", compares it with the recipe it
    replaced (ε-prediction, 1,000 U-Net steps: ``examples/configs/demo-eps.json``) and the other refinements."""
    return Config(
        vae=VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, groups=8,
                      likelihood="gaussian", recon_logvar=-4.0),
        unet=UNetConfig(base_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=4,
                        num_classes=10, dropout=0.0, groups=8),
        diffusion=DiffusionConfig(schedule="linear", T=1000, prediction="v"),
        train=TrainConfig(seed=0, vae_steps=330, vae_batch_size=64, vae_lr=2e-3, kl_weight=1e-2, unet_steps=1500,
                          batch_size=128, lr=2e-3, warmup_steps=100, grad_clip=1.0, ema_decay=0.995,
                          cond_drop_prob=0.1, weight_decay=0.0, sample_every=0, checkpoint_every=500, log_every=50,
                          precision="fp32", compile=False))


def _small() -> Config:
    """A GPU run of about an hour: wider networks, two downsamplings of the 8×8 latent, bf16."""
    return Config(
        vae=VAEConfig(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, latent_channels=4),
        unet=UNetConfig(base_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                        num_heads=4, dropout=0.1),
        train=TrainConfig(vae_steps=5000, vae_batch_size=128, vae_lr=1e-3, kl_weight=1e-2, unet_steps=30000,
                          batch_size=256, lr=5e-4, warmup_steps=500, ema_decay=0.9995, sample_every=2000,
                          checkpoint_every=2000, log_every=100, precision="bf16"))


def _base() -> Config:
    """A longer GPU run: the widest networks here, bf16."""
    return Config(
        vae=VAEConfig(base_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2, latent_channels=4),
        unet=UNetConfig(base_channels=192, channel_mult=(1, 2, 3), num_res_blocks=2, attention_levels=(1, 2),
                        num_heads=8, dropout=0.1),
        train=TrainConfig(vae_steps=20000, vae_batch_size=128, vae_lr=5e-4, kl_weight=1e-2, unet_steps=100000,
                          batch_size=256, lr=2e-4, warmup_steps=1000, ema_decay=0.9999, sample_every=5000,
                          checkpoint_every=5000, log_every=100, precision="bf16"))


PRESETS = {"demo": _demo, "small": _small, "base": _base}


def preset(name: str) -> Config:
    """A fresh Config for a named preset: 'demo' (2-core CPU, ≤ 10 min), 'small' or 'base' (a GPU)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    return PRESETS[name]()
