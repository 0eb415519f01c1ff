"""Sampling speed, one run: the torch engine (eager), the NumPy + ONNX Runtime runtime and sampler.onnx (float64
and float32 loop) on the same checkpoint, batch and noise, for DDIM-50 and the default sampler (DPM-Solver++(2M),
10 steps: the same quality, benchmarks/quality.py), both with the default guidance; the wall-clock gain of the
default over DDIM-50 on every path; and the U-Net call alone against this machine's measured fp32 matmul rate.

    python benchmarks/sampling.py [--checkpoint runs/demo/checkpoint.pt] [--batch 4,64] [--runs ddim:50,dpmpp2m:10]
                                  [--guidance W] [--threads N]

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

from ldmkit.common import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
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


def sampling_runs(config, vae, unet, runners, n: int, sampler: str, steps: int, guidance, repeats: int):
    """[(path name, timed(...))] for ``sampler`` with ``steps`` on the same n noises through each path; the first
    row is the torch engine's, the reference of the others."""
    x_T, loop = sample_noise(config, n, steps, seed=0)
    k = config.unet.num_classes
    labels = np.arange(n) % k if k else None
    with torch.inference_mode():
        eager = timed(lambda: generate(config, vae, unet, n, labels, sampler, steps, 0.0, guidance,
                                       noise=(x_T, loop)), repeats)
    rows = [("torch engine (eager)", eager), ("ONNX runtime (Python loop)",
            timed(lambda: runners["float64"].sample(n, labels, sampler, steps, 0.0, guidance,
                                                    noise=(x_T.numpy(), None)), repeats))]
    for precision, runner in runners.items():
        graph = timed(lambda r=runner: r.sample_graph(n, labels, steps, guidance, noise=(x_T.numpy(), None),
                                                      sampler=sampler), repeats)
        rows.append((f"sampler.onnx ({precision})", graph))
    return rows


def unet_flops(unet, x, t, y) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(x, t, y)
    return counter.get_total_flops()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint.pt"))
    parser.add_argument("--batch", type=lambda v: [int(b) for b in v.split(",")], default=[4, 64],
                        help="images per sampling run, comma-separated (the U-Net sees 2x with guidance)")
    parser.add_argument("--runs", type=lambda v: [(r.split(":")[0], int(r.split(":")[1])) for r in v.split(",")],
                        default=[("ddim", 50), (DEFAULT_SAMPLER, DEFAULT_STEPS)],
                        help="sampler:steps pairs, comma-separated; the first is the baseline of the gain table "
                             f"(default ddim:50,{DEFAULT_SAMPLER}:{DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: theirs)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"no checkpoint at {args.checkpoint}: this benchmark trains nothing. Train one first "
              "(ldmkit train --out runs/demo) or pass --checkpoint PATH.")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    art = Path(tempfile.mkdtemp(prefix="ldmkit-bench-"))
    print(f"exporting {args.checkpoint} to {art} (float64 and float32 sampler.onnx)")
    runners = {}
    for precision in ("float64", "float32"):
        export_onnx(args.checkpoint, art / precision, precision=precision, log=lambda line: None)
        runners[precision] = OnnxSampler(art / precision, provider="cpu", threads=args.threads)
    config, vae, unet = models_from_checkpoint(load_checkpoint(args.checkpoint))
    batches, w, k = args.batch, args.guidance, config.unet.num_classes
    guidance = w if k else None
    rows = 2 if guidance is not None and guidance != 1.0 else 1  # U-Net rows per image
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
          f"threads {args.threads or 'default'}")
    print(f"model: {args.checkpoint} (latent {tuple(config.latent_shape)}, T = {config.diffusion.T}); guidance {w}, "
          f"best/median of {args.repeats} runs")

    peak = matmul_rate(args.repeats)
    print(f"fp32 matmul rate (2048², best of NumPy and torch): {peak:.1f} GFLOP/s")
    g = torch.Generator().manual_seed(0)

    def call_inputs(b: int):
        x = torch.randn((b, *config.latent_shape), generator=g)
        t = torch.randint(1, config.diffusion.T + 1, (b,), generator=g)
        return x, t, torch.randint(0, k + 1, (b,), generator=g) if k else None

    print(f"\n{'path':28s} {'run':>11s} {'images':>6s} {'s/run best':>10s} {'median':>8s} {'images/s':>9s} "
          f"{'vs torch':>9s} {'ceiling':>8s} {'max |Δ| vs torch':>17s}")
    best_of = {}
    for n in batches:
        for sampler, steps in args.runs:
            run_gflop = steps * (2 if sampler == "heun" else 1) * unet_flops(unet, *call_inputs(rows * n)) / 1e9
            results = sampling_runs(config, vae, unet, runners, n, sampler, steps, guidance, args.repeats)
            torch_best, _, torch_images = results[0][1]
            for name, (best, med, images) in results:
                best_of[name, sampler, steps, n] = best
                print(f"{name:28s} {f'{sampler}-{steps}':>11s} {n:6d} {best:10.3f} {med:8.3f} {n / best:9.1f} "
                      f"{torch_best / best:8.2f}x {torch_best / (run_gflop / peak):7.2f}x "
                      f"{np.abs(images - torch_images).max():17.1e}")

    base = args.runs[0]
    print(f"\nwall-clock gain over {base[0]}-{base[1]} (its best time over theirs, same images per run)")
    for name in dict.fromkeys(name for name, *_ in best_of):
        for sampler, steps in args.runs[1:]:
            gains = ", ".join(f"batch {n}: {best_of[name, base[0], base[1], n] / best_of[name, sampler, steps, n]:.2f}x"
                              for n in batches)
            print(f"  {name:28s} {sampler}-{steps}: {gains}")

    unet_onnx = runners["float32"].unet_fn  # unet.onnx: the same file in both artifacts
    print(f"\n{'U-Net call':28s} {'GFLOP':>7s} {'ms best':>8s} {'median':>8s} {'GFLOP/s':>8s} {'of matmul':>9s}")
    for b in sorted({64, *(rows * n for n in batches)}):
        x, t, y = call_inputs(b)
        flops = unet_flops(unet, x, t, y)
        with torch.inference_mode():
            eager = timed(lambda x=x, t=t, y=y: unet(x, t, y), args.repeats * 3)
        ort_call = timed(lambda x=x, t=t, y=y: unet_onnx(x.numpy(), t.numpy(), None if y is None else y.numpy()),
                         args.repeats * 3)
        for name, (best, med, _) in ((f"torch eager, batch {b}", eager), (f"onnxruntime, batch {b}", ort_call)):
            rate = flops / best / 1e9
            print(f"{name:28s} {flops / 1e9:7.2f} {best * 1e3:8.1f} {med * 1e3:8.1f} {rate:8.1f} {rate / peak:8.0%}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    shutil.rmtree(art)
    return 0


if __name__ == "__main__":
    sys.exit(main())
