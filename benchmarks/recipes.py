"""Training recipes at the demo's budget (issue 10, part 3): the demo preset's networks and budget with the
recipe it replaced (ε-prediction, uniform weights: ``eps``) and each refinement of docs/formulas.md section R —
Min-SNR-γ loss weights (R1, γ = 5), v-prediction (R5: ``v``, the preset), zero terminal SNR (R2, with
v-prediction, which it needs) and all of them together — each trained from scratch with the demo's steps,
then judged by ``ldmkit.engine.quality`` against the held-out test split (the classifier's accuracy; the Fréchet
distance (Q2) in its features as a ratio to the real-vs-real floor, lower is better) with the default sampler
(DPM-Solver++(2M), 10 steps) at each classifier-free guidance w.

    python benchmarks/recipes.py [--recipes eps,min_snr5,v,zero_snr_v,all] [--guidance 1,2,3,4] [--samples 500]
                                 [--guidance-rescale 0,0.7] [--out runs/recipes] [--vae-steps N] [--unet-steps N]
                                 [--seed 0] [--json out.json] [--eval-only]

Each recipe trains both stages (VAE, then U-Net) into OUT/<recipe>/ and reports its wall-clock training time;
``--vae-steps``/``--unet-steps`` override the demo's budget (a few steps prove the script runs). ``--eval-only``
judges the checkpoints already in OUT/<recipe>/ (its training time is the one their metrics.jsonl records). Every recipe
samples the same classes (samples/10 of each) from the same x_T (the engine's noise for ``--seed``), and one
classifier (trained once, on the training split) judges them all.
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
from quality import floats, sample_set  # benchmarks/quality.py, beside this script

from ldmkit.common import DEFAULT_SAMPLER, DEFAULT_STEPS, to_plain
from ldmkit.engine import config as C
from ldmkit.engine import quality
from ldmkit.engine.checkpoint import load_checkpoint
from ldmkit.engine.data import center_crop, load_dataset
from ldmkit.engine.sample import models_from_checkpoint
from ldmkit.engine.train import train

RECIPES = {  # the demo preset's diffusion section, changed by these fields
    "eps": {"prediction": "eps"},  # the demo's recipe before issue 10 (with 1,000 U-Net steps)
    "min_snr5": {"prediction": "eps", "min_snr_gamma": 5.0},
    "v": {"prediction": "v"},  # the demo preset
    "zero_snr_v": {"prediction": "v", "zero_terminal_snr": True},
    "all": {"prediction": "v", "zero_terminal_snr": True, "min_snr_gamma": 5.0},
}
HEADER = ("| recipe | diffusion | U-Net steps | training s | guidance | rescale φ | accuracy | FD | FD ratio |\n"
          "|---|---|---|---|---|---|---|---|---|")


def recipe_config(name: str, args) -> C.Config:
    """The demo preset with recipe ``name``'s diffusion fields and the budget overrides of ``args``."""
    config = C.preset("demo")
    config.diffusion = C.DiffusionConfig(**{**to_plain(config.diffusion), **RECIPES[name]})
    config.train.seed = args.seed
    for key in ("vae_steps", "unet_steps"):
        if getattr(args, key) is not None:
            setattr(config.train, key, getattr(args, key))
    config.train.checkpoint_every = config.train.unet_steps + config.train.vae_steps  # only the last one
    config.train.__post_init__()
    return config


def describe(config: C.Config) -> str:
    d = config.diffusion
    return (f"{d.prediction}, {'zero-SNR ' if d.zero_terminal_snr else ''}{d.schedule}, "
            f"{'uniform' if d.min_snr_gamma is None else f'Min-SNR γ={d.min_snr_gamma:g}'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {list(RECIPES)}")
    parser.add_argument("--guidance", type=floats, default=[1.0, 2.0, 3.0, 4.0])
    parser.add_argument("--guidance-rescale", type=floats, default=[0.0], help="φ of R3 for each guidance > 1")
    parser.add_argument("--eval-only", action="store_true", help="judge the checkpoints in OUT, train nothing")
    parser.add_argument("--samples", type=int, default=500, help="samples per recipe and guidance (x10 classes)")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--vae-steps", type=int, default=None, help="override the demo's VAE steps")
    parser.add_argument("--unet-steps", type=int, default=None, help="override the demo's U-Net steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    configs = {name: recipe_config(name, args) for name in names}  # refuses a bad combination before training
    first = next(iter(configs.values()))
    k, spec, size = first.unet.num_classes, first.data["spec"], first.vae.image_size
    if args.samples % k:
        raise SystemExit(f"--samples must be a multiple of the {k} classes")
    print(f"# {platform.node()} {datetime.datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} on {torch.get_num_threads()} threads; sampler {DEFAULT_SAMPLER}, "
          f"{DEFAULT_STEPS} steps, {args.samples} samples per row", flush=True)
    train_x, train_y, data = load_dataset(spec, "train", size, k)
    test_x, test_y, _ = load_dataset(spec, "test", size, k)
    # the samples come at the data's own size: the real images are measured at that size too
    train_x, test_x = (center_crop(x, tuple(data["content_size"])) for x in (train_x, test_x))
    reference = quality.build_reference((train_x + 1) / 2, train_y, (test_x + 1) / 2, test_y, k)
    floor, floor_images, floor_sets = quality.fd_floor(reference, args.samples)
    print(f"# classifier: accuracy {reference.held_out_accuracy:.3f} on the held-out split; FD floor {floor:.3f} "
          f"({floor_sets} sets of {floor_images} training images)", flush=True)
    labels = np.repeat(np.arange(k), args.samples // k)
    rows = []
    for name, config in configs.items():
        if args.eval_only:
            lines = (args.out / name / "metrics.jsonl").read_text().splitlines()
            seconds = json.loads(lines[-1])["elapsed_s"]
        else:
            t0 = time.perf_counter()
            train(config, args.out / name, device="cpu")
            seconds = time.perf_counter() - t0
        config, vae, unet = models_from_checkpoint(load_checkpoint(args.out / name / "checkpoint.pt"), "cpu")
        if not rows:
            print(HEADER, flush=True)
        for guidance in args.guidance:
            for phi in args.guidance_rescale if guidance > 1 else [0.0]:
                samples = sample_set(config, vae, unet, labels, DEFAULT_SAMPLER, DEFAULT_STEPS, guidance, args.seed,
                                     args.batch, phi)
                m = quality.measure(reference, samples, labels)
                rows.append({"recipe": name, "diffusion": to_plain(config.diffusion),
                             "unet_steps": config.train.unet_steps, "train_seconds": seconds, "guidance": guidance,
                             "guidance_rescale": phi, "accuracy": m["quality_accuracy"], "fd": m["quality_fd"],
                             "fd_ratio": m["quality_fd_ratio"]})
                print(f"| {name} | {describe(config)} | {config.train.unet_steps} | {seconds:.0f} | {guidance:g} "
                      f"| {phi:g} | {m['quality_accuracy']:.3f} | {m['quality_fd']:.2f} "
                      f"| {m['quality_fd_ratio']:.2f} |", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "fd_floor": floor, "samples": args.samples,
                                         "seed": args.seed}, indent=1) + "\n")


if __name__ == "__main__":
    main()
