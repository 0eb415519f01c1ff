"""What every part of ldmkit shares, in one place: the product's sampling defaults, one-line error messages
and all-or-nothing file writes. Standard library only (no NumPy, torch or click), so the command line can
read the defaults for its help text without importing anything heavy.

The math's own names live with the math: the samplers in ``reference.samplers.SAMPLERS``, the prediction
types in ``reference.posterior.PREDICTIONS``; the ONNX artifact's schema in ``export.manifest``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ldmkit import __version__

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
    "LIMITS",
    "MAX_GUIDANCE",
    "MAX_JSON_BYTES",
    "MAX_NESTING",
    "MAX_SAMPLES",
    "MAX_T",
    "SPACING",
    "LdmkitNote",
    "NonFiniteOutput",
    "WriteFailed",
    "__version__",
    "atomic_write",
    "check_finite_floats",
    "check_nesting",
    "check_stages",
    "checked",
    "from_dict",
    "nesting_depth",
    "one_line",
    "read_json",
    "sampling_stages",
    "to_plain",
    "write_errors",
]

DEFAULT_SAMPLER = "dpmpp2m"
"""The sampler that ``ldmkit sample``, the training grids, ``ldmkit eval`` and sampler.json use by default:
DPM-Solver++(2M), which reaches DDIM-50's sample quality with 10 steps (BENCHMARKS.md, "Sample quality
against U-Net calls")."""

DEFAULT_STEPS = 10
"""Sampling steps by default (see ``DEFAULT_SAMPLER``)."""

DEFAULT_GUIDANCE = 1.15
"""Classifier-free guidance w by default for a class-conditional model (A9; w = 1 is plain conditional):
the best trade-off for the demo preset (v-prediction), whose varied digits guidance narrows fast. On four
noise seeds of ``ldmkit eval`` (500 samples each) it gives class accuracy 0.962–0.976 at Fréchet ratios
1.06–1.27 to the real floor; w = 1.1 drops to 0.948 on one seed, w = 1.2 rises to 1.44 on one
(BENCHMARKS.md, "Training recipes"). The ε-prediction recipe it replaced does best near w = 2."""

SPACING = "trailing"
"""The step list every product path samples on: ``reference.schedules.timesteps(N, T, "trailing")``, which
starts at t = T (Lin et al. 2024) so that sampling starts from the noise level training ends at."""


# ------------------------------------------------------------------------------------------------------
# limits: checked before anything is allocated (README, "Reliability and limits")
# ------------------------------------------------------------------------------------------------------

MAX_T = 10_000
"""The most diffusion steps T a config, a checkpoint or sampler.json may declare (the ᾱ table has T + 1 rows)."""

MAX_SAMPLES = 10_000
"""The most images one sampling call draws (``-n``): they are sampled as one batch."""

MAX_GUIDANCE = 100.0
"""Classifier-free guidance w must lie in [0, MAX_GUIDANCE]: ε_∅ + w(ε_y − ε_∅) stays far from float32's
range (3.4e38) for any model whose outputs are, and the samples are checked for non-finite values anyway."""

MAX_NESTING = 64
"""The deepest nesting of lists/dicts accepted in a checkpoint, a config or sampler.json (ldmkit writes 5)."""

MAX_JSON_BYTES = 64 << 20
"""The largest config.json or sampler.json read (sampler.json at T = MAX_T is about 250 kB)."""

LIMITS = {"T": MAX_T, "n": MAX_SAMPLES, "guidance": MAX_GUIDANCE, "nesting": MAX_NESTING,
          "json_bytes": MAX_JSON_BYTES}


class LdmkitNote(UserWarning):
    """Something a user should know that is not an error (one line; the command line prints it as "note: ..."
    on stderr when the command succeeds), e.g. a checkpoint without a content digest."""


class NonFiniteOutput(ValueError):
    """A computation produced NaN or ±inf where a finite result is due (samples, metrics); the message names
    the stage (the checkpoint's weights, its latent scale, or the sampler). Nothing is written."""


def sampling_stages(latent_scale, sampler: str, guidance) -> list[str]:
    """The stages of sampling whose outputs ``check_stages`` checks, in order, as an error names them."""
    return [f"the sampler ({sampler}, guidance {guidance}: the U-Net's weights or the guidance)",
            f"the latent scale (z_0 times latent_scale {latent_scale})", "the VAE decoder (its weights)"]


def check_stages(stages: list[str], finite: list[bool]) -> None:
    """NonFiniteOutput naming the first of ``stages`` whose output is not all finite (``finite[i]`` False)."""
    for stage, ok in zip(stages, finite, strict=True):
        if not ok:
            raise NonFiniteOutput(f"sampling produced NaN or inf in {stage}; no images were written")


def nesting_depth(value, limit: int = MAX_NESTING) -> int:
    """How deeply lists, tuples and dicts nest in ``value`` (a scalar: 0), counted without recursion and
    stopping at ``limit`` + 1, so a hostile 100,000-deep structure costs no more than a legal one."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_nesting(value, where: str) -> None:
    """ValueError naming ``where`` when ``value`` nests deeper than ``MAX_NESTING``."""
    if nesting_depth(value) > MAX_NESTING:
        raise ValueError(f"{where} nests lists/objects more than {MAX_NESTING} deep: not an ldmkit file")


def read_json(path, what: str):
    """The JSON value in file ``path`` (``what`` names it in errors): at most ``MAX_JSON_BYTES``, UTF-8, valid
    JSON, nested at most ``MAX_NESTING`` deep; ValueError otherwise (never RecursionError or MemoryError)."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{path} is {size} bytes, more than the {MAX_JSON_BYTES} a {what} may have")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {one_line(exc)}") from exc
    except RecursionError as exc:
        raise ValueError(f"{path} nests lists/objects more than {MAX_NESTING} deep: not an ldmkit file") from exc
    check_nesting(value, str(path))
    return value


def check_finite_floats(values: dict, where: str) -> None:
    """NonFiniteOutput naming the first key of ``values`` (a flat dict) whose float is NaN or ±inf."""
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise NonFiniteOutput(f"{where}: {bad[0]} is {values[bad[0]]} (non-finite); nothing was written")


def one_line(exc: BaseException | str, limit: int | None = None, first: bool = False) -> str:
    """The message of ``exc`` (an exception or a text) as one line: its lines joined by single spaces, or with
    ``first`` only its first non-empty line (for a foreign library's message, whose later lines are a dump);
    cut to ``limit`` characters; the exception's class name when the message is empty."""
    text = str(exc).strip()
    if first:
        text = next((line for line in text.splitlines() if line.strip()), "")
    text = " ".join(text.split())
    if not text:
        text = type(exc).__name__ if isinstance(exc, BaseException) else "unknown error"
    return text if limit is None else text[:limit]


class WriteFailed(OSError):
    """Writing ``path`` failed (a full disk, a quota, no permission, a read-only file system): its message is
    "could not write PATH: CAUSE" and what was left as it was, if the writer says (``then``)."""

    def __init__(self, path, cause: str, then: str = ""):
        super().__init__(f"could not write {path}: {cause}{then}")
        self.path, self.cause = Path(path), cause


@contextlib.contextmanager
def write_errors(path, then: str = "") -> Iterator[None]:
    """Turn an OSError raised in the block into a :class:`WriteFailed` naming ``path`` and the cause (the
    OS's words: "No space left on device"), followed by ``then``; one raised by an inner ``write_errors``
    keeps its path and cause and gets this ``then``."""
    try:
        yield
    except WriteFailed as exc:
        if not then:
            raise
        raise WriteFailed(exc.path, exc.cause, then) from exc
    except OSError as exc:
        raise WriteFailed(path, exc.strerror or one_line(exc), then) from exc


@contextlib.contextmanager
def atomic_write(path, binary: bool = True) -> Iterator[IO]:
    """Write ``path`` all or nothing: yields a new temporary file in the same folder (usual permissions,
    0666 less the umask); when the block ends it is flushed, fsynced and renamed over ``path``, and the
    rename itself is made durable. On any failure (the block raising, a full disk, a kill) the temporary
    file is removed and an existing ``path`` keeps its old content; an OSError (the block's writes
    included) is a :class:`WriteFailed` naming ``path``: "could not write PATH: No space left on device"."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with write_errors(path):
        try:
            with open(tmp, "xb" if binary else "x") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        if hasattr(os, "O_DIRECTORY"):  # POSIX: fsync the folder so the rename survives a power cut
            fd = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ------------------------------------------------------------------------------------------------------
# plain data (JSON, checkpoint dicts) <-> dataclasses: the config and the ONNX artifact's manifest
# ------------------------------------------------------------------------------------------------------


def checked(valid: str, check=None, **kwargs) -> Any:
    """A dataclass field that ``from_dict`` checks: ``check(value)`` must hold (after the type check), and
    either failure says "<where> must be <valid>, got <value>"."""
    return dataclasses.field(metadata={"valid": valid, "check": check}, **kwargs)


def to_plain(value):
    """A dataclass (or nested dicts, lists, tuples) as plain JSON-ready data: tuples become lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def from_dict(cls, d, where: str):
    """The dataclass ``cls`` from plain data ``d``; ValueError naming (``where``.key) any unknown, missing or
    mistyped key, and any value that fails its field's ``checked`` condition. Nested dataclasses, optional
    values, ``tuple[X, ...]`` and ``dict[str, X]`` are read recursively; an int is taken where a float is due."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a dict (a JSON object), got {type(d).__name__}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = sorted(set(d) - set(names), key=str)
    missing = [n for n in names if n not in d]
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; expected {names}")
    if missing:
        raise ValueError(f"{where} is missing key(s) {missing}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields:
        valid, check, key = f.metadata.get("valid"), f.metadata.get("check"), _key(where, f.name)
        value = _coerce(d[f.name], hints[f.name], key, valid)
        if check is not None and not check(value):
            raise ValueError(f"{key} must be {valid}, got {d[f.name]!r:.80}")
        values[f.name] = value
    return cls(**values)


def _key(where: str, name: str) -> str:
    """How an error names a key: "config.unet.base_channels", or "FILE: model.T" below a ``where`` ending in ":"."""
    return f"{where} {name}" if where.endswith(":") else f"{where}.{name}"


def _coerce(value, tp, where: str, valid: str | None = None):
    """``value`` checked against the annotation ``tp`` (one of the few plain types the dataclasses use)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(value, tp, where, valid)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be {valid or 'a list of ' + args[0].__name__}, got {type(value).__name__}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]", valid) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be {valid or 'an object'}, got {type(value).__name__}")
        return {k: _coerce(v, args[1], _key(where, k)) for k, v in value.items()}
    tp = origin or tp
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        if valid is not None:
            raise ValueError(f"{where} must be {valid}, got {value!r:.80}")
        raise ValueError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
