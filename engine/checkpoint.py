"""The checkpoint file (docs/design.md, "Checkpoint"): a ``torch.save`` of a plain dict, written atomically.

Keys: ``format`` {"name": "ldmkit", "version": 1}, ``config`` (``Config.to_dict()``), ``vae``, ``unet`` and
``ema`` (the U-Net's exponential moving average) state dicts, ``optimizer`` (a dict, possibly empty),
``step`` (int) and ``metrics`` (dict), and ``sha256``: the digest of all of that content (``content_digest``),
recorded by ``save_checkpoint`` and verified by ``load_checkpoint``, so a changed byte in a tensor, even with
the zip's CRC-32s recomputed, is refused as corruption (a checkpoint written before digests loads with a
note). It loads with ``weights_only=True``: no pickled classes, no code.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from ldmkit.common import LdmkitNote, atomic_write, check_nesting, one_line

from .config import MAX_STEPS, Config
from .models import VAE, UNet

FORMAT_NAME = "ldmkit"
FORMAT_VERSION = 1
KEYS = ("format", "config", "vae", "unet", "ema", "optimizer", "step", "metrics")
DIGEST_KEY = "sha256"
"""The optional key holding ``content_digest`` of the rest (absent in checkpoints written before it)."""
MAX_PARAMETERS = 2_000_000_000
"""The most parameters (VAE + U-Net) a checkpoint's config may describe (8 GB of float32 per copy)."""


def make_checkpoint(config: Config, vae: dict, unet: dict, ema: dict, optimizer: dict | None = None,
                    step: int = 0, metrics: dict | None = None) -> dict:
    """The checkpoint dict from a Config and state dicts (``model.state_dict()``, unwrapped from DDP)."""
    return {"format": {"name": FORMAT_NAME, "version": FORMAT_VERSION}, "config": config.to_dict(),
            "vae": dict(vae), "unet": dict(unet), "ema": dict(ema), "optimizer": dict(optimizer or {}),
            "step": int(step), "metrics": dict(metrics or {})}


def save_checkpoint(path, ckpt: dict) -> None:
    """Validate ``ckpt`` and write it to ``path`` all or nothing (``common.atomic_write``), with its
    ``content_digest`` under ``DIGEST_KEY``: on any failure an existing ``path`` is left as it was and no
    temporary file remains. The archive is built in memory and then written, so a full disk or a refused
    write is an OSError with its cause (``torch.save`` writing to the file itself reports any failed write as
    "RuntimeError: ... unexpected pos")."""
    content = {k: v for k, v in ckpt.items() if k != DIGEST_KEY}
    check_nesting(content, str(path))
    validate_checkpoint(content, str(path))
    content[DIGEST_KEY] = content_digest(content)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())


def content_digest(ckpt: dict) -> str:
    """sha256 of a checkpoint's content (every key but ``DIGEST_KEY``), independent of how torch.save lays it
    out: a canonical walk with dict keys sorted, each value tagged with its type; a tensor contributes its
    dtype, shape and raw bytes (C order, the machine's byte order: torch.load gives that back). Nesting must
    already be bounded (``check_nesting``) and every tensor dense (``_check_tensors``); CUDA tensors are
    copied to the CPU for it, as torch.save copies them."""
    h = hashlib.sha256()

    def put(tag: str, data: bytes = b"") -> None:
        h.update(tag.encode() + struct.pack("<Q", len(data)) + data)

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            put("tensor", f"{value.dtype}{value.layout}{tuple(value.shape)}".encode())
            dense = value.to_dense() if value.layout != torch.strided else value  # refused at load, but hashed
            flat = dense.detach().cpu().contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
        elif isinstance(value, dict):
            put("dict", str(len(value)).encode())
            for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
                walk(key)
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            put(type(value).__name__, str(len(value)).encode())
            for item in value:
                walk(item)
        else:  # str, int, float, bool, None, and whatever else weights_only lets through (repr is exact)
            put(type(value).__name__, repr(value).encode())

    walk({k: v for k, v in ckpt.items() if k != DIGEST_KEY})
    return h.hexdigest()


def load_checkpoint(path) -> dict:
    """Load and validate a checkpoint on the CPU (``weights_only=True``); the dict of ``make_checkpoint``,
    ``config`` as a plain dict (``Config.from_dict`` rebuilds it). ValueError, one line naming the file and
    the problem, for anything that is not a valid ldmkit checkpoint of this version: nesting deeper than
    ``MAX_NESTING``, a tensor that is not dense, strided and on the CPU, content that does not match its
    recorded digest (corruption), a config out of its bounds, weights of another dtype or shape than the
    config's model, non-finite weights. A checkpoint without a digest (older ldmkit) loads with an
    ``LdmkitNote`` warning."""
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
    check_nesting(ckpt, str(path))
    _check_format(ckpt, str(path))
    _check_tensors(ckpt, str(path))
    if DIGEST_KEY in ckpt:
        recorded = ckpt.pop(DIGEST_KEY)
        if recorded != content_digest(ckpt):
            raise ValueError(f"{path} is corrupt: its content does not match the sha256 recorded when it was "
                             "written (a changed byte: bit rot, a bad copy or an edit)")
    else:
        warnings.warn(LdmkitNote(f"{path} has no content digest (written before ldmkit recorded one): "
                                 "it is checked for structure only, not for corruption"), stacklevel=2)
    validate_checkpoint(ckpt, str(path))
    return ckpt


def _check_tensors(value, source: str) -> None:
    """Every tensor anywhere in ``value`` must be a plain dense (strided), non-quantised CPU tensor; ValueError
    naming the first that is not (sparse, meta or quantised tensors would fail deep inside torch)."""
    stack = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.layout != torch.strided or item.is_quantized or item.device.type != "cpu":
                kind = "quantised" if item.is_quantized else f"{item.layout}, {item.device.type}"
                raise ValueError(f"{source}: tensor {where or '(top level)'} is {kind}; ldmkit checkpoints hold "
                                 "dense (torch.strided) CPU tensors only")
        elif isinstance(item, dict):
            stack.extend((v, f"{where}[{k!r}]") for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))


def _check_format(ckpt, source: str) -> None:
    """An ldmkit checkpoint of this format version (checked before its digest: another version may digest
    otherwise); ValueError naming ``source``."""
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME:
        what = f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{source} is not an ldmkit checkpoint: it holds {what}, without "
                         f"format {{'name': '{FORMAT_NAME}'}}")
    version = fmt.get("version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ValueError(f"{source}: ldmkit checkpoint format version {version!r} is not supported; this ldmkit "
                         f"reads version {FORMAT_VERSION}" + (" (upgrade ldmkit)" if _newer(version) else ""))


def validate_checkpoint(ckpt, source: str) -> None:
    """Check format, version, keys, config and every state-dict key, dtype, shape and value against models
    built from the config; ValueError naming ``source`` and the first problem."""
    _check_format(ckpt, source)
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{source}: ldmkit checkpoint is missing key(s) {missing}")
    try:
        config = Config.from_dict(ckpt["config"])
    except ValueError as exc:
        raise ValueError(f"{source}: bad checkpoint config: {exc}") from exc
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEPS:
        raise ValueError(f"{source}: checkpoint step must be an int in 0..{MAX_STEPS}, got {step!r:.40}")
    for key in ("optimizer", "metrics"):
        if not isinstance(ckpt[key], dict):
            raise ValueError(f"{source}: checkpoint {key} must be a dict, got {type(ckpt[key]).__name__}")
    expected = model_states(config, source)
    expected["ema"] = expected["unet"]
    for key, want in expected.items():
        _check_state(ckpt[key], want, f"{source}: checkpoint {key}")


def model_states(config: Config, source: str) -> dict:
    """{"vae", "unet"}: the state dicts of the config's models, built on the meta device (no memory);
    ValueError naming ``source`` if they hold more than ``MAX_PARAMETERS`` parameters."""
    with torch.device("meta"):
        states = {"vae": VAE.from_config(config.vae).state_dict(), "unet": UNet.from_config(config.unet).state_dict()}
    size = sum(t.numel() for state in states.values() for t in state.values())
    if size > MAX_PARAMETERS:
        raise ValueError(f"{source}: the config describes {size} parameters, more than the {MAX_PARAMETERS} "
                         "ldmkit builds")
    return states


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
        if value.layout != torch.strided or value.is_quantized or value.is_meta:  # (a trainer saves CUDA ones)
            raise ValueError(f"{where}[{name!r}] must be a dense tensor with data, got layout {value.layout} on "
                             f"{value.device.type}{' (quantised)' if value.is_quantized else ''}")
        if value.dtype != ref.dtype:  # no silent cast: int, uint8, bool or complex weights are not the model's
            raise ValueError(f"{where}[{name!r}] has dtype {value.dtype}, but the config's model has {ref.dtype}")
        if value.shape != ref.shape:
            raise ValueError(f"{where}[{name!r}] has shape {tuple(value.shape)}, but the config's model has "
                             f"{tuple(ref.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = value[~torch.isfinite(value)].reshape(-1)[0].item()
            raise ValueError(f"{where}[{name!r}] holds non-finite weights ({bad}): the checkpoint's weights "
                             "are not usable")
    extra = [name for name in state if name not in want]
    if extra:
        raise ValueError(f"{where} has {extra[0]!r}, which the config's model does not have"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
