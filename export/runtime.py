"""Sample from an exported ONNX artifact with NumPy and ONNX Runtime only (never torch).

The artifact (a folder written by ``ldmkit export onnx``, see ``sampler.json``):
  unet.onnx         (x_t[B,C,H,W] float32, t[B] int64 math timesteps, y[B] int64 labels, 0..K with K the null
                    class) -> prediction[B,C,H,W] float32; an unconditional model (K = 0) has no ``y`` input.
  vae_decoder.onnx  z[B,C,H,W] float32 -> image[B,c,H',W'] float32 in [0, 1]. z is the sampler's z_0 itself:
                    the graph multiplies by ``latent_scale``, decodes, cuts the centred window of the data's own
                    size and maps (x+1)/2 clamped to [0, 1]; [c, H', W'] is model.image_shape.
  sampler.onnx      DDIM (eta = 0) or DPM-Solver++(2M) with classifier-free guidance and the decoder in one
                    ONNX ``Loop`` (``build_sampler`` in sampler_graph.py): (noise[B,C,H,W] float32, y[B] int64,
                    guidance[] float32, steps[] int64, method[] int64: the index in model.graph_samplers; optional
                    guidance_rescale[] float32, φ of R3, default 0) -> images[B,c,H',W'] in [0, 1]; no
                    y/guidance/guidance_rescale inputs for an unconditional model.
  sampler.json      schedule (alpha_bars, math-indexed, length T+1), prediction type, shapes, classes, defaults,
                    the input/output names of each graph and the sha256 of each file.

``OnnxSampler`` checks all of it on load (format, keys, types and bounds, the schedule table against the
reference, the sha256 of each file, each graph's declared inputs/outputs, shapes and ldmkit metadata, and that
sampler.onnx parses and carries exactly the weights of unet.onnx and vae_decoder.onnx, so the one set of hashes
covers every path) and samples with the
reference's own loops (``ldmkit.reference.samplers``): the ONNX U-Net is wrapped as a NumPy model callable
(float32 in and out; the loop itself runs in float64) and classifier-free guidance is the reference's ``cfg``:
one batched U-Net call on [x, x] with labels [y, null] per step.

Seeds: ``seed`` draws from ``numpy.random.default_rng(seed)`` (x_T first, then the loop noise when a step is
stochastic), so a seed gives other images than the same seed in the torch engine (``torch.Generator``).
Explicit ``noise=(x_T, loop_noise)`` float32 arrays give the same images through the torch engine
(``engine.sample.generate(..., noise=...)``), this runtime and sampler.onnx, to float32 round-off.

Errors: every exception ``OnnxSampler`` raises is one of FileNotFoundError or OSError (a missing or unreadable
file), TypeError (an argument of the wrong type) or ValueError, with a one-line message: a bad argument, a bad
or tampered artifact, ``RunError`` (ONNX Runtime could not run a graph), ``common.NonFiniteOutput`` (a result
held NaN or inf: nothing is returned).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ldmkit.common import DEFAULT_SAMPLER, DEFAULT_STEPS, NonFiniteOutput, check_stages, one_line, sampling_stages
from ldmkit.reference import samplers as R

from . import manifest as M
from .manifest import MANIFEST

PROVIDERS = ("auto", "cpu", "cuda")
_RUN_OPTIONS = ort.RunOptions()
_RUN_OPTIONS.log_severity_level = 4
DTYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}
META_ROLE, META_DIGEST, META_FORMAT = "ldmkit.role", "ldmkit.model_sha256", "ldmkit.format"


class RunError(ValueError):
    """ONNX Runtime failed to run one of the artifact's graphs (its first message line is kept)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------------
# the weights inside an .onnx file, read from the protobuf wire format itself (no onnx package here)
# ------------------------------------------------------------------------------------------------------

# ONNX field numbers (onnx/onnx.proto3): ModelProto.graph; GraphProto.node and .initializer; NodeProto.attribute;
# AttributeProto.g and .graphs (a Loop's or If's body); TensorProto.name and .doc_string
# NodeProto.input, .output, .name, .op_type and .domain
_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INIT, _NODE_ATTR, _ATTR_G, _ATTR_GRAPHS, _T_NAME, _T_DOC = 7, 1, 5, 5, 6, 11, 8, 12
_N_INPUT, _N_OUTPUT, _N_NAME, _N_OP, _N_DOMAIN = 1, 2, 3, 4, 7
_MAX_GRAPH_DEPTH = 16


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("a truncated or overlong varint")
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _fields(buf: memoryview):
    """(field number, wire type, value) of each field of one protobuf message: an int (varint), or a
    memoryview (fixed 64/32-bit and length-delimited fields); ValueError for bytes that are not a message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"wire type {wire} of field {field} is not one ONNX uses")
        if i > len(buf) or field == 0:
            raise ValueError("a truncated message")
        yield field, wire, value


def model_contents(data: bytes) -> tuple[dict[str, str], list[tuple]]:
    """What an ONNX model computes, read from its bytes: ({initializer name: sha256 of the tensor, every field but
    its name and doc string}, [each node as (name, op_type, domain, attributes, inputs, outputs)]), through
    every subgraph (a Loop's body); ValueError if ``data`` is not an ONNX model."""
    graphs = [(value, 0) for field, wire, value in _fields(memoryview(data)) if field == _MODEL_GRAPH and wire == 2]
    if len(graphs) != 1:
        raise ValueError("it holds no graph")
    weights, nodes = {}, []
    while graphs:
        graph, depth = graphs.pop()
        if depth > _MAX_GRAPH_DEPTH:
            raise ValueError(f"subgraphs nest more than {_MAX_GRAPH_DEPTH} deep")
        for field, wire, value in _fields(graph):
            if wire != 2:
                continue
            if field == _GRAPH_INIT:
                h, name = hashlib.sha256(), None
                for f, w, v in _fields(value):
                    if f == _T_NAME:
                        name = bytes(v).decode("utf-8", "replace")
                    elif f != _T_DOC:
                        h.update(struct.pack("<BBQ", f, w, v if w == 0 else len(v)) + (b"" if w == 0 else v))
                if name is None or name in weights:
                    raise ValueError(f"an initializer {'without a name' if name is None else repr(name) + ' twice'}")
                weights[name] = h.hexdigest()
            elif field == _GRAPH_NODE:
                parts = {_N_INPUT: [], _N_OUTPUT: [], _N_NAME: [], _N_OP: [], _NODE_ATTR: [], _N_DOMAIN: []}
                for f, w, v in _fields(value):
                    if f in parts and w == 2:
                        parts[f].append(bytes(v))
                    if f == _NODE_ATTR and w == 2:
                        graphs.extend((g, depth + 1) for f2, w2, g in _fields(v)
                                      if f2 in (_ATTR_G, _ATTR_GRAPHS) and w2 == 2)
                text = {f: [b.decode("utf-8", "replace") for b in parts[f]] for f in (_N_INPUT, _N_OUTPUT, _N_NAME)}
                nodes.append(("".join(text[_N_NAME]), b"".join(parts[_N_OP]), b"".join(parts[_N_DOMAIN]),
                              tuple(parts[_NODE_ATTR]), tuple(text[_N_INPUT]), tuple(text[_N_OUTPUT])))
    return weights, nodes


_T_DIMS, _T_TYPE, _T_RAW = 1, 2, 9  # TensorProto.dims, .data_type, .raw_data
_ONNX_DTYPES = {1: np.float32, 7: np.int64, 11: np.float64}  # TensorProto.DataType: FLOAT, INT64, DOUBLE


def initializer_arrays(data: bytes, names) -> dict[str, np.ndarray | None]:
    """The initializers ``names`` of the ONNX model ``data``'s main graph as arrays (as ``numpy_helper.from_array``
    writes them: dims, data type, raw little-endian bytes); None for one stored any other way; a name that is
    not there is left out."""
    graph = next(value for field, wire, value in _fields(memoryview(data)) if field == _MODEL_GRAPH and wire == 2)
    found: dict[str, np.ndarray | None] = {}
    for field, wire, value in _fields(graph):
        if field != _GRAPH_INIT or wire != 2:
            continue
        parts: dict[int, list] = {}
        for f, w, v in _fields(value):
            parts.setdefault(f, []).append((w, v))
        name = bytes(parts.get(_T_NAME, [(2, b"")])[0][1]).decode("utf-8", "replace")
        if name not in names:
            continue
        dtype, raw = parts.get(_T_TYPE, [(0, 0)]), parts.get(_T_RAW, [])
        shape = []
        for w, v in parts.get(_T_DIMS, []):  # one varint each, or packed
            i = 0
            while w == 2 and i < len(v):
                d, i = _varint(v, i)
                shape.append(d)
            shape += [v] if w == 0 else []
        found[name] = None
        if len(dtype) == 1 and dtype[0][1] in _ONNX_DTYPES and len(raw) == 1 and raw[0][0] == 2:
            kind = np.dtype(_ONNX_DTYPES[dtype[0][1]]).newbyteorder("<")
            if int(np.prod(shape)) * kind.itemsize == len(raw[0][1]):
                found[name] = np.frombuffer(bytes(raw[0][1]), kind).reshape(shape)
    return found


def _unprefixed(node: tuple, prefix: str) -> tuple:
    """A node of ``model_contents`` with ``prefix`` taken off its name, inputs and outputs (``onnx.compose``'s
    ``add_prefix_graph`` leaves an empty name empty)."""
    def strip(name: str) -> str:
        return name[len(prefix):] if name.startswith(prefix) else name

    name, op, domain, attrs, inputs, outputs = node
    return strip(name), op, domain, attrs, tuple(map(strip, inputs)), tuple(map(strip, outputs))


def _read_checked(folder: Path, entry: M.File) -> bytes:
    path = folder / entry.path
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the ONNX artifact")
    data = path.read_bytes()
    if sha256_bytes(data) != entry.sha256:
        raise ValueError(f"{path} does not match the sha256 recorded in {MANIFEST}: the file was changed or swapped")
    return data


def _providers(provider: str) -> list[str]:
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {list(PROVIDERS)}, got {provider!r}")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not has_cuda:
        raise ValueError("provider 'cuda' was asked, but this onnxruntime has no CUDAExecutionProvider "
                         "(install onnxruntime-gpu)")
    if provider == "cpu" or not has_cuda:
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def session_options(threads: int = 1) -> ort.SessionOptions:
    """All graph optimizations, warnings off, ``threads`` intra-op threads (``OnnxSampler`` runs one: it
    spreads a batch over the cores by rows instead, see ``OnnxSampler``)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 4  # fatal only: errors reach the caller as exceptions, not as extra stderr lines
    opts.intra_op_num_threads = int(threads)
    return opts


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def row_slices(n: int, parts: int) -> list[slice]:
    """``n`` rows cut into ``min(parts, n)`` contiguous slices whose sizes differ by at most one."""
    bounds = np.linspace(0, n, min(parts, n) + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def describe_io(args) -> list[dict]:
    """sampler.json's form of a session's ``get_inputs()``/``get_outputs()``: name, dtype, shape ("batch")."""
    return [{"name": a.name, "dtype": next((k for k, v in DTYPES.items() if v == a.type), a.type),
             "shape": [d if isinstance(d, int) else "batch" for d in a.shape]} for a in args]


def check_session(session: ort.InferenceSession, entry: M.File, role: str, digest: str, source) -> None:
    """The session's inputs/outputs must be those sampler.json declares and its metadata must name ``role``
    and the manifest's model digest; ValueError naming ``source`` otherwise."""
    got = {"inputs": describe_io(session.get_inputs()), "outputs": describe_io(session.get_outputs())}
    for key in ("inputs", "outputs"):
        if got[key] != list(getattr(entry, key)):
            raise ValueError(f"{source}: its {key} {got[key]} differ from those {MANIFEST} declares for {role} "
                             f"{list(getattr(entry, key))}")
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get(META_ROLE) != role:
        raise ValueError(f"{source} is the artifact's {meta.get(META_ROLE)!r} model, not its {role!r} model")
    if meta.get(META_DIGEST) != digest:
        raise ValueError(f"{source} was exported with another model description than {MANIFEST} holds "
                         f"({MANIFEST} was edited, or the file comes from another export)")


class OnnxSampler:
    """An exported artifact, loaded and checked (see the module docstring). ``provider``: 'auto' (CUDA where
    it loads, else CPU), 'cpu' or 'cuda' (ValueError rather than a silent CPU fallback); ``.provider`` is
    what runs; ``.precision`` is the U-Net's ("float32", or "int8" from ``export onnx --quantize int8``).

    ``threads``: the CPU cores a call may use (None: ``available_cores()``). On the CPU every graph runs on one
    intra-op thread and a call of B rows runs as min(threads, B) row slices at once, one thread each (sessions
    are thread-safe and release the GIL): the models are small, and ONNX Runtime's intra-op threads cost more
    in per-operator hand-offs than they gain (BENCHMARKS.md, "The int8 U-Net call"). Every image is computed
    on its own, so the slices give the images of one run."""

    def __init__(self, path, provider: str = "auto", threads: int | None = None):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.path = Path(path)
        self.manifest = M.read_manifest(self.path)
        self.model = self.manifest.model
        self.schedule = self.model.make_schedule()
        self.latent_shape = tuple(self.model.latent_shape)
        self.num_classes = self.model.num_classes
        self.precision = self.manifest.unet_precision  # the U-Net's: "float32" or "int8" (sampler.json)
        self._digest = M.model_digest(self.model)
        self._blobs = {role: _read_checked(self.path, self.manifest.files[role]) for role in M.FILES}
        self._providers = _providers(provider)
        self._options = session_options(1)
        self._check_embedded_weights()
        self.unet = self._session("unet")
        self.decoder = self._session("vae_decoder")
        self._check_shapes()
        self._graph = None
        used = self.unet.get_providers()
        if self._providers[0] == "CUDAExecutionProvider" and used[0] != "CUDAExecutionProvider":
            if provider == "cuda":
                raise ValueError("provider 'cuda' was asked, but onnxruntime could not load its CUDA provider "
                                 f"(the session runs on {used}); refusing to fall back to CPU")
        self.provider = "cuda" if used[0] == "CUDAExecutionProvider" else "cpu"
        self.threads = 1 if self.provider == "cuda" else threads or available_cores()
        self._pool = ThreadPoolExecutor(self.threads, "ldmkit-ort") if self.threads > 1 else None
        if self._pool is not None:
            weakref.finalize(self, self._pool.shutdown, wait=False)
        self._unet_out = self.unet.get_outputs()[0].name

    def _check_embedded_weights(self) -> None:
        """sampler.onnx must parse and hold exactly the weights and nodes of unet.onnx and vae_decoder.onnx
        (their names prefixed "unet/" and "vae_decoder/"), so an edit to either reaches every path or fails here,
        and its own schedule tables must be those of sampler.json's model (``manifest.sampler_tables``), so its
        step coefficients are the Python loop's."""
        contents = {}
        for role, blob in self._blobs.items():
            try:
                contents[role] = model_contents(blob)
            except ValueError as exc:
                raise ValueError(f"{self.path / M.FILES[role]} is not a valid ONNX model ({exc})") from exc
        for role in ("unet", "vae_decoder"):
            prefix, (weights, nodes) = f"{role}/", contents[role]
            want = {prefix + name: d for name, d in weights.items()}
            got = {name: d for name, d in contents["sampler"][0].items() if name.startswith(prefix)}
            diff = sorted(set(got) ^ set(want)) or sorted(n for n in want if got[n] != want[n])
            if not diff:
                copy = [_unprefixed(n, prefix) for n in contents["sampler"][1] if n[0].startswith(prefix)]
                diff = [f"{len(copy)} nodes, not {len(nodes)}"] if len(copy) != len(nodes) else [
                    f"node {a[0]}" for a, b in zip(nodes, copy, strict=True) if a != b]
            if diff:
                raise ValueError(f"{self.path / M.FILES['sampler']} does not carry the weights and nodes of "
                                 f"{M.FILES[role]} (first difference: {diff[0]!r:.80}): the files come from "
                                 "different exports or one was edited")
        want = M.sampler_tables(self.schedule, self.model.graph_precision)
        got = initializer_arrays(self._blobs["sampler"], set(want))
        for (name, table), key in zip(want.items(), M.SAMPLER_TABLES, strict=True):
            have = got.get(name)
            if have is None or have.dtype != table.dtype or have.shape != table.shape \
                    or have.tobytes() != table.tobytes():
                raise ValueError(f"{self.path / M.FILES['sampler']}: its {key} table ({name}) is not the one "
                                 f"{MANIFEST}'s schedule gives ({self.model.schedule}, T = {self.model.T}): the "
                                 "file was edited or comes from another export")

    def graph_session(self) -> ort.InferenceSession:
        """sampler.onnx's session, made on first use (``sample`` never needs it; ``ldmkit verify`` makes it)."""
        if self._graph is None:
            self._graph = self._session("sampler")
        return self._graph

    def _check_shapes(self) -> None:
        """The latent shape of sampler.json must be the shape unet.onnx and vae_decoder.onnx take, and its
        image shape the decoder's output."""
        for session, role in ((self.unet, "unet"), (self.decoder, "vae_decoder")):
            got = list(session.get_inputs()[0].shape[1:])
            if got != list(self.latent_shape):
                raise ValueError(f"{self.path / MANIFEST}: model.latent_shape {list(self.latent_shape)} is not the "
                                 f"shape {M.FILES[role]} takes ({got})")
        got = list(self.decoder.get_outputs()[0].shape[1:])
        if got != list(self.model.image_shape):
            raise ValueError(f"{self.path / MANIFEST}: model.image_shape {list(self.model.image_shape)} is not the "
                             f"shape {M.FILES['vae_decoder']} gives ({got})")

    def _run(self, session: ort.InferenceSession, role: str, outputs, feeds: dict, batched=()) -> list:
        """``session.run`` with ONNX Runtime's own failures as ``RunError``; the rows of the ``batched`` inputs
        run as up to ``self.threads`` slices at once (see the class) and each output's slices are joined."""
        parts = row_slices(len(feeds[batched[0]]), self.threads) if batched and self._pool is not None else []
        if len(parts) <= 1:
            return self._run_once(session, role, outputs, feeds)
        futures = [self._pool.submit(self._run_once, session, role, outputs,
                                     {k: v[rows] if k in batched else v for k, v in feeds.items()})
                   for rows in parts]
        results = [f.result() for f in futures]
        return [np.concatenate(pieces) for pieces in zip(*results, strict=True)]

    def _run_once(self, session: ort.InferenceSession, role: str, outputs, feeds: dict) -> list:
        try:
            return session.run(outputs, feeds, _RUN_OPTIONS)
        except (ValueError, TypeError, RuntimeError) as exc:  # onnxruntime's types derive from RuntimeError
            raise RunError(f"onnxruntime could not run {self.path / M.FILES[role]}: "
                           f"{one_line(exc, limit=200, first=True)}") from exc

    def _session(self, role: str) -> ort.InferenceSession:
        entry = self.manifest.files[role]
        source = self.path / entry.path
        try:
            session = ort.InferenceSession(self._blobs[role], self._options, providers=self._providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            reason = one_line(exc, limit=160, first=True)
            raise ValueError(f"{source} cannot be loaded by onnxruntime {ort.__version__}: {reason}") from exc
        check_session(session, entry, role, self._digest, source)
        return session

    # ------------------------------------------------------------------------------------- arguments

    def labels(self, n: int, labels=None):
        """(n,) int64 labels: None → 0, 1, …, K−1 in turn; an int → all that class; an array of n class ids.
        None for an unconditional model (labels must then be None). ``reference.samplers.class_labels``."""
        return R.class_labels(n, self.num_classes, labels)

    def check(self, sampler: str, steps: int, eta: float, guidance, guidance_rescale: float = 0.0) -> R.SamplerInfo:
        """ValueError naming the argument (``reference.samplers.check_sampling``); the sampler's row."""
        return R.check_sampling(self.schedule, sampler, steps, eta, guidance, self.model.null_class, guidance_rescale)

    def noise(self, n: int, steps: int, seed: int, loop: bool = True):
        """(x_T (n, C, H, W), loop noise (steps, n, C, H, W) or None) float32 from ``default_rng(seed)``."""
        rng = np.random.default_rng(seed)
        shape = (n, *self.latent_shape)
        x_T = rng.standard_normal(shape, dtype=np.float32)
        return x_T, (rng.standard_normal((steps, *shape), dtype=np.float32) if loop else None)

    def _noise(self, noise, n: int, steps: int, seed: int, loop: bool):
        if noise is None:
            return self.noise(n, steps, seed, loop)
        if not isinstance(noise, (tuple, list)) or len(noise) != 2:
            raise TypeError("noise must be a pair (x_T, loop_noise); loop_noise may be None for a deterministic run")
        x_T = np.asarray(noise[0], dtype=np.float32)
        shape = (n, *self.latent_shape)
        if x_T.shape != shape:
            raise ValueError(f"noise: x_T must have shape {shape}, got {x_T.shape}")
        if noise[1] is None:
            if loop:
                raise ValueError(f"noise: this sampler needs loop noise of shape {(steps, *shape)}, got None")
            return x_T, None
        z = np.asarray(noise[1], dtype=np.float32)
        if z.shape != (steps, *shape):
            raise ValueError(f"noise: loop noise must have shape {(steps, *shape)}, got {z.shape}")
        return x_T, z

    # ------------------------------------------------------------------------------------ the models

    def unet_fn(self, x, t, y=None) -> np.ndarray:
        """The U-Net as a NumPy model callable: x (B, C, H, W), t (B,) math timesteps, y (B,) labels or None
        (the null class) → (B, C, H, W) float32; NonFiniteOutput if it holds NaN or inf. On CUDA it runs through
        IO binding."""
        feeds = {"x_t": np.ascontiguousarray(x, dtype=np.float32), "t": np.asarray(t, dtype=np.int64)}
        if self.num_classes:
            feeds["y"] = (np.full(len(feeds["t"]), self.num_classes, dtype=np.int64) if y is None
                          else np.asarray(y, dtype=np.int64))
        if self.provider == "cuda":
            out = self._unet_cuda(feeds)
        else:
            out = self._run(self.unet, "unet", [self._unet_out], feeds, tuple(feeds))[0]
        if not np.isfinite(out).all():
            raise NonFiniteOutput(f"sampling produced NaN or inf in the sampler: {M.FILES['unet']}'s output at "
                                  f"t = {int(np.ravel(feeds['t'])[0])} (its weights, or the guidance); no images "
                                  "were written")
        return out

    def _unet_cuda(self, feeds: dict) -> np.ndarray:
        try:
            binding = self.unet.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output(self._unet_out, "cuda")
            self.unet.run_with_iobinding(binding, _RUN_OPTIONS)
            return binding.copy_outputs_to_cpu()[0]
        except (ValueError, TypeError, RuntimeError) as exc:
            raise RunError(f"onnxruntime could not run {self.path / M.FILES['unet']}: "
                           f"{one_line(exc, limit=200, first=True)}") from exc

    def decode(self, z) -> np.ndarray:
        """vae_decoder.onnx: z_0 (B, C, H, W) → images (B, c, H', W') float32 in [0, 1]."""
        return self._run(self.decoder, "vae_decoder", None, {"z": np.ascontiguousarray(z, dtype=np.float32)},
                         ("z",))[0]

    # ------------------------------------------------------------------------------------- sampling

    def sample(self, n: int, labels=None, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, eta: float = 0.0,
               guidance: float | None = None, seed: int = 0, noise=None, guidance_rescale: float = 0.0) -> np.ndarray:
        """n images (n, c, H', W') float32 in [0, 1] through the reference's loops and the ONNX U-Net.

        ``labels``: see ``labels``. ``guidance``: classifier-free guidance w (None: 1, plain conditional
        sampling, one U-Net call per step; otherwise one batched call on 2n); ``guidance_rescale`` its φ
        (R3, 0: none). ``noise``: (x_T (n, C, H, W), loop noise (steps, n, C, H, W), None for ddim with
        eta = 0, heun, dpmpp2m) instead of ``seed``."""
        y = self.labels(n, labels)
        info = self.check(sampler, steps, eta, guidance, guidance_rescale)
        x_T, loop = self._noise(noise, n, steps, seed, info.stochastic or eta > 0)
        with np.errstate(all="ignore"):  # overflow is found below, by stage, rather than warned about
            z = R.sample(self.unet_fn, x_T, self.schedule, sampler, steps, eta, loop, self.model.prediction, y,
                         guidance, self.model.null_class, guidance_rescale=guidance_rescale)
            scaled = z * self.model.latent_scale
        images = self.decode(z)
        check_stages(sampling_stages(self.model.latent_scale, sampler, guidance),
                     [bool(np.isfinite(v).all()) for v in (z, scaled, images)])
        return images

    def sample_graph(self, n: int, labels=None, steps: int = DEFAULT_STEPS, guidance: float | None = None,
                     seed: int = 0, noise=None, sampler: str = DEFAULT_SAMPLER,
                     guidance_rescale: float = 0.0) -> np.ndarray:
        """The same as ``sample(n, labels, sampler, steps, 0.0, guidance, seed, noise, guidance_rescale)`` in ONE
        ``session.run`` of sampler.onnx, for a ``sampler`` of ``model.graph_samplers`` (DDIM with η = 0,
        DPM-Solver++(2M))."""
        y = self.labels(n, labels)
        self.check(sampler, steps, 0.0, guidance, guidance_rescale)
        if sampler not in self.model.graph_samplers:
            raise ValueError(f"sampler.onnx runs {list(self.model.graph_samplers)}, not {sampler!r} "
                             "(sample() runs every sampler through the Python loop)")
        x_T, _ = self._noise(noise, n, steps, seed, False)
        graph = self.graph_session()
        feeds = {"noise": x_T, "steps": np.array(steps, dtype=np.int64),
                 "method": np.array(self.model.graph_samplers.index(sampler), dtype=np.int64)}
        if y is not None:
            feeds["y"] = y
            feeds["guidance"] = np.array(1.0 if guidance is None else guidance, dtype=np.float32)
            feeds["guidance_rescale"] = np.array(guidance_rescale, dtype=np.float32)
        images = self._run(graph, "sampler", None, feeds, ("noise", "y") if y is not None else ("noise",))[0]
        check_stages([f"{M.FILES['sampler']} ({sampler}, guidance {guidance})"], [bool(np.isfinite(images).all())])
        return images
