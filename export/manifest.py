"""sampler.json, the ONNX artifact's manifest, as dataclasses: written by ``onnx_export``, read and checked by
``runtime`` (NumPy and the reference only; never torch or onnx).

    format          {"name": "ldmkit-onnx", "version": 1}
    ldmkit_version  the ldmkit that exported it
    opset           the ONNX opset of the three graphs
    model           ``Model``: the schedule (name, T, zero terminal SNR or not, the ᾱ table), prediction type,
                    shapes (``image_shape`` [C, H, W]: the images vae_decoder.onnx and sampler.onnx return, at
                    the data's own size, e.g. [1, 28, 28] for digits the model saw padded to 32×32), classes, the
                    samplers of sampler.onnx's ``method`` input in order, the precision of its loop, ``Defaults``
    files           role ("unet", "vae_decoder", "sampler") → ``File``: path, sha256, declared inputs/outputs
    conventions     plain-language notes for hosts that drive unet.onnx themselves
    parity          the export's checks against torch (max abs errors, tolerance)
    quantization    null (a float32 U-Net), or ``Quantization``: unet.onnx is int8 (``ldmkit export onnx
                    --quantize int8``): the scheme, the nodes kept in float, the calibration data, the quality gate
    checkpoint      the checkpoint it came from (file name, step)

Version 3 added ``model.zero_terminal_snr``, ``defaults.guidance_rescale`` and ``quantization``; earlier
versions are refused (export again).

Each .onnx carries the sha256 of the canonical JSON of ``model`` (``model_digest``) in its metadata, so a
file and a manifest from different exports do not pass as one artifact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldmkit.common import MAX_GUIDANCE, MAX_T, SPACING, __version__, checked, from_dict, read_json, to_plain
from ldmkit.reference.posterior import PREDICTIONS
from ldmkit.reference.samplers import SAMPLERS
from ldmkit.reference.schedules import SCHEDULE_NAMES, Schedule, timesteps

FORMAT_NAME = "ldmkit-onnx"
FORMAT_VERSION = 3  # 2: sampler.onnx takes a method (DDIM or DPM-Solver++(2M)); model.graph_samplers names them
# 3: model.zero_terminal_snr (R2), defaults.guidance_rescale (R3; sampler.onnx's optional guidance_rescale input),
# quantization (an int8 U-Net)
MANIFEST = "sampler.json"
FILES = {"unet": "unet.onnx", "vae_decoder": "vae_decoder.onnx", "sampler": "sampler.onnx"}
GRAPH_SAMPLERS = ("ddim", "dpmpp2m")
"""The samplers sampler.onnx runs, by the value of its ``method`` input (0, 1, ...)."""


MAX_SIDE = 4096
"""The largest channel count or side a latent_shape or image_shape may declare."""
MAX_CLASSES = 100_000


def _shape(v) -> bool:
    return len(v) == 3 and all(1 <= a <= MAX_SIDE for a in v)


def _finite(v, lo, hi) -> bool:
    return lo <= v <= hi  # False for NaN; ±inf lies outside every finite [lo, hi]


@dataclass(frozen=True)
class Defaults:
    """What ``ldmkit sample DIR`` uses when not told: sampler, steps (and their step list), η, guidance w and
    its rescale φ (R3)."""

    sampler: str = checked(f"one of {list(SAMPLERS)}", lambda v: v in SAMPLERS)
    steps: int = checked(f"an int in 1..{MAX_T}", lambda v: 1 <= v <= MAX_T)
    eta: float = checked("a float in [0, 1]", lambda v: _finite(v, 0.0, 1.0))
    guidance: float | None = checked(f"a float in [0, {MAX_GUIDANCE:g}] or null",
                                     lambda v: v is None or _finite(v, 0.0, MAX_GUIDANCE))
    guidance_rescale: float = checked("a float in [0, 1]", lambda v: _finite(v, 0.0, 1.0))
    timesteps: tuple[int, ...] = checked("a list of ints")


@dataclass(frozen=True)
class Model:
    """The model a host drives: ``alpha_bars`` is ᾱ_t for math t = 0..T of
    ``Schedule.named(schedule, T, zero_terminal_snr)`` (R2: then ᾱ_T = 0, and the prediction is v or x0)."""

    schedule: str = checked(f"one of {list(SCHEDULE_NAMES)}", lambda v: v in SCHEDULE_NAMES)
    T: int = checked(f"an int in 1..{MAX_T}", lambda v: 1 <= v <= MAX_T)
    zero_terminal_snr: bool = checked("true or false")
    alpha_bars: tuple[float, ...] = checked("a list of floats")
    prediction: str = checked(f"one of {list(PREDICTIONS)}", lambda v: v in PREDICTIONS)
    latent_shape: tuple[int, ...] = checked(f"[C, H, W], each in 1..{MAX_SIDE}", _shape)
    latent_scale: float = checked("a float in [1e-06, 1e+06]", lambda v: _finite(v, 1e-6, 1e6))
    image_shape: tuple[int, ...] = checked(f"[C, H, W], each in 1..{MAX_SIDE}", _shape)
    num_classes: int = checked(f"an int in 0..{MAX_CLASSES}", lambda v: 0 <= v <= MAX_CLASSES)
    null_class: int | None = checked("an int or null")
    timestep_spacing: str = checked(repr(SPACING), lambda v: v == SPACING)
    graph_samplers: tuple[str, ...] = checked(f"a list of names from {list(SAMPLERS)}",
                                              lambda v: len(v) > 0 and all(s in SAMPLERS for s in v))
    graph_precision: str = checked("'float64' or 'float32'", lambda v: v in ("float64", "float32"))
    defaults: Defaults

    def check(self, where: str) -> None:
        """What ties the fields together; ValueError naming the problem."""
        if self.zero_terminal_snr and (self.prediction == "eps" or self.T < 2):
            raise ValueError(f"{where}: model.zero_terminal_snr needs T >= 2 and prediction 'v' or 'x0', got "
                             f"T = {self.T}, {self.prediction!r}")
        expected = self.make_schedule().alpha_bars
        if len(self.alpha_bars) != self.T + 1 or not np.array_equal(np.array(self.alpha_bars), expected):
            zero = " rescaled to zero terminal SNR" if self.zero_terminal_snr else ""
            raise ValueError(f"{where}: model.alpha_bars is not the {self.schedule!r} schedule with T = {self.T}"
                             f"{zero}")
        k = self.num_classes
        if self.null_class != (k if k > 0 else None):
            raise ValueError(f"{where}: model.null_class must be num_classes ({k}) or null when unconditional")
        d = self.defaults
        if not 1 <= d.steps <= self.T or list(d.timesteps) != timesteps(d.steps, self.T, SPACING).tolist():
            raise ValueError(f"{where}: model.defaults.timesteps is not the {SPACING} list for steps = {d.steps}")

    def make_schedule(self) -> Schedule:
        """The reference schedule the manifest names (``Schedule.named(schedule, T, zero_terminal_snr)``)."""
        return Schedule.named(self.schedule, self.T, zero_terminal_snr=self.zero_terminal_snr)


SAMPLER_TABLES = ("alpha_bars", "sqrt_alpha_bars", "sqrt_one_minus_alpha_bars", "sqrt_recip_alpha_bars",
                  "sqrt_recipm1_alpha_bars", "half_log_snr")
"""The schedule tables sampler.onnx gathers its step coefficients from, in the order ``build_sampler`` makes
them (its first constants: initializers "main/c1" … "main/c6"); half_log_snr is λ_t = ½·log SNR."""


def sampler_tables(schedule: Schedule, precision: str) -> dict[str, np.ndarray]:
    """{initializer name: table} of ``SAMPLER_TABLES`` for ``schedule`` in the loop's ``precision`` ("float64" or
    "float32"): what ``build_sampler`` embeds and what the runtime compares sampler.onnx's own tables with."""
    real = np.float64 if precision == "float64" else np.float32
    values = [getattr(schedule, k) for k in SAMPLER_TABLES[:-1]] + [0.5 * schedule.log_snr]
    return {f"main/c{i + 1}": np.asarray(v, dtype=real) for i, v in enumerate(values)}


@dataclass(frozen=True)
class File:
    """One graph of the artifact: its file name, sha256, and the inputs/outputs its session must have."""

    path: str
    sha256: str = checked("64 hex digits", lambda v: len(v) == 64)
    inputs: tuple[dict, ...] = checked("a list")
    outputs: tuple[dict, ...] = checked("a list")


@dataclass(frozen=True)
class Quantization:
    """How unet.onnx (and the sampler.onnx built from it) was quantised (``export.quantize``): ``precision``,
    the scheme in words, the node types quantised, the nodes kept in float32, the calibration data (sampler,
    steps, guidance, images, seed, latents), the quality gate's figures and the sampler.onnx check."""

    precision: str = checked("'int8'", lambda v: v == "int8")
    scheme: str
    op_types: tuple[str, ...] = checked("a list of ONNX op types")
    float_nodes: tuple[str, ...] = checked("a list of node names")
    calibration: dict
    quality: dict
    sampler_check: dict


@dataclass(frozen=True)
class Manifest:
    """sampler.json (see the module docstring)."""

    format: dict
    ldmkit_version: str
    opset: int = checked("an int in 1..1000", lambda v: 0 < v <= 1000)
    model: Model
    files: dict[str, File]
    conventions: dict
    parity: dict
    quantization: Quantization | None
    checkpoint: dict

    def to_dict(self) -> dict:
        return to_plain(self)

    @property
    def unet_precision(self) -> str:
        """The U-Net's precision: "int8" or "float32"."""
        return "float32" if self.quantization is None else self.quantization.precision


def model_digest(model: Model) -> str:
    """sha256 of the canonical JSON of the manifest's ``model``; each .onnx carries it as metadata."""
    return hashlib.sha256(json.dumps(to_plain(model), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(folder) -> Manifest:
    """sampler.json of an artifact folder, checked: size and nesting (``common.read_json``), format, keys,
    types and bounds (T at most ``MAX_T``, before the schedule is built), the schedule table against the
    reference's ``Schedule.named``, the default timesteps, the file names. ValueError naming the problem
    (FileNotFoundError for a missing folder or file)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"ONNX artifact folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not an ONNX artifact folder (ldmkit export onnx writes one)")
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is a folder without {MANIFEST}: not an ldmkit ONNX artifact "
                                "(ldmkit export onnx writes one)")
    raw = read_json(path, MANIFEST)
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME:
        raise ValueError(f"{path} is not an ldmkit ONNX manifest (format name {FORMAT_NAME!r} missing)")
    if fmt.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {fmt.get('version')!r} is not supported; this ldmkit "
                         f"({__version__}) reads version {FORMAT_VERSION}: export the checkpoint again")
    manifest = from_dict(Manifest, raw, f"{path}:")
    manifest.model.check(str(path))
    for role, name in FILES.items():
        entry = manifest.files.get(role)
        if entry is None or entry.path != name:
            raise ValueError(f"{path}: files.{role} must be an entry for {name!r}, got {to_plain(entry)!r:.80}")
    for role in ("vae_decoder", "sampler"):
        outputs = manifest.files[role].outputs
        if len(outputs) != 1 or list(outputs[0].get("shape", []))[1:] != list(manifest.model.image_shape):
            want = ["batch", *manifest.model.image_shape]
            raise ValueError(f"{path}: files.{role}.outputs must be one output of shape {want} (model.image_shape), "
                             f"got {to_plain(outputs)!r:.120}")
    return manifest
