"""What every part of ldmkit shares, in one place: the product's sampling defaults, one-line error messages
and all-or-nothing file writes. Standard library only (no NumPy, torch or click), so the command line can
read the defaults for its help text without importing anything heavy.

The math's own names live with the math: the samplers in ``reference.samplers.SAMPLERS``, the prediction
types in ``reference.posterior.PREDICTIONS``; the ONNX artifact's schema in ``export.manifest``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ldmkit import __version__

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "SPACING", "__version__", "atomic_write",
           "one_line"]

DEFAULT_SAMPLER = "ddim"
"""The sampler that ``ldmkit sample``, the training grids, ``ldmkit eval`` and sampler.json use by default."""

DEFAULT_STEPS = 50
"""Sampling steps by default (DDIM-50: the artifact's default and the README's)."""

DEFAULT_GUIDANCE = 3.0
"""Classifier-free guidance w by default for a class-conditional model (A9; w = 1 is plain conditional)."""

SPACING = "trailing"
"""The step list every product path samples on: ``reference.schedules.timesteps(N, T, "trailing")``, which
starts at t = T (Lin et al. 2024) so that sampling starts from the noise level training ends at."""


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


@contextlib.contextmanager
def atomic_write(path, binary: bool = True) -> Iterator[IO]:
    """Write ``path`` all or nothing: yields a new temporary file in the same folder (usual permissions,
    0666 less the umask); when the block ends it is flushed, fsynced and renamed over ``path``, and the
    rename itself is made durable. On any failure (the block raising, a full disk, a kill) the temporary
    file is removed and an existing ``path`` keeps its old content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
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
