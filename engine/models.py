"""The networks: a convolutional VAE (stage 1) and a class-conditional U-Net denoiser (stage 2).

Both are plain ``nn.Module``s with explicit constructor arguments (``from_config`` builds them from
``engine.config``), NCHW tensors, GroupNorm + SiLU residual blocks. Forward passes have no Python control
flow on tensor values, so they trace and export (torch.export / the dynamo ONNX exporter).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig, VAEConfig


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the math timesteps ``t`` (B,) → (B, dim) float32: [cos(t·f_i), sin(t·f_i)],
    f_i = max_period^(−i/(dim/2)), i = 0..dim/2−1."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / half))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, (+ embedding), GroupNorm → SiLU → dropout → conv (zero-init), plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int = 0, dropout: float = 0.0,
                 groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_channels, out_channels) if emb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions, residual, output projection zero-init.

    Computed channel-major, softmax(qᵀk/√d) then v·weightsᵀ on (B, heads, d, HW) views, so neither torch nor
    the exported ONNX graph copies a tensor into (B, heads, HW, d) and back (the Transpose nodes that
    ``F.scaled_dot_product_attention`` exports cost ONNX Runtime 25% of the demo U-Net's time). The (HW, HW)
    weights are materialised: fine at the presets' attention levels (≤ 16 positions)."""

    def __init__(self, channels: int, num_heads: int, groups: int = 8):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.num_heads
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, d, h * w).unbind(1)  # (B, heads, d, HW)
        weights = torch.softmax((q * d**-0.5).transpose(-1, -2) @ k, dim=-1)  # (B, heads, HW, HW)
        return x + self.proj((v @ weights.transpose(-1, -2)).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAE(nn.Module):
    """Encoder x (B, in, H, W) → (mean, logvar) of q(z|x), each (B, latent, H/f, W/f), f = 2^(levels−1);
    decoder z → image. ``likelihood`` "gaussian": the decoder output is the mean of p(x|z);
    "bernoulli": it is the logits of the pixel intensities (x + 1)/2."""

    def __init__(self, in_channels: int, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 latent_channels: int, groups: int, likelihood: str):
        super().__init__()
        self.likelihood = likelihood
        chans = [base_channels * m for m in channel_mult]
        enc: list[nn.Module] = [nn.Conv2d(in_channels, chans[0], 3, padding=1)]
        ch = chans[0]
        for level, out in enumerate(chans):
            for _ in range(num_res_blocks):
                enc.append(ResBlock(ch, out, groups=groups))
                ch = out
            if level < len(chans) - 1:
                enc.append(Downsample(ch))
        enc += [ResBlock(ch, ch, groups=groups), nn.GroupNorm(groups, ch), nn.SiLU(),
                nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, ch, 3, padding=1), ResBlock(ch, ch, groups=groups)]
        for level in reversed(range(len(chans))):
            for _ in range(num_res_blocks):
                dec.append(ResBlock(ch, chans[level], groups=groups))
                ch = chans[level]
            if level > 0:
                dec.append(Upsample(ch))
        dec += [nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @classmethod
    def from_config(cls, cfg: VAEConfig) -> VAE:
        return cls(cfg.in_channels, cfg.base_channels, tuple(cfg.channel_mult), cfg.num_res_blocks,
                   cfg.latent_channels, cfg.groups, cfg.likelihood)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of q(z|x); logvar clamped to [−30, 20] as in the LDM autoencoder."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_params(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's raw output: the Gaussian mean, or the Bernoulli logits."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The image in [−1, 1] units (the mean of p(x|z)); not clamped."""
        out = self.decoder(z)
        return 2.0 * torch.sigmoid(out) - 1.0 if self.likelihood == "bernoulli" else out

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """Training pass: z = mean + exp(logvar/2)·noise (noise ~ N(0, I) drawn if None);
        returns (decode_params(z), mean, logvar)."""
        mean, logvar = self.encode(x)
        if noise is None:
            noise = torch.randn_like(mean)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.decode_params(z), mean, logvar


class _Block(nn.Module):
    """A U-Net stage block: ResBlock, then self-attention when asked."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float, groups: int,
                 num_heads: int, attention: bool):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_channels, dropout, groups)
        self.attn = SelfAttention(out_channels, num_heads, groups) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """Denoiser ``forward(x_t, t, y=None) -> prediction`` on latents (B, C, H, W), t the math timestep
    (B,) int64, y class labels (B,) int64 in 0..num_classes (num_classes = the null class; y=None means
    the null class). ``channel_mult`` gives len−1 downsamplings: one or two suit 8×8 latents."""

    def __init__(self, in_channels: int, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 attention_levels: tuple[int, ...], num_heads: int, num_classes: int, dropout: float, groups: int):
        super().__init__()
        self.num_classes = num_classes
        self.base_channels = base_channels
        emb = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_emb = nn.Embedding(num_classes + 1, emb) if num_classes > 0 else None
        chans = [base_channels * m for m in channel_mult]
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        ch, skips = chans[0], [chans[0]]
        self.down = nn.ModuleList()
        for level, out in enumerate(chans):
            for _ in range(num_res_blocks):
                self.down.append(_Block(ch, out, emb, dropout, groups, num_heads, level in attention_levels))
                ch = out
                skips.append(ch)
            if level < last:
                self.down.append(Downsample(ch))
                skips.append(ch)
        self.mid = nn.ModuleList([_Block(ch, ch, emb, dropout, groups, num_heads, last in attention_levels),
                                  _Block(ch, ch, emb, dropout, groups, num_heads, False)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(chans))):
            for _ in range(num_res_blocks + 1):
                self.up.append(_Block(ch + skips.pop(), chans[level], emb, dropout, groups, num_heads,
                                      level in attention_levels))
                ch = chans[level]
            if level > 0:
                self.up.append(Upsample(ch))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), _zero(nn.Conv2d(ch, in_channels, 3, padding=1)))

    @classmethod
    def from_config(cls, cfg: UNetConfig) -> UNet:
        return cls(cfg.in_channels, cfg.base_channels, tuple(cfg.channel_mult), cfg.num_res_blocks,
                   tuple(cfg.attention_levels), cfg.num_heads, cfg.num_classes, cfg.dropout, cfg.groups)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_emb(y)
        elif y is not None:
            raise ValueError("y must be None for an unconditional U-Net (num_classes = 0)")
        h = self.conv_in(x)
        hs = [h]
        for module in self.down:
            h = module(h, emb) if isinstance(module, _Block) else module(h)
            hs.append(h)
        for module in self.mid:
            h = module(h, emb)
        for module in self.up:
            h = module(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(module, _Block) else module(h)
        return self.out(h)
