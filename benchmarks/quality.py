"""Sample quality against U-Net calls: every sampler of ``ldmkit.reference.samplers.SAMPLERS`` at several step
counts and classifier-free guidance weights, on one checkpoint, judged by ``ldmkit.engine.quality`` against
the held-out test split (the classifier's accuracy on the classes asked for; the Fréchet distance (Q2) in its
features as a ratio to the real-vs-real floor, lower is better).

    python benchmarks/quality.py [--checkpoint runs/demo/checkpoint.pt] [--samples 500] [--steps 5,10,15,20,50]
                                 [--guidance 1,2,3] [--samplers ddim,ddpm,heun,dpmpp2m] [--seed 0] [--json out.json]

Every configuration samples the same classes (samples/10 of each) from the same x_T (the engine's noise for
``--seed``; DDPM's per-step noise follows x_T in the same generator), so the rows differ by the sampler, the
steps and the guidance only, and one classifier (trained once, on the training split) judges them all. "calls"
counts U-Net evaluations per image, ``SAMPLERS[name].model_calls(steps)``; with guidance w ≠ 1 each is one call
on a doubled batch (conditional and null rows). The end of the output names, for each guidance and overall, the
configuration with the fewest calls that reaches DDIM-50's quality: an FD ratio at most ``--fd-slack`` times
DDIM-50's (at the same guidance; then at any guidance against today's default, DDIM-50 with guidance 3) and an
accuracy at least DDIM-50's less ``--acc-slack``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ldmkit.common import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from ldmkit.engine import quality
from ldmkit.engine.checkpoint import load_checkpoint
from ldmkit.engine.data import center_crop, load_dataset
from ldmkit.engine.sample import generate, models_from_checkpoint, sample_noise
from ldmkit.reference.samplers import SAMPLERS

NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "heun": "Heun", "dpmpp2m": "DPM-Solver++(2M)"}
HEADER = ("| sampler | steps | U-Net calls | guidance | accuracy | FD | FD ratio | s |\n"
          "|---|---|---|---|---|---|---|---|")


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def sample_set(config, vae, unet, labels, sampler: str, steps: int, guidance: float, seed: int, batch: int,
               guidance_rescale: float = 0.0):
    """Samples (n, C, H, W) in [0, 1] for ``labels``, from the noise of ``sample_noise(config, n, steps, seed)``
    (x_T drawn first, so it is the same for every sampler and step count), in batches of ``batch``; guidance w
    and its rescale φ (R3)."""
    n = len(labels)
    x_T, loop = sample_noise(config, n, steps, seed)
    out = []
    with torch.inference_mode():
        for i in range(0, n, batch):
            part = slice(i, min(i + batch, n))
            out.append(generate(config, vae, unet, part.stop - part.start, labels[part], sampler, steps,
                                guidance=guidance, noise=(x_T[part], loop[:, part]),
                                guidance_rescale=guidance_rescale))
    return np.concatenate(out)


def cheapest(rows: list[dict], target: dict, fd_slack: float, acc_slack: float) -> dict:
    """The row with the fewest calls (then the lowest FD ratio) that reaches ``target``'s quality (``target``
    is one of ``rows``, so there is one when the slacks are >= 1 and >= 0)."""
    good = [r for r in rows if r["fd_ratio"] <= fd_slack * target["fd_ratio"]
            and r["accuracy"] >= target["accuracy"] - acc_slack]
    return min(good, key=lambda r: (r["calls"], r["fd_ratio"])) if good else None


def row_line(row: dict) -> str:
    return (f"| {NAMES.get(row['sampler'], row['sampler'])} | {row['steps']} | {row['calls']} | {row['guidance']:g} "
            f"| {row['accuracy']:.3f} | {row['fd']:.2f} | {row['fd_ratio']:.2f} | {row['seconds']:.1f} |")


def measure_all(args) -> tuple[list[dict], dict]:
    """Sample and measure every configuration, printing each row as it is done; (rows, facts of the run)."""
    config, vae, unet = models_from_checkpoint(load_checkpoint(args.checkpoint), "cpu")
    k = config.unet.num_classes
    if not k or args.samples % k:
        raise SystemExit(f"needs a class-conditional checkpoint and --samples a multiple of its {k} classes")
    spec, size = config.data["spec"], config.vae.image_size
    train_x, train_y, _ = load_dataset(spec, "train", size, k)
    test_x, test_y, _ = load_dataset(spec, "test", size, k)
    train_x, test_x = (center_crop(x, config.output_size) for x in (train_x, test_x))  # the samples' size
    reference = quality.build_reference((train_x + 1) / 2, train_y, (test_x + 1) / 2, test_y, k)
    floor, floor_images, floor_sets = quality.fd_floor(reference, args.samples)
    print(f"# classifier: trained in {reference.train_seconds:.1f} s on {len(train_x)} training images, "
          f"accuracy {reference.held_out_accuracy:.3f} on the {len(test_x)} held-out ones; FD floor "
          f"{floor:.3f} ({floor_sets} sets of {floor_images} training images vs the held-out split)", flush=True)
    labels = np.repeat(np.arange(k), args.samples // k)
    rows = []
    print(HEADER, flush=True)
    for guidance in args.guidance:
        for name in args.samplers:
            for steps in args.steps:
                t0 = time.perf_counter()
                samples = sample_set(config, vae, unet, labels, name, steps, guidance, args.seed, args.batch)
                seconds = time.perf_counter() - t0
                m = quality.measure(reference, samples, labels)
                rows.append({"sampler": name, "steps": steps, "calls": SAMPLERS[name].model_calls(steps),
                             "guidance": guidance, "accuracy": m["quality_accuracy"], "fd": m["quality_fd"],
                             "fd_ratio": m["quality_fd_ratio"], "seconds": seconds})
                print(row_line(rows[-1]), flush=True)
    facts = {"checkpoint": str(args.checkpoint), "samples": args.samples, "seed": args.seed, "fd_floor": floor,
             "classifier_accuracy": reference.held_out_accuracy, "classifier_seconds": reference.train_seconds}
    return rows, facts


def summarize(rows: list[dict], fd_slack: float, acc_slack: float) -> None:
    """Print, for each guidance with a DDIM-50 row and against today's default, the cheapest row that reaches it."""
    print(f"\nreaching DDIM-50's quality (FD ratio <= {fd_slack:g} x DDIM-50's, accuracy >= DDIM-50's "
          f"- {acc_slack:g}) with the fewest U-Net calls:")
    for guidance in sorted({r["guidance"] for r in rows}):
        at_g = [r for r in rows if r["guidance"] == guidance]
        target = next((r for r in at_g if r["sampler"] == "ddim" and r["steps"] == 50), None)
        if target is None:
            continue
        best = cheapest(at_g, target, fd_slack, acc_slack)  # DDIM-50 itself at worst
        print(f"  guidance {guidance:g}: DDIM-50 accuracy {target['accuracy']:.3f}, FD ratio {target['fd_ratio']:.2f}"
              f" -> {NAMES.get(best['sampler'], best['sampler'])} {best['steps']} steps ({best['calls']} calls): "
              f"accuracy {best['accuracy']:.3f}, FD ratio {best['fd_ratio']:.2f}")
    default = next((r for r in rows if (r["sampler"], r["steps"], r["guidance"])
                    == (DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE)), None)
    if default is not None:
        best = cheapest(rows, default, fd_slack, acc_slack)
        print(f"  any guidance, against today's default ({DEFAULT_SAMPLER} {DEFAULT_STEPS} steps, guidance "
              f"{DEFAULT_GUIDANCE:g}: accuracy {default['accuracy']:.3f}, FD ratio {default['fd_ratio']:.2f}) -> "
              f"{NAMES.get(best['sampler'], best['sampler'])} {best['steps']} steps, guidance {best['guidance']:g} "
              f"({best['calls']} calls): accuracy {best['accuracy']:.3f}, FD ratio {best['fd_ratio']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint.pt"))
    parser.add_argument("--samples", type=int, default=500, help="samples per configuration (a multiple of 10)")
    parser.add_argument("--steps", type=ints, default=[5, 10, 15, 20, 50])
    parser.add_argument("--guidance", type=floats, default=[1.0, 2.0, 3.0])
    parser.add_argument("--samplers", type=lambda t: t.split(","), default=list(SAMPLERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=100, help="images per generate call")
    parser.add_argument("--fd-slack", type=float, default=1.0, help="FD ratio at most this times DDIM-50's")
    parser.add_argument("--acc-slack", type=float, default=0.01,
                        help="accuracy at least DDIM-50's less this (0.01: two standard errors of the difference "
                             "of two accuracies near 0.99 at 500 samples)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--rows", type=Path, default=None,
                        help="print the table and the summary of a --json file instead of sampling")
    args = parser.parse_args()

    if args.rows is not None:
        saved = json.loads(args.rows.read_text())
        print(f"# {args.rows}: {saved['facts']}")
        print(HEADER)
        for row in saved["rows"]:
            print(row_line(row))
        summarize(saved["rows"], args.fd_slack, args.acc_slack)
        return
    start = time.perf_counter()
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows, facts = measure_all(args)
    summarize(rows, args.fd_slack, args.acc_slack)
    print(f"# total {time.perf_counter() - start:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
