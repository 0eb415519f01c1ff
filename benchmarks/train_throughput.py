"""Training throughput of the engine, side by side in one process: images/s of a VAE step and of a U-Net
step (forward, backward, AdamW update) for a preset, and the fraction of this machine's measured matmul
rate that a step achieves (FLOPs counted with torch.utils.flop_counter; forward + backward).

    python benchmarks/train_throughput.py [--preset demo] [--device cpu|cuda] [--precision fp32|bf16] [--compile]

The matmul rate is measured here, in this process, with square float32 matmuls (bf16 when asked), the
best of several sizes. On CUDA the script synchronises around each timed region.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldmkit.engine import diffusion as D
from ldmkit.engine.config import preset
from ldmkit.engine.models import VAE, UNet
from ldmkit.engine.train import vae_loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype, seconds: float = 2.0) -> float:
    """Best FLOP/s of a square matmul over a few sizes."""
    best = 0.0
    for n in (512, 1024, 2048, 4096 if device.type == "cuda" else 1536):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 4:
            a @ b
            reps += 1
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def time_step(step, device, warmup: int = 3, seconds: float = 5.0) -> float:
    """Mean seconds per call of step() after warm-up."""
    for _ in range(warmup):
        step()
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        reps += 1
    sync(device)
    return (time.perf_counter() - t0) / reps


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = preset(args.preset)
    tc = cfg.train
    torch.manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_rate(device, dtype)

    vae = VAE.from_config(cfg.vae).to(device)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=tc.vae_lr)
    size = cfg.vae.image_size
    x = torch.rand(tc.vae_batch_size, cfg.vae.in_channels, size, size, device=device) * 2 - 1
    noise = torch.randn(tc.vae_batch_size, *cfg.vae.latent_shape, device=device)

    def vae_step():
        with autocast:
            loss = vae_loss(vae, x, noise, cfg)[0]
        vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        vae_opt.step()

    unet = UNet.from_config(cfg.unet).to(device)
    model = torch.compile(unet) if args.compile else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr)
    schedule = cfg.diffusion.make_schedule()
    B, shape = tc.batch_size, cfg.vae.latent_shape
    z0, eps = torch.randn(B, *shape, device=device), torch.randn(B, *shape, device=device)
    t = torch.randint(1, cfg.diffusion.T + 1, (B,), device=device)
    y = torch.randint(0, cfg.unet.num_classes + 1, (B,), device=device) if cfg.unet.num_classes else None

    def unet_step():
        x_t = D.q_sample(z0, t, eps, schedule)
        with autocast:
            loss = D.mse_per_example(model(x_t, t, y), eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads"))
    print(f"measured {args.precision} matmul rate: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for name, step, batch in (("VAE", vae_step, tc.vae_batch_size), ("U-Net", unet_step, B)):
        flops = count_flops(step)
        sec = time_step(step, device, seconds=args.seconds)
        rows.append((name, batch, flops, sec))
        print(f"{args.preset} {name:5s} step: batch {batch}, {flops / 1e9:.2f} GFLOP, {sec * 1e3:.1f} ms, "
              f"{batch / sec:.0f} images/s, {flops / sec / 1e9:.1f} GFLOP/s = {flops / sec / peak:.1%} "
              f"of the matmul rate" + (" (compiled)" if args.compile and name == "U-Net" else ""))
    (_, _, _, vae_s), (_, _, _, unet_s) = rows
    print(f"demo budget check: {tc.vae_steps} VAE steps ≈ {tc.vae_steps * vae_s:.0f} s, {tc.unet_steps} U-Net steps ≈ "
          f"{tc.unet_steps * unet_s:.0f} s")


if __name__ == "__main__":
    main()
