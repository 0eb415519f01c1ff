"""Sampling speed, one run: the torch engine (eager), the NumPy + ONNX Runtime runtime and sampler.onnx on the
same checkpoint, steps, batch and noise (DDIM, classifier-free guidance w = 3), and the U-Net call alone
against this machine's measured fp32 matmul rate.

    python benchmarks/sampling.py [--checkpoint runs/demo/checkpoint.pt] [--batch 4,64] [--steps 50] [--threads N]

The checkpoint is exported afresh into a temporary folder, so the figures are those of this code's export.
U-Net FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls; the norms
and activations are not counted). Timings are the best of ``--repeats`` runs after a warm-up, with the median
beside it: the spread and the load average printed at the start and the end show how busy the machine was.

"ceiling" is the most any path could gain over torch: torch's time over the time the run's U-Net FLOPs
(steps × one call on 2n rows) take at the measured matmul rate, with everything else free.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ldmkit.engine.checkpoint import load_checkpoint
from ldmkit.engine.sample import generate, models_from_checkpoint, sample_noise
from ldmkit.export.onnx_export import export_onnx
from ldmkit.export.runtime import OnnxSampler


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(best, median) seconds of ``repeats`` calls after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times)), out


def matmul_rate(repeats: int, n: int = 2048) -> float:
    """The best fp32 GFLOP/s of an n×n matmul, NumPy or torch (whichever is faster here)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    t = torch.from_numpy(a)
    best = min(timed(lambda: a @ a, repeats)[0], timed(lambda: t @ t, repeats)[0])
    return 2 * n**3 / best / 1e9


def sampling_runs(config, vae, unet, runner, n: int, steps: int, guidance, repeats: int):
    """[(path name, timed(...), the torch row's timed(...))] for DDIM on the same n noises through each path."""
    x_T, loop = sample_noise(config, n, steps, seed=0)
    k = config.unet.num_classes
    labels = np.arange(n) % k if k else None
    with torch.inference_mode():
        eager = timed(lambda: generate(config, vae, unet, n, labels, "ddim", steps, 0.0, guidance, noise=(x_T, loop)),
                      repeats)
    python = timed(lambda: runner.sample(n, labels, "ddim", steps, 0.0, guidance, noise=(x_T.numpy(), None)), repeats)
    graph = timed(lambda: runner.sample_graph(n, labels, steps, guidance, noise=(x_T.numpy(), None)), repeats)
    return [("torch engine (eager)", eager, eager), ("ONNX runtime (Python loop)", python, eager),
            ("sampler.onnx (one run)", graph, eager)]


def unet_flops(unet, x, t, y) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(x, t, y)
    return counter.get_total_flops()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint.pt"))
    parser.add_argument("--batch", type=lambda v: [int(b) for b in v.split(",")], default=[4, 64],
                        help="images per sampling run, comma-separated (the U-Net sees 2x with guidance)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: theirs)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"no checkpoint at {args.checkpoint}: this benchmark trains nothing. Train one first "
              "(ldmkit train --out runs/demo) or pass --checkpoint PATH.")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    art = Path(tempfile.mkdtemp(prefix="ldmkit-bench-")) / "onnx"
    print(f"exporting {args.checkpoint} to {art}")
    export_onnx(args.checkpoint, art, steps=args.steps)
    config, vae, unet = models_from_checkpoint(load_checkpoint(args.checkpoint))
    runner = OnnxSampler(art, provider="cpu", threads=args.threads)
    batches, steps, w, k = args.batch, args.steps, args.guidance, config.unet.num_classes
    guidance = w if k else None
    rows = 2 if guidance is not None and guidance != 1.0 else 1  # U-Net rows per image
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
          f"threads {args.threads or 'default'}")
    print(f"model: {args.checkpoint} (latent {tuple(config.latent_shape)}, T = {config.diffusion.T}); "
          f"DDIM-{steps}, guidance {w}, best/median of {args.repeats} runs")

    peak = matmul_rate(args.repeats)
    print(f"fp32 matmul rate (2048², best of NumPy and torch): {peak:.1f} GFLOP/s")
    g = torch.Generator().manual_seed(0)

    def call_inputs(b: int):
        x = torch.randn((b, *config.latent_shape), generator=g)
        t = torch.randint(1, config.diffusion.T + 1, (b,), generator=g)
        return x, t, torch.randint(0, k + 1, (b,), generator=g) if k else None

    print(f"\n{'path':28s} {'images':>6s} {'s/run best':>10s} {'median':>8s} {'images/s':>9s} {'vs torch':>9s} "
          f"{'ceiling':>8s} {'max |Δ| vs torch':>17s}")
    for n in batches:
        run_gflop = steps * unet_flops(unet, *call_inputs(rows * n)) / 1e9
        for name, (best, med, images), ref in sampling_runs(config, vae, unet, runner, n, steps, guidance,
                                                             args.repeats):
            print(f"{name:28s} {n:6d} {best:10.3f} {med:8.3f} {n / best:9.1f} {ref[0] / best:8.2f}x "
                  f"{ref[0] / (run_gflop / peak):7.2f}x {np.abs(images - ref[2]).max():17.1e}")

    print(f"\n{'U-Net call':28s} {'GFLOP':>7s} {'ms best':>8s} {'median':>8s} {'GFLOP/s':>8s} {'of matmul':>9s}")
    for b in sorted({64, *(rows * n for n in batches)}):
        x, t, y = call_inputs(b)
        flops = unet_flops(unet, x, t, y)
        with torch.inference_mode():
            eager = timed(lambda x=x, t=t, y=y: unet(x, t, y), args.repeats * 3)
        ort_call = timed(lambda x=x, t=t, y=y: runner.unet_fn(x.numpy(), t.numpy(), None if y is None else y.numpy()),
                         args.repeats * 3)
        for name, (best, med, _) in ((f"torch eager, batch {b}", eager), (f"onnxruntime, batch {b}", ort_call)):
            rate = flops / best / 1e9
            print(f"{name:28s} {flops / 1e9:7.2f} {best * 1e3:8.1f} {med * 1e3:8.1f} {rate:8.1f} {rate / peak:8.0%}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    shutil.rmtree(art.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
