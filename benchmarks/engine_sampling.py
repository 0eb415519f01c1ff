"""Engine sampling speed of this tree against an earlier revision, side by side in one run: the same
checkpoint, noise, sampler, steps and batch through ``ldmkit.engine.sample.generate`` of each, in alternating
fresh processes (so both see the same machine state), printing each one's best and median time and the ratio.

    python benchmarks/engine_sampling.py --against 70f2641 [--checkpoint runs/demo/checkpoint.pt]
        [--batch 1,16,64] [--samplers ddim,dpmpp2m] [--steps 50] [--rounds 3] [--repeats 3] [--overhead]

The earlier revision is taken with ``git archive`` into a temporary folder and imported from there (its own
layout: ``ldmkit/`` beside ``reference/``, ``engine/``, ... or this tree's ``src/ldmkit``). Without
``--checkpoint`` the models are the demo preset's at initialisation (sampling speed does not depend on the
weights). Guidance w = 3 on the conditional demo model: each step is one U-Net call on 2·batch rows.
``--overhead`` replaces the U-Net by a module that multiplies by 0.1, so that what is timed is the sampling
loop itself (scheduler arithmetic, guidance, the model adapter) plus one VAE decode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each process runs: load the checkpoint, time generate() on fixed noise, print JSON.
WORKER = r"""
import json, sys, time
import numpy as np, torch
from ldmkit.engine.checkpoint import load_checkpoint
from ldmkit.engine.sample import generate, models_from_checkpoint, sample_noise
ckpt, cases, repeats, overhead = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
config, vae, unet = models_from_checkpoint(load_checkpoint(ckpt), "cpu")
if overhead:  # the sampler's own cost: a U-Net that costs (almost) nothing
    class Cheap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.1))

        def forward(self, x, t, y=None):
            return self.w * x
    unet = Cheap()
out = {}
for sampler, n, steps in cases:
    labels = np.arange(n) % config.unet.num_classes
    noise = sample_noise(config, n, steps, 0)
    run = lambda: generate(config, vae, unet, n, labels, sampler, steps, 0.0, 3.0, noise=noise)
    with torch.inference_mode():
        images = run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    out[f"{sampler}/{n}"] = {"times": times, "checksum": float(np.abs(images).sum())}
print(json.dumps(out))
"""


def baseline_tree(rev: str, folder: Path) -> Path:
    """``rev`` extracted into ``folder``; returns the folder to put on PYTHONPATH for its ``ldmkit``."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    if (folder / "src" / "ldmkit").is_dir():
        return folder / "src"
    pkg = folder / "pkgroot"
    pkg.mkdir()
    (pkg / "ldmkit").symlink_to(folder / "ldmkit")
    for part in ("reference", "engine", "export", "golden"):  # the old package-dir mapping, as links
        (folder / "ldmkit" / part).symlink_to(folder / part)
    return pkg


def demo_checkpoint(path: Path) -> Path:
    """The demo preset's models at initialisation, with a latent scale: a checkpoint both trees can load."""
    import torch

    from ldmkit.engine.checkpoint import make_checkpoint, save_checkpoint
    from ldmkit.engine.config import preset
    from ldmkit.engine.models import VAE, UNet

    torch.manual_seed(0)
    config = preset("demo")
    config.latent_scale, config.latent_shape = 1.0, config.vae.latent_shape
    vae, unet = VAE.from_config(config.vae), UNet.from_config(config.unet)
    save_checkpoint(path, make_checkpoint(config, vae.state_dict(), unet.state_dict(), unet.state_dict()))
    return path


def run(pythonpath: Path, ckpt: Path, cases, repeats: int, overhead: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    argv = [sys.executable, "-c", WORKER, str(ckpt), json.dumps(cases), str(repeats), str(int(overhead))]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"worker failed ({pythonpath}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="git revision to compare with (e.g. the last release)")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--samplers", default="ddim,dpmpp2m")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="alternating (old, new) process pairs")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case in each process, after a warm-up")
    ap.add_argument("--overhead", action="store_true",
                    help="time the sampling loop alone: the U-Net replaced by a one-multiply module")
    args = ap.parse_args()
    cases = [(s, int(n), args.steps) for s in args.samplers.split(",") for n in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_path = baseline_tree(args.against, tmp / "old")
        ckpt = args.checkpoint or demo_checkpoint(tmp / "checkpoint.pt")
        new_path = ROOT / "src"
        results = {"old": [], "new": []}
        for _ in range(args.rounds):
            results["old"].append(run(old_path, ckpt, cases, args.repeats, args.overhead))
            results["new"].append(run(new_path, ckpt, cases, args.repeats, args.overhead))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# engine sampling, {args.against} (old) vs this tree (new); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {load:.2f}; steps {args.steps}, guidance 3, fp32, CPU"
          + ("; U-Net replaced by one multiply (the loop's own cost)" if args.overhead else ""))
    print(f"{'case':>14} {'old best':>9} {'new best':>9} {'old med':>8} {'new med':>8} {'old/new':>8}  same images")
    for sampler, n, _ in cases:
        key = f"{sampler}/{n}"
        times = {side: [t for r in results[side] for t in r[key]["times"]] for side in results}
        best = {side: min(v) for side, v in times.items()}
        med = {side: sorted(v)[len(v) // 2] for side, v in times.items()}
        sums = {side: results[side][0][key]["checksum"] for side in results}
        same = abs(sums["old"] - sums["new"]) <= 1e-4 * max(1.0, abs(sums["old"]))
        print(f"{key:>14} {best['old']:9.4f} {best['new']:9.4f} {med['old']:8.4f} {med['new']:8.4f} "
              f"{best['old'] / best['new']:8.3f}  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
