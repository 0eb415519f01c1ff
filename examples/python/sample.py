"""Embed the sampler in a Python app: NumPy + ONNX Runtime only (pip install ldmkit onnxruntime; no torch).

    python examples/python/sample.py runs/demo/onnx digits.png
"""

import sys

import numpy as np

from ldmkit.export.runtime import OnnxSampler
from ldmkit.images import write_images

artifact, out = sys.argv[1], sys.argv[2]
sampler = OnnxSampler(artifact)  # checks sampler.json, the sha256 of each .onnx file, and their inputs/outputs
print(f"{artifact}: {sampler.num_classes} classes, T = {sampler.model.T}, running on {sampler.provider} "
      f"({sampler.precision} U-Net, {sampler.threads} threads)")

# Two of each digit with the artifact's classifier-free guidance w (sampler.json's defaults): DDIM (reference
# loop around unet.onnx), 25 steps.
labels, w = np.repeat(np.arange(10), 2), sampler.model.defaults.guidance
images = sampler.sample(len(labels), labels=labels, sampler="ddim", steps=25, guidance=w, seed=0)

# The same x_T through sampler.onnx: the whole loop in one session.run, the same images to float32 round-off.
x_T, _ = sampler.noise(len(labels), 25, seed=0, loop=False)
one_graph = sampler.sample_graph(len(labels), labels=labels, steps=25, guidance=w, noise=(x_T, None))
print(f"max |runtime - sampler.onnx| = {np.abs(images - one_graph).max():.1e}")

write_images(out, images, nrow=10)  # a PNG grid (or .npy: float32 (N, *sampler.model.image_shape) in [0, 1])
print(f"wrote {out}")
