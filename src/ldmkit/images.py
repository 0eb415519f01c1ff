"""Image output shared by the engine, the ONNX runtime and the command line: a grid of images, a PNG writer
(zlib + struct, no Pillow) and the ``-o grid.png | images.npy`` convention. NumPy only (never torch or click)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ldmkit.common import atomic_write


def make_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] tiled ``nrow`` to a row with ``pad`` black pixels between them;
    returns (C, rows·(H+pad)+pad, nrow·(W+pad)+pad)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1|3, H, W), got {images.shape}")
    n, c, h, w = images.shape
    nrow = max(1, min(int(nrow), n))
    rows = -(-n // nrow)
    grid = np.zeros((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = images[i]
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit PNG of ``image`` (C, H, W) with C = 1 (grey) or 3 (RGB), values in [0, 1] (clipped)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (1|3, H, W), got {image.shape}")
    c, h, w = image.shape
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0).reshape(h, w * c)
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def check_output_path(path) -> Path:
    """``path`` as a Path ending in .png or .npy whose folder exists and is writable (checked before any
    long work, so a bad -o fails fast)."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".npy"):
        raise ValueError(f"output {path} must end in .png (a grid) or .npy (the images as float32 (N, C, H, W))")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"output folder {folder} is not writable")
    return path


def write_images(path, images: np.ndarray, nrow: int = 8) -> Path:
    """Write images (N, C, H, W) in [0, 1]: a PNG grid for ``.png``, the float32 array for ``.npy``.
    All or nothing (``common.atomic_write``): no partial output is ever left."""
    path = check_output_path(path)
    images = np.asarray(images, dtype=np.float32)
    with atomic_write(path) as f:
        if path.suffix.lower() == ".png":
            f.write(png_bytes(make_grid(images, nrow)))
        else:
            np.save(f, images)
    return path
