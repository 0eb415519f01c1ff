"""The checkpoint file (docs/design.md, "Checkpoint"): a ``torch.save`` of a plain dict, written atomically.

Keys: ``format`` {"name": "ldmkit", "version": 1}, ``config`` (``Config.to_dict()``), ``vae``, ``unet`` and
``ema`` (the U-Net's exponential moving average) state dicts, ``optimizer`` (a dict, possibly empty),
``step`` (int) and ``metrics`` (dict). It loads with ``weights_only=True``: no pickled classes, no code.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from ldmkit.common import atomic_write, one_line

from .config import Config
from .models import VAE, UNet

FORMAT_NAME = "ldmkit"
FORMAT_VERSION = 1
KEYS = ("format", "config", "vae", "unet", "ema", "optimizer", "step", "metrics")


def make_checkpoint(config: Config, vae: dict, unet: dict, ema: dict, optimizer: dict | None = None,
                    step: int = 0, metrics: dict | None = None) -> dict:
    """The checkpoint dict from a Config and state dicts (``model.state_dict()``, unwrapped from DDP)."""
    return {"format": {"name": FORMAT_NAME, "version": FORMAT_VERSION}, "config": config.to_dict(),
            "vae": dict(vae), "unet": dict(unet), "ema": dict(ema), "optimizer": dict(optimizer or {}),
            "step": int(step), "metrics": dict(metrics or {})}


def save_checkpoint(path, ckpt: dict) -> None:
    """Validate ``ckpt`` and write it to ``path`` all or nothing (``common.atomic_write``): on any failure an
    existing ``path`` is left as it was and no temporary file remains. The archive is built in memory and
    then written, so a full disk or a refused write is an OSError with its cause (``torch.save`` writing to
    the file itself reports any failed write as "RuntimeError: ... unexpected pos")."""
    validate_checkpoint(ckpt, str(path))
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())


def load_checkpoint(path) -> dict:
    """Load and validate a checkpoint on the CPU (``weights_only=True``); the dict of ``make_checkpoint``,
    ``config`` as a plain dict (``Config.from_dict`` rebuilds it). ValueError, one line naming the file and
    the problem, for anything that is not a valid ldmkit checkpoint of this version."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not an ldmkit checkpoint: not a file")
    try:  # torch.save writes a zip whose members carry CRC-32s, which torch.load does not check
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"member {bad} fails its CRC check: the file is corrupt")
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # zipfile and torch raise many types for a non-torch, truncated or foreign file
        reason = one_line(exc, limit=160, first=True)
        raise ValueError(f"{path} is not an ldmkit checkpoint: not a readable torch file ({reason})") from exc
    validate_checkpoint(ckpt, str(path))
    return ckpt


def validate_checkpoint(ckpt, source: str) -> None:
    """Check format, version, keys, config and every state-dict key and shape against models built from
    the config; ValueError naming ``source`` and the first problem."""
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME:
        what = f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{source} is not an ldmkit checkpoint: it holds {what}, without "
                         f"format {{'name': '{FORMAT_NAME}'}}")
    version = fmt.get("version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ValueError(f"{source}: ldmkit checkpoint format version {version!r} is not supported; this ldmkit "
                         f"reads version {FORMAT_VERSION}" + (" (upgrade ldmkit)" if _newer(version) else ""))
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{source}: ldmkit checkpoint is missing key(s) {missing}")
    try:
        config = Config.from_dict(ckpt["config"])
    except ValueError as exc:
        raise ValueError(f"{source}: bad checkpoint config: {exc}") from exc
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{source}: checkpoint step must be an int >= 0, got {step!r}")
    for key in ("optimizer", "metrics"):
        if not isinstance(ckpt[key], dict):
            raise ValueError(f"{source}: checkpoint {key} must be a dict, got {type(ckpt[key]).__name__}")
    with torch.device("meta"):
        expected = {"vae": VAE.from_config(config.vae).state_dict(), "unet": UNet.from_config(config.unet).state_dict()}
    expected["ema"] = expected["unet"]
    for key, want in expected.items():
        _check_state(ckpt[key], want, f"{source}: checkpoint {key}")


def _newer(version) -> bool:
    return isinstance(version, int) and version > FORMAT_VERSION


def _check_state(state, want: dict, where: str) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{where} must be a state dict, got {type(state).__name__}")
    for name, ref in want.items():
        if name not in state:
            raise ValueError(f"{where} is missing {name!r} (shape {tuple(ref.shape)}), which the config's model has")
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.shape != ref.shape:
            raise ValueError(f"{where}[{name!r}] has shape {tuple(value.shape)}, but the config's model has "
                             f"{tuple(ref.shape)}")
    extra = [name for name in state if name not in want]
    if extra:
        raise ValueError(f"{where} has {extra[0]!r}, which the config's model does not have"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
