"""Sampling speed, one run: the torch engine (eager), the NumPy + ONNX Runtime runtime and sampler.onnx (float64
and float32 loop, and an int8 U-Net: ``export onnx --quantize int8``) on the same checkpoint, batch and noise, for
DDIM-50 and the default sampler (DPM-Solver++(2M), 10 steps: the same quality, benchmarks/quality.py), both with
the default guidance; the wall-clock gain of the default over DDIM-50 on every path; and the U-Net call alone
(torch eager; float32 and int8 ONNX on one thread, on ONNX Runtime's intra-op threads, and as the runtime runs
it: row slices on the cores, see ``OnnxSampler``) against this machine's measured fp32 matmul rate, wall clock
and CPU time per call.

    python benchmarks/sampling.py [--checkpoint runs/demo/checkpoint.pt] [--batch 4,64] [--runs ddim:50,dpmpp2m:10]
                                  [--calls 1,2,4,8,16,32,64,128] [--guidance W] [--threads N]
                                  [--quality N]

The checkpoint is exported afresh into a temporary folder, so the figures are those of this code's export.
U-Net FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls; the norms
and activations are not counted); the int8 U-Net's rate is in float32-equivalent FLOPs (the same count over its
time). Timings are the best of ``--repeats`` runs after a warm-up, with the median beside it: the spread and the
load average printed at the start and the end show how busy the machine was. "cpu ms" is the process's CPU
time per call (``time.process_time``, every thread): on a shared machine it is steadier than the wall clock.
The intra-op rows run with spin-waiting off, so their idle workers do not take the cores from the next row.

"ceiling" is the most any path could gain over torch: torch's time over the time the run's U-Net FLOPs
(steps × one call on 2n rows) take at the measured matmul rate, with everything else free.

``--quality N``: N samples of the default sampler through the float32 and the int8 runtime on the same noise,
judged by the project's held-out measure (``engine.evaluate.sample_quality``: needs the checkpoint's dataset),
beside the export's own int8 gate figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from ldmkit.common import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from ldmkit.engine.checkpoint import load_checkpoint
from ldmkit.engine.sample import generate, models_from_checkpoint, sample_noise
from ldmkit.export.onnx_export import export_onnx
from ldmkit.export.runtime import OnnxSampler, session_options


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(best, median) seconds of ``repeats`` calls after one warm-up call, and the last result."""
    best, med, _, out = timed_cpu(fn, repeats)
    return best, med, out


def timed_cpu(fn, repeats: int) -> tuple[float, float, float, object]:
    """(best, median) wall-clock seconds and the median CPU seconds (``time.process_time``) of ``repeats`` calls
    after one warm-up call, and the last result."""
    out = fn()
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(times), float(np.median(times)), float(np.median(cpu)), out


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
    rows = [("torch engine (eager)", eager)]
    for name in ("float64", "int8"):
        rows.append((f"ONNX runtime ({'int8, ' if name == 'int8' else ''}Python loop)",
                     timed(lambda r=runners[name]: r.sample(n, labels, sampler, steps, 0.0, guidance,
                                                            noise=(x_T.numpy(), None)), repeats)))
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint.pt"))
    parser.add_argument("--batch", type=lambda v: [int(b) for b in v.split(",")], default=[4, 64],
                        help="images per sampling run, comma-separated (the U-Net sees 2x with guidance)")
    parser.add_argument("--runs", type=lambda v: [(r.split(":")[0], int(r.split(":")[1])) for r in v.split(",")],
                        default=[("ddim", 50), (DEFAULT_SAMPLER, DEFAULT_STEPS)],
                        help="sampler:steps pairs, comma-separated; the first is the baseline of the gain table "
                             f"(default ddim:50,{DEFAULT_SAMPLER}:{DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's threads and the runtime's cores (default: torch's own, available_cores())")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=lambda v: [int(b) for b in v.split(",")], default=[1, 2, 4, 8, 16, 32, 64, 128],
                        help="U-Net call batch sizes (rows), comma-separated")
    parser.add_argument("--quality", type=int, default=0,
                        help="N samples through float32 and int8 judged by the held-out measure (0: skip)")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"no checkpoint at {args.checkpoint}: this benchmark trains nothing. Train one first "
              "(ldmkit train --out runs/demo) or pass --checkpoint PATH.")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    art = Path(tempfile.mkdtemp(prefix="ldmkit-bench-"))
    print(f"exporting {args.checkpoint} to {art} (float64 and float32 sampler.onnx; int8 U-Net, float32 loop)")
    runners = {}
    for name, precision, quantize in (("float64", "float64", None), ("float32", "float32", None),
                                      ("int8", "float32", "int8")):
        start = time.perf_counter()
        export_onnx(args.checkpoint, art / name, precision=precision, quantize=quantize, log=lambda line: None)
        runners[name] = OnnxSampler(art / name, provider="cpu", threads=args.threads)
        print(f"  {name}: exported in {time.perf_counter() - start:.0f} s, unet.onnx "
              f"{(art / name / 'unet.onnx').stat().st_size / 1e6:.1f} MB")
    gate = json.loads((art / "int8" / "sampler.json").read_text())["quantization"]["quality"]
    print(f"int8 gate (export): shift {gate['shift']:.4f} of float32's noise floor (margin {gate['margin']}), "
          f"excess {gate['excess']:+.4f}, {gate['samples']} samples per set")
    config, vae, unet = models_from_checkpoint(load_checkpoint(args.checkpoint))
    batches, w, k = args.batch, args.guidance, config.unet.num_classes
    guidance = w if k else None
    rows = 2 if guidance is not None and guidance != 1.0 else 1  # U-Net rows per image
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__} ({torch.get_num_threads()} threads), the ONNX "
          f"runtime on {runners['float32'].threads} cores")
    print(f"model: {args.checkpoint} (latent {tuple(config.latent_shape)}, T = {config.diffusion.T}); guidance {w}, "
          f"best/median of {args.repeats} runs")

    peak = matmul_rate(args.repeats)
    print(f"fp32 matmul rate (2048², best of NumPy and torch): {peak:.1f} GFLOP/s")
    g = torch.Generator().manual_seed(0)

    def call_inputs(b: int):
        x = torch.randn((b, *config.latent_shape), generator=g)
        t = torch.randint(1, config.diffusion.T + 1, (b,), generator=g)
        return x, t, torch.randint(0, k + 1, (b,), generator=g) if k else None

    print(f"\n{'path':34s} {'run':>11s} {'images':>6s} {'s/run best':>10s} {'median':>8s} {'images/s':>9s} "
          f"{'vs torch':>9s} {'ceiling':>8s} {'max |Δ| vs torch':>17s}")
    best_of = {}
    for n in batches:
        for sampler, steps in args.runs:
            run_gflop = steps * (2 if sampler == "heun" else 1) * unet_flops(unet, *call_inputs(rows * n)) / 1e9
            results = sampling_runs(config, vae, unet, runners, n, sampler, steps, guidance, args.repeats)
            torch_best, _, torch_images = results[0][1]
            for name, (best, med, images) in results:
                best_of[name, sampler, steps, n] = best
                print(f"{name:34s} {f'{sampler}-{steps}':>11s} {n:6d} {best:10.3f} {med:8.3f} {n / best:9.1f} "
                      f"{torch_best / best:8.2f}x {torch_best / (run_gflop / peak):7.2f}x "
                      f"{np.abs(images - torch_images).max():17.1e}")

    base = args.runs[0]
    print(f"\nwall-clock gain over {base[0]}-{base[1]} (its best time over theirs, same images per run)")
    for name in dict.fromkeys(name for name, *_ in best_of):
        for sampler, steps in args.runs[1:]:
            gains = ", ".join(f"batch {n}: {best_of[name, base[0], base[1], n] / best_of[name, sampler, steps, n]:.2f}x"
                              for n in batches)
            print(f"  {name:34s} {sampler}-{steps}: {gains}")

    print(f"\n{'U-Net call':46s} {'GFLOP':>7s} {'ms best':>8s} {'median':>8s} {'cpu ms':>8s} {'GFLOP/s':>8s} "
          f"{'of matmul':>9s} {'vs f32 ORT':>10s} {'(cpu)':>6s} {'vs torch':>8s} {'(cpu)':>6s}")
    cores = runners["float32"].threads
    intra = {}  # one session, ONNX Runtime's intra-op threads on every core (spin-waiting off, see the docstring)
    for name in ("float32", "int8"):
        opts = session_options(cores)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        intra[name] = ort.InferenceSession(str(art / name / "unet.onnx"), opts, providers=["CPUExecutionProvider"])
    single = {name: OnnxSampler(art / name, provider="cpu", threads=1) for name in ("float32", "int8")}
    settings = {"1 thread": lambda name, f: single[name].unet_fn(*f),
                f"intra-op {cores}": lambda name, f: intra[name].run(None, {
                    key: v for key, v in zip(("x_t", "t", "y"), f, strict=True) if v is not None}),
                f"{cores} slices": lambda name, f: runners[name].unet_fn(*f)}
    for b in args.calls:
        x, t, y = call_inputs(b)
        flops = unet_flops(unet, x, t, y)
        reps = max(3, args.repeats * 3)
        with torch.inference_mode():
            results = [(f"torch eager ({torch.get_num_threads()} thr)", timed_cpu(lambda x=x, t=t, y=y: unet(x, t, y),
                                                                                    reps))]
        feeds = (x.numpy(), t.numpy(), None if y is None else y.numpy())
        for setting, run in settings.items():
            for name in ("float32", "int8"):
                results.append((f"onnxruntime {name} ({setting})",
                                timed_cpu(lambda run=run, name=name, feeds=feeds: run(name, feeds), reps)))
        torch_med, torch_cpu = results[0][1][1], results[0][1][2]
        f32 = {}
        for name, (best, med, cpu, _) in results:
            rate = flops / best / 1e9
            setting = name.split("(")[1]
            if "float32" in name:
                f32[setting] = (med, cpu)
            ref = f32.get(setting) if "int8" in name else None
            vs_f32 = f"{ref[0] / med:9.2f}x {ref[1] / cpu:5.2f}x" if ref else f"{'':10s} {'':6s}"
            print(f"{name + f', batch {b}':46s} {flops / 1e9:7.2f} {best * 1e3:8.1f} {med * 1e3:8.1f} {cpu * 1e3:8.1f} "
                  f"{rate:8.1f} {rate / peak:8.0%} {vs_f32} {torch_med / med:7.2f}x {torch_cpu / cpu:5.2f}x")
    if args.quality:
        from ldmkit.engine.data import center_crop, load_dataset
        from ldmkit.engine.evaluate import sample_quality

        n = args.quality
        x_T = np.random.default_rng(0).standard_normal((n, *config.latent_shape), dtype=np.float32)
        labels = np.arange(n) % k if k else None
        size = config.vae.image_size
        train_x, train_y, _ = load_dataset(config.data["spec"], "train", size, k or None)
        test_x, test_y, _ = load_dataset(config.data["spec"], "test", size, k or None)
        train_x, test_x = (center_crop(v, config.output_size) for v in (train_x, test_x))
        print(f"\nheld-out quality, {n} samples, {DEFAULT_SAMPLER}-{DEFAULT_STEPS}, guidance {guidance}, same noise")
        images = {}
        for name in ("float32", "int8"):
            images[name] = runners[name].sample(n, labels, DEFAULT_SAMPLER, DEFAULT_STEPS, 0.0, guidance,
                                                noise=(x_T, None))
            q = sample_quality(images[name], labels, train_x, train_y, test_x, test_y, k or None)
            print(f"  {name:8s} Frechet ratio {q['quality_fd_ratio']:.3f} (FD {q['quality_fd']:.3f}, floor "
                  f"{q['quality_fd_floor']:.3f}), accuracy {q['quality_accuracy']}")
        diff = np.abs(images["int8"] - images["float32"])
        print(f"  int8 vs float32 on the same noise: max pixel change {diff.max():.3f}, mean {diff.mean():.4f}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    shutil.rmtree(art)
    return 0


if __name__ == "__main__":
    sys.exit(main())
