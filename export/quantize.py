"""``ldmkit export onnx --quantize int8``: the float32 unet.onnx → an int8 one (static QDQ), calibrated on the
model's own sampling trajectories, and the quality gate that refuses an int8 U-Net whose samples are worse
than float32's.

The recipe (BENCHMARKS.md, "Int8 U-Net", has the measurements behind each choice):

- ``onnxruntime.quantization.quantize_static`` in QDQ form: QuantizeLinear/DequantizeLinear pairs around the
  quantised nodes, which ONNX Runtime fuses into integer kernels; int8 weights with one scale per output
  channel (per-tensor scales made samples measurably worse), uint8 activations with MinMax ranges.
  ``quant_pre_process`` is not run: its symbolic shape inference fails on the exporter's dynamic-batch
  Reshapes, and its optimisation step would save ONNX Runtime's CPU-specific layouts into the file.
  (``quantize_dynamic`` ran six times slower than float32.)
- Only ``INT8_OP_TYPES`` (Conv, MatMul: nearly all of the FLOPs) are quantised, and of those not the nodes of
  ``float_nodes``: the first convolution (it sees x_t), the last (it writes the prediction), and every node
  that does not depend on x_t — the timestep and class embedding (t·freqs, sin/cos, its MLP), whose input t
  runs to T = 1000, far beyond what 8 bits keep (quantising it made samples unrecognisable).
- Calibration data: the U-Net's inputs (x_t, t, y) at every call of the model's own guided sampling from
  N(0, I) noise (``calibration_feeds``), the default sampler and steps; no dataset is needed.

The gate (``quality``): the sample-quality measure of ``ldmkit.engine.quality`` needs the training data; an
export has only the checkpoint. So int8 is judged against float32 itself, in a feature space the checkpoint
gives: φ(z_0) = the VAE encoder's posterior mean of the decoded sample, vae.encode(vae.decode(z_0·c)), what
the images show re-read by the model's own encoder. Three sets of ``GATE_SAMPLES`` samples from the default
sampler — float32 on noise set A, int8 on the same noise A, float32 on another noise set B — and FD the
Fréchet distance of fitted Gaussians (Q2):

    floor = FD(φ(float32_A), φ(float32_B))   how far two float32 sample sets lie apart by their noise alone
    shift = FD(φ(int8_A), φ(float32_A)) / floor

shift is how far quantisation moves the sample distribution, in units of that floor (the shared noise A
cancels the sampling noise between the two: the recipe measures 0.003–0.007, a broken quantisation 0.9 to
15). The export refuses shift > ``GATE_MARGIN``. It also records excess = (FD(φ(int8_A), φ(float32_B)) −
floor) / floor, int8's distance to the independent float32 set against float32's own (≈ 0 for the recipe).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from ldmkit.common import SPACING
from ldmkit.engine.diffusion import torch_model
from ldmkit.reference import samplers as R
from ldmkit.reference.quality import frechet_distance_of_samples
from ldmkit.reference.schedules import timesteps

QUANTIZE = ("int8",)
INT8_OP_TYPES = ("Conv", "MatMul")
CALIBRATION_IMAGES, CALIBRATION_SEED = 64, 0
GATE_SAMPLES, GATE_SEEDS = 500, (1, 2)
GATE_MARGIN = 0.25
"""The gate refuses an int8 U-Net whose ``shift`` is above this: a move of the sample distribution more than a
quarter of what new noise moves float32's own samples by. On the demo model (BENCHMARKS.md, "Int8 U-Net") every
variant with shift <= 0.03 kept float32's held-out accuracy and every one with shift >= 0.44 lost 4 to 45
points of it; the recipe measures 0.007."""
SCHEME = ("static QDQ (onnxruntime.quantization.quantize_static): int8 weights, one scale per output channel; "
          "uint8 activations, MinMax ranges over the calibration data")


def float_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes kept in float32 (module docstring): the Conv that reads the first input (x_t), the
    Conv that writes the output, and every node none of whose inputs depends on x_t (the embedding path)."""
    x_name, out_name = graph.input[0].name, graph.output[0].name
    from_x, keep = {x_name}, []
    for node in graph.node:  # nodes are topologically sorted (onnx.checker holds the exporter to it)
        if any(name in from_x for name in node.input):
            from_x.update(node.output)
            if node.op_type == "Conv" and (x_name in node.input or out_name in node.output):
                keep.append(node.name)
        else:
            keep.append(node.name)
    return keep


def calibration_feeds(config, unet, schedule, sampler: str, steps: int, guidance, n: int = CALIBRATION_IMAGES,
                      seed: int = CALIBRATION_SEED) -> list[dict]:
    """The U-Net's inputs at every call of ``sampler`` with ``steps`` (the reference loop on the torch U-Net)
    for n images (classes in turn; guided with ``guidance``, A9: calls on 2n rows) from x_T ~ N(0, I) drawn
    by ``torch.Generator().manual_seed(seed)``: one feed dict {"x_t", "t"[, "y"]} of NumPy arrays per call."""
    k = config.unet.num_classes
    base, feeds = torch_model(unet), []

    def model(x, t, y=None):
        feed = {"x_t": x.numpy().astype(np.float32), "t": np.asarray(t, dtype=np.int64)}
        if k:
            feed["y"] = np.full(len(x), k, dtype=np.int64) if y is None else np.asarray(y, dtype=np.int64)
        feeds.append(feed)
        return base(x, t, y)

    x_T = torch.randn((n, *config.latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        R.sample(model, x_T, schedule, sampler, steps, 0.0, None, config.diffusion.prediction,
                 R.class_labels(n, k, None), guidance, k if k else None)
    return feeds


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def quantize_unet(model: onnx.ModelProto, feeds: list[dict], op_types=INT8_OP_TYPES, keep=None) -> onnx.ModelProto:
    """``model`` (the float32 unet.onnx) quantised to int8 by the recipe of the module docstring, calibrated
    on ``feeds``; ``op_types`` the node types to quantise (None: every type ONNX Runtime can), ``keep`` the
    names of nodes left in float32 (None: ``float_nodes``)."""
    keep = float_nodes(model.graph) if keep is None else list(keep)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # quantize_static moves a ModelProto's weights to a temporary external file
    root = logging.getLogger()  # quantize_static logs a warning on the root logger: no quant_pre_process (above)
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="ldmkit-int8-") as tmp:
            path = Path(tmp) / "unet.int8.onnx"
            quantize_static(copy, path, _Reader(feeds), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=None if op_types is None else list(op_types), per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                            calibrate_method=CalibrationMethod.MinMax)
            return onnx.load(path)
    finally:
        root.setLevel(level)


def calibration_record(feeds: list[dict], sampler: str, steps: int, T: int, guidance, n: int, seed: int) -> dict:
    """sampler.json's account of the calibration data."""
    return {"data": "the U-Net's inputs (x_t, t, y) at every call of the model's own sampling from x_T ~ N(0, I) "
                    "(torch.Generator seed below), classes in turn, guided calls on [x, x] with labels [y, null]",
            "sampler": sampler, "steps": steps, "timesteps": timesteps(steps, T, SPACING).tolist(),
            "guidance": guidance, "images": n, "seed": seed, "calls": len(feeds),
            "latents": sum(len(f["x_t"]) for f in feeds)}


def sample_latents(unet_fn, config, schedule, sampler: str, steps: int, guidance, n: int, seed: int,
                   chunk: int = 100) -> np.ndarray:
    """z_0 (n, C, H, W) from the reference loop with the NumPy model callable ``unet_fn`` (an ONNX session),
    x_T from ``numpy.random.default_rng(seed)``, classes in turn, in chunks of ``chunk`` images."""
    k = config.unet.num_classes
    x_T = np.random.default_rng(seed).standard_normal((n, *config.latent_shape), dtype=np.float32)
    y = R.class_labels(n, k, None)
    return np.concatenate([R.sample(unet_fn, x_T[i:i + chunk], schedule, sampler, steps, 0.0, None,
                                    config.diffusion.prediction, None if y is None else y[i:i + chunk], guidance,
                                    k if k else None) for i in range(0, n, chunk)])


@torch.no_grad()
def features(vae, latent_scale: float, z0: np.ndarray) -> np.ndarray:
    """φ(z_0) = the VAE encoder's mean of clamp(vae.decode(z_0 · latent_scale), −1, 1), flattened: (n, d)."""
    z = torch.from_numpy(np.asarray(z0, dtype=np.float32)) * float(latent_scale)
    return vae.encode(vae.decode(z).clamp(-1, 1))[0].flatten(1).double().numpy()


def quality(float_fn, int8_fn, config, vae, schedule, sampler: str, steps: int, guidance, n: int | None = None,
            margin: float = GATE_MARGIN) -> dict:
    """The gate's figures (module docstring) for the float32 and int8 U-Nets as NumPy model callables, on n
    samples per set (None: ``GATE_SAMPLES``): {"shift", "margin", "passed": shift <= margin, "excess", the FDs}."""
    n = GATE_SAMPLES if n is None else n
    seed_a, seed_b = GATE_SEEDS
    phi = {name: features(vae, config.latent_scale, sample_latents(fn, config, schedule, sampler, steps, guidance,
                                                                   n, seed))
           for name, fn, seed in (("float32_A", float_fn, seed_a), ("int8_A", int8_fn, seed_a),
                                  ("float32_B", float_fn, seed_b))}
    floor = frechet_distance_of_samples(phi["float32_A"], phi["float32_B"])
    paired = frechet_distance_of_samples(phi["int8_A"], phi["float32_A"])
    other = frechet_distance_of_samples(phi["int8_A"], phi["float32_B"])
    return {"measure": "shift = FD(int8_A, float32_A) / FD(float32_A, float32_B); excess = (FD(int8_A, float32_B) - "
                       "FD(float32_A, float32_B)) / FD(float32_A, float32_B); FD the Frechet distance (Q2) of the VAE "
                       "encoder's means of the decoded samples; A, B: x_T from numpy default_rng(seeds)",
            "sampler": sampler, "steps": steps, "guidance": guidance, "samples": n, "seeds": list(GATE_SEEDS),
            "features": int(phi["int8_A"].shape[1]), "fd_float32_floor": floor, "fd_int8_float32": paired,
            "shift": paired / floor, "excess": (other - floor) / floor, "margin": margin,
            "passed": bool(paired / floor <= margin)}
