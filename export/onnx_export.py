"""``ldmkit export onnx``: a trained checkpoint → unet.onnx, vae_decoder.onnx, sampler.onnx and sampler.json
(the artifact ``ldmkit.export.runtime`` reads; its module docstring describes each file).

Each model is exported with the dynamo exporter (dynamic batch, weights inside the file), checked with
``onnx.checker`` and run through ONNX Runtime against the torch module on random inputs at batch sizes 2
and 5; the whole of sampler.onnx is checked against the torch engine's ``generate`` on the same noise.
Any maximum absolute error above the tolerance (relative to the output's scale, below) fails the export.
Files are written into a temporary folder beside the destination and renamed into place at the end, so a
failed export leaves nothing behind.

``quantize="int8"`` (``ldmkit export onnx --quantize int8``) then replaces unet.onnx by an int8 U-Net and
sampler.onnx by the graph built from it, in place of the float32 ones (same file names, inputs and outputs,
so hosts and the runtime load it unchanged): ``export.quantize`` calibrates it on the model's own sampling
trajectories and judges its samples against float32's; an int8 U-Net beyond ``GATE_MARGIN`` is refused.
sampler.onnx is then held to the Python runtime's loop on the same int8 unet.onnx and noise (``TOLERANCE`` for a
float64 loop, ``INT8_FLOAT32_LOOP_MEAN`` for a float32 one).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ldmkit.common import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SPACING,
    __version__,
    from_dict,
    one_line,
    write_errors,
)
from ldmkit.engine.checkpoint import load_checkpoint
from ldmkit.engine.data import center_crop
from ldmkit.engine.sample import generate, models_from_checkpoint
from ldmkit.reference import samplers as R
from ldmkit.reference.schedules import timesteps

from . import manifest as M
from . import quantize as Q
from . import runtime as rt
from .sampler_graph import PRECISIONS, build_sampler

DEFAULT_OPSET = 18  # the dynamo exporter's lowest; as fast here as 20, 21 and 23, and read by older runtimes
#: a graph passes when max |onnx − torch| <= TOLERANCE · max(1, max |torch|): float32 round-off. It holds for
#: sampler.onnx's whole loop too (images in [0, 1]; measured ≈1e-6 after 50 guided DDIM steps of the demo model)
TOLERANCE = 1e-4
#: the int8 sampler.onnx against the Python loop (float64) on the same int8 unet.onnx and noise. A float64 loop feeds
#: the U-Net the same float32 inputs bit for bit, so TOLERANCE holds (measured 3e-7 on the demo model). A float32
#: loop's x differs by float32 round-off, which a QuantizeLinear can round to the next step; the ODE carries that
#: jump on (the demo: max 0.14, mean 2.5e-3 at 10 steps), so there the mean abs error is held to this instead
INT8_FLOAT32_LOOP_MEAN = 1e-2
PARITY_BATCHES = (2, 5)


class ExportError(ValueError):
    """The export failed a check (onnx.checker or parity); nothing was written."""


class _Decoder(torch.nn.Module):
    """z_0 (the sampler's latent) → images in [0, 1] at the data's own size, as the engine:
    clamp((center_crop(decode(z_0 · latent_scale), output_size) + 1)/2), the crop a Slice in the graph."""

    def __init__(self, vae, latent_scale: float, output_size: tuple[int, int]):
        super().__init__()
        self.vae, self.latent_scale, self.output_size = vae, float(latent_scale), output_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (center_crop(self.vae.decode(z * self.latent_scale), self.output_size).clamp(-1, 1) + 1) / 2


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines, warnings and log messages off (errors still raise)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _to_onnx(module, args: tuple, names: list[str], output: str, opset: int) -> onnx.ModelProto:
    """One self-contained ModelProto with a dynamic batch axis on every input and the output."""
    batch = torch.export.Dim("batch")
    with _quiet():
        program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=[output],
                                    dynamic_shapes=tuple({0: batch} for _ in args), opset_version=opset,
                                    external_data=False, verbose=False)
    model = program.model_proto
    got = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:
        raise ExportError(f"opset {opset}: the exporter could only produce opset {got}; pick --opset {got} or later")
    return model


def _tag(model: onnx.ModelProto, role: str, digest: str) -> onnx.ModelProto:
    """``model`` with ldmkit's metadata (its role, the manifest's model digest), checked by onnx.checker."""
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {rt.META_ROLE: role, rt.META_DIGEST: digest,
                                        rt.META_FORMAT: f"{M.FORMAT_NAME}/{M.FORMAT_VERSION}"})
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(data: bytes, role: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(data, rt.session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        reason = one_line(exc, limit=200, first=True)
        raise ExportError(f"onnxruntime {ort.__version__} cannot load the exported {role}: {reason}") from exc


def _max_error(got: np.ndarray, want: np.ndarray, role: str, what: str, tol: float, log) -> float:
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    bound = tol * max(1.0, float(np.max(np.abs(want))))
    log(f"parity {role:12s} {what:22s} max abs error {err:.3e} (tolerance {bound:.1e})")
    if not err <= bound:
        raise ExportError(f"{role} does not match the torch model ({what}): max abs error {err:.3e} > {bound:.1e}")
    return err


def _parity_models(sessions: dict, unet, decoder, config, log) -> dict:
    """Both models on random inputs at each of PARITY_BATCHES; returns {role: max abs error}."""
    g = torch.Generator().manual_seed(0)
    k, T = config.unet.num_classes, config.diffusion.T
    errors = {"unet": 0.0, "vae_decoder": 0.0}
    for b in PARITY_BATCHES:
        x = torch.randn((b, *config.latent_shape), generator=g)
        t = torch.randint(1, T + 1, (b,), generator=g)
        args = (x, t) + ((torch.randint(0, k + 1, (b,), generator=g),) if k else ())
        feeds = dict(zip(("x_t", "t", "y"), (a.numpy() for a in args), strict=False))
        with torch.inference_mode():
            want_u, want_d = unet(*args).double().numpy(), decoder(x).double().numpy()
        got_u = sessions["unet"].run(None, feeds)[0]
        got_d = sessions["vae_decoder"].run(None, {"z": x.numpy()})[0]
        errors["unet"] = max(errors["unet"], _max_error(got_u, want_u, "unet", f"random inputs, batch {b}",
                                                        TOLERANCE, log))
        errors["vae_decoder"] = max(errors["vae_decoder"], _max_error(got_d, want_d, "vae_decoder",
                                                                      f"random inputs, batch {b}", TOLERANCE, log))
    return errors


def _parity_loop(session, config, vae, unet, steps: int, guidance, log) -> float:
    """sampler.onnx against the torch engine on the same noise (batch 2), for each of its methods, and for a
    conditional model with guidance rescale φ = 0 and 0.7 (R3); returns the largest max abs error."""
    n, k = 2, config.unet.num_classes
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn((n, *config.latent_shape), generator=g)
    labels = np.arange(n, dtype=np.int64) % k if k else None
    unused = torch.zeros(steps, *x_T.shape)  # these samplers (eta = 0) draw no loop noise
    worst = 0.0
    for method, sampler in enumerate(M.GRAPH_SAMPLERS):
        for phi in (0.0, 0.7) if k else (0.0,):
            want = generate(config, vae, unet, n, labels, sampler, steps, 0.0, guidance, noise=(x_T, unused),
                            guidance_rescale=phi)
            feeds = {"noise": x_T.numpy(), "steps": np.array(steps, dtype=np.int64), "method": np.array(method)}
            if k:
                feeds.update(y=labels, guidance=np.array(1.0 if guidance is None else guidance, dtype=np.float32),
                             guidance_rescale=np.array(phi, dtype=np.float32))
            got = session.run(None, feeds)[0]
            what = f"{sampler}-{steps}" + (f" phi {phi:g}" if k else "") + " vs torch"
            worst = max(worst, _max_error(got, want.astype(np.float64), "sampler", what, TOLERANCE, log))
    return worst


def _unet_fn(session, k: int):
    """A NumPy model callable on a unet.onnx session (as ``runtime.OnnxSampler.unet_fn``)."""
    def fn(x, t, y=None):
        feeds = {"x_t": np.ascontiguousarray(x, dtype=np.float32), "t": np.asarray(t, dtype=np.int64)}
        if k:
            feeds["y"] = np.full(len(feeds["t"]), k, dtype=np.int64) if y is None else np.asarray(y, dtype=np.int64)
        return session.run(None, feeds)[0]
    return fn


def _int8(models: dict, sessions: dict, config, vae, unet, schedule, steps: int, guidance, precision: str,
          digest: str, log):
    """The int8 unet.onnx and the sampler.onnx built from it: ({role: serialized model}, {role: session},
    sampler.json's ``quantization`` entry). ``models``/``sessions``: the float32 export's, checked against torch.
    ExportError when the gate refuses the int8 U-Net or sampler.onnx leaves the Python loop (``export.quantize``)."""
    k, T, sampler, null = config.unet.num_classes, config.diffusion.T, DEFAULT_SAMPLER, config.unet.num_classes or None
    feeds = Q.calibration_feeds(config, unet, schedule, sampler, steps, guidance)
    with _quiet():
        unet8 = Q.quantize_unet(models["unet"], feeds, Q.INT8_OP_TYPES, Q.float_nodes(models["unet"].graph))
    unet8 = _tag(unet8, "unet", digest)
    graph8 = _tag(build_sampler(unet8, models["vae_decoder"], schedule, config.diffusion.prediction, null, precision),
                  "sampler", digest)
    blobs = {"unet": unet8.SerializeToString(), "sampler": graph8.SerializeToString()}
    new = {role: _session(data, role) for role, data in blobs.items()}
    gate = Q.quality(_unet_fn(sessions["unet"], k), _unet_fn(new["unet"], k), config, vae, schedule, sampler, steps,
                     guidance)
    log(f"int8 gate    {gate['samples']} samples per set: distribution shift {gate['shift']:.3f} of float32's "
        f"noise floor (margin {gate['margin']:.2f}; excess {gate['excess']:+.3f})")
    if not gate["passed"]:
        raise ExportError(f"int8 U-Net refused: quantisation moves its samples by {gate['shift']:.2f} of float32's "
                          f"noise floor (Frechet distance {gate['fd_int8_float32']:.4g} vs "
                          f"{gate['fd_float32_floor']:.4g}), beyond the margin of {gate['margin']:.2f}")
    n = 4
    x_T = np.random.default_rng(3).standard_normal((n, *config.latent_shape), dtype=np.float32)
    labels = np.arange(n, dtype=np.int64) % k if k else None
    check = {"max_abs_error": 0.0, "mean_abs_error": 0.0}
    for method, name in enumerate(M.GRAPH_SAMPLERS):
        z = R.sample(_unet_fn(new["unet"], k), x_T, schedule, name, steps, 0.0, None, config.diffusion.prediction,
                     labels, guidance, null)
        want = sessions["vae_decoder"].run(None, {"z": z.astype(np.float32)})[0].astype(np.float64)
        feeds_g = {"noise": x_T, "steps": np.array(steps, dtype=np.int64), "method": np.array(method)}
        if k:
            feeds_g.update(y=labels, guidance=np.array(1.0 if guidance is None else guidance, dtype=np.float32))
        error = np.abs(new["sampler"].run(None, feeds_g)[0] - want)
        worst, mean = float(error.max()), float(error.mean())
        bound = TOLERANCE * max(1.0, float(np.abs(want).max())) if precision == "float64" else INT8_FLOAT32_LOOP_MEAN
        log(f"parity {'sampler':12s} {f'int8 {name}-{steps} vs loop':22s} max abs error {worst:.3e}, mean {mean:.1e} "
            f"({'max' if precision == 'float64' else 'mean'} tolerance {bound:.1e})")
        if not (worst if precision == "float64" else mean) <= bound:
            raise ExportError(f"the int8 sampler.onnx does not match the Python loop on the int8 unet.onnx ({name}-"
                              f"{steps}): max abs error {worst:.3e}, mean {mean:.1e}, tolerance {bound:.1e}")
        check = {"max_abs_error": max(check["max_abs_error"], worst), "mean_abs_error": max(check["mean_abs_error"],
                                                                                            mean)}
    check.update(tolerance={"max_abs_error": TOLERANCE} if precision == "float64" else
                 {"mean_abs_error": INT8_FLOAT32_LOOP_MEAN},
                 against=f"the Python runtime's loop (float64) on the int8 unet.onnx, "
                         f"{' and '.join(M.GRAPH_SAMPLERS)}, {steps} steps, batch {n}, the same noise")
    record = {"precision": "int8", "scheme": Q.SCHEME, "op_types": list(Q.INT8_OP_TYPES),
              "float_nodes": Q.float_nodes(models["unet"].graph),
              "calibration": Q.calibration_record(feeds, sampler, steps, T, guidance, Q.CALIBRATION_IMAGES,
                                                  Q.CALIBRATION_SEED),
              "quality": gate,
              "sampler_check": check}
    return blobs, new, record


def _io(session) -> dict:
    return {"inputs": rt.describe_io(session.get_inputs()), "outputs": rt.describe_io(session.get_outputs())}


CONVENTIONS = {
    "timesteps": "math t in 1..T, descending; trailing: t_i = round(T - i*T/steps), i = 0..steps-1, rounding half "
                 "to even; alpha_bars[t] is the schedule's cumulative product, alpha_bars[0] = 1",
    "unet": "the model's prediction (model.prediction: eps, x0 or v) at (x_t, t, y); y = null_class gives the "
            "unconditional prediction; an unconditional model has no y input",
    "guidance": "pred = pred(x, null) + w * (pred(x, y) - pred(x, null)), one batched call on [x, x], [y, null]; "
                "w = 1 is plain conditional sampling",
    "vae_decoder": "input: z_0 as the sampler ends (latent_scale is applied inside the graph); output: images in "
                   "[0, 1] of model.image_shape, the data's own size (the centre of the decoded image when the model "
                   "was trained on images padded to a larger size)",
    "sampler": "DDIM (eta = 0) or DPM-Solver++(2M) with guidance and the decoder in one Loop; noise = x_T ~ N(0, I) "
               "float32, y class ids, guidance w (scalar), steps (scalar, clamped to 1..T), method (scalar: the index "
               "in model.graph_samplers, 0 ddim, 1 dpmpp2m), optional guidance_rescale (scalar float32 in [0, 1], "
               "default 0: the rescale phi of the guided x0 by the conditional x0's std, per image); output images "
               "in [0, 1]",
    "guidance_rescale": "x0_cfg and x0_cond from pred and pred(x, y) by model.prediction; x0 = phi * x0_cfg * "
                        "std(x0_cond) / std(x0_cfg) + (1 - phi) * x0_cfg, std per image over C, H, W",
}


def export_onnx(checkpoint_path, out_dir=None, opset: int = DEFAULT_OPSET, steps: int = DEFAULT_STEPS,
                force: bool = False, log=print, precision: str = "float64", quantize: str | None = None) -> Path:
    """Export ``checkpoint_path`` (an ldmkit checkpoint.pt, EMA U-Net weights) to ``out_dir`` (default: an
    ``onnx`` folder beside it); ``steps`` is the default step count recorded in sampler.json (and used for the
    sampler's parity check); ``precision`` is sampler.onnx's loop ("float64", or "float32": no float64 tensor
    in the graph); ``quantize`` None (a float32 U-Net) or "int8" (module docstring). Refuses a non-empty
    ``out_dir`` unless ``force``. ``log`` receives one line per check.
    Returns ``out_dir``. ValueError (ExportError for a failed check) leaves no output behind."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if quantize is not None and quantize not in Q.QUANTIZE:
        raise ValueError(f"quantize must be one of {list(Q.QUANTIZE)} or None, got {quantize!r}")
    checkpoint_path = Path(checkpoint_path)
    out = Path(out_dir) if out_dir is not None else checkpoint_path.parent / "onnx"
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset must be in 18..{onnx.defs.onnx_opset_version()}, got {opset!r}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise ValueError(f"output {out} exists and is not an empty folder; pass --force to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    ckpt = load_checkpoint(checkpoint_path)
    config, vae, unet = models_from_checkpoint(ckpt, "cpu")
    T, k = config.diffusion.T, config.unet.num_classes
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T} (the model's T), got {steps!r}")
    schedule = config.diffusion.make_schedule()
    guidance = DEFAULT_GUIDANCE if k else None
    decoder = _Decoder(vae, config.latent_scale, config.output_size).eval()
    with torch.inference_mode():
        image_shape = list(decoder(torch.zeros(1, *config.latent_shape)).shape[1:])
    model = {
        "schedule": config.diffusion.schedule, "T": T, "zero_terminal_snr": config.diffusion.zero_terminal_snr,
        "alpha_bars": schedule.alpha_bars.tolist(),
        "prediction": config.diffusion.prediction, "latent_shape": list(config.latent_shape),
        "latent_scale": float(config.latent_scale), "image_shape": image_shape, "num_classes": k,
        "null_class": k if k else None, "timestep_spacing": SPACING, "graph_samplers": list(M.GRAPH_SAMPLERS),
        "graph_precision": precision,
        "defaults": {"sampler": DEFAULT_SAMPLER, "steps": steps, "eta": 0.0, "guidance": guidance,
                     "guidance_rescale": 0.0, "timesteps": timesteps(steps, T, SPACING).tolist()},
    }
    digest = M.model_digest(from_dict(M.Model, model, "model"))

    x = torch.randn(2, *config.latent_shape)
    t = torch.tensor([1, T])
    unet_args = (x, t, torch.tensor([0, k])) if k else (x, t)
    models = {"unet": _to_onnx(unet, unet_args, ["x_t", "t", "y"][: len(unet_args)], "prediction", opset),
              "vae_decoder": _to_onnx(decoder, (x,), ["z"], "image", opset)}
    models["sampler"] = build_sampler(models["unet"], models["vae_decoder"], schedule, config.diffusion.prediction,
                                      k if k else None, precision)
    blobs = {role: _tag(m, role, digest).SerializeToString() for role, m in models.items()}
    sessions = {role: _session(data, role) for role, data in blobs.items()}
    parity = _parity_models(sessions, unet, decoder, config, log)
    parity["sampler"] = _parity_loop(sessions["sampler"], config, vae, unet, steps, guidance, log)
    quantization = None
    if quantize == "int8":
        blobs8, sessions8, quantization = _int8(models, sessions, config, vae, unet, schedule, steps, guidance,
                                                precision, digest, log)
        blobs.update(blobs8)
        sessions.update(sessions8)

    manifest = {
        "format": {"name": M.FORMAT_NAME, "version": M.FORMAT_VERSION}, "ldmkit_version": __version__,
        "opset": opset, "model": model, "conventions": CONVENTIONS,
        "files": {role: {"path": M.FILES[role], "sha256": rt.sha256_bytes(blobs[role]), **_io(sessions[role])}
                  for role in M.FILES},
        "parity": {"max_abs_error": parity, "tolerance": TOLERANCE,
                   "batches": list(PARITY_BATCHES),
                   "sampler_check": f"{' and '.join(M.GRAPH_SAMPLERS)}, {steps} steps, batch 2, vs torch",
                   "graphs": "float32" if quantize is None else "the float32 graphs, before quantization"},
        "quantization": quantization,
        "checkpoint": {"file": checkpoint_path.name, "step": ckpt["step"]},
    }
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    with write_errors(out):
        tmp.mkdir()
    try:
        with write_errors(out):  # a full disk names the folder asked for, not the temporary one
            for role, data in blobs.items():
                (tmp / M.FILES[role]).write_bytes(data)
            (tmp / M.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        rt.OnnxSampler(tmp, provider="cpu")  # the artifact loads and checks as a host will see it
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (only with force) is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
