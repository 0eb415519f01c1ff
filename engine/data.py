"""Datasets: the built-in MNIST-8k, MNIST IDX files, .npz/.npy arrays and folders of images.

Every source becomes float32 images (N, C, H, W) in [−1, 1] (0 = black → −1) at the config's square
``image_size``, and int64 labels (N,) or None (unlabelled: an unconditional model). Images that fit are
padded, centred, to ``image_size`` with their background colour (the median of their border pixels; MNIST's
black: 28 → 32 adds 2 pixels each side); larger ones are first scaled down (antialiased bilinear) so that
their longer side fits. The data's own size, ``content_size`` (height, width) in the description, is the
size the images had before padding: their size when they fit (MNIST: 28×28), the size they were scaled down
to otherwise; for a folder of images of several sizes, the largest fitted height and the largest fitted width
over all its images (both splits), so that the centred ``content_size`` window (``center_crop``) holds every
image's pixels. Sampling returns images at that size (``Config.output_size``).

Every dataset is split the same way: a permutation drawn with ``numpy.random.default_rng(SPLIT_SEED)``,
whose first round(N·TEST_FRACTION) indices are the test split and the rest the train split (each kept in
file order). The built-in 8,000 digits give 7,000 train and 1,000 test.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 0
TEST_FRACTION = 1 / 8
MAX_CLASSES = 1000  # a label above this is taken for a corrupt file, not a class id
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "test")


def load_dataset(spec: str, split: str, image_size: int, num_classes: int | None = None):
    """Load a dataset split: (images float32 (N, C, S, S) in [−1, 1], labels int64 (N,) or None, description).

    ``spec``: "mnist" (the built-in 8,000 digits), a path to an IDX image file ``*-idx3-ubyte[.gz]`` (its
    labels file ``*-idx1-ubyte[.gz]``, named with "images"→"labels", "idx3"→"idx1", must lie beside it), a
    ``.npz`` (keys images/labels or x/y; labels optional), a ``.npy`` of images (unlabelled), or a folder
    of images (needs Pillow; class subfolders give labels in sorted-name order). Images are uint8, or
    float in [0, 1]; shapes (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3.
    ``num_classes``: if given, labels must lie in 0..num_classes−1; otherwise it is max(label)+1.
    The description dict (plain types) records the source, format, split, sizes (``image_size``, and
    ``content_size`` [height, width]: the data's own size, see the module docstring) and class count.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if spec == "mnist":
        with resources.as_file(resources.files("ldmkit") / "data" / "mnist8k.npz") as path:
            fmt, (images, labels) = "mnist8k", _load_npz(path)
        source = "ldmkit/data/mnist8k.npz"
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"dataset {spec} does not exist (use 'mnist' for the built-in digits)")
        source = str(path)
        fmt, loader = _format(path)
        images, labels = loader(path)
    x = images if fmt == "folder" else _to_unit_float(images, source)  # folder: a list of (1, C, H, W)
    fitted = [_fitted_size(*a.shape[-2:], image_size) for a in (x if fmt == "folder" else x[:1])]
    content_size = [max(h for h, _ in fitted), max(w for _, w in fitted)]
    y, num_classes = _check_labels(labels, len(x), num_classes, source)
    test = np.random.default_rng(SPLIT_SEED).permutation(len(x))[: round(len(x) * TEST_FRACTION)]
    keep = np.isin(np.arange(len(x)), test) == (split == "test")
    if not keep.any():
        raise ValueError(f"dataset {source} has {len(x)} images, too few for a non-empty {split} split")
    idx = torch.from_numpy(np.flatnonzero(keep))
    x = torch.cat([_fit(x[i], image_size) for i in idx.tolist()]) if fmt == "folder" else _fit(x[idx], image_size)
    description = {"spec": spec, "source": source, "format": fmt, "split": split, "num_examples": len(x),
                   "num_total": len(keep), "channels": x.shape[1], "image_size": image_size,
                   "content_size": content_size, "num_classes": num_classes, "split_seed": SPLIT_SEED,
                   "test_fraction": TEST_FRACTION}
    return x.mul(2.0).sub(1.0), (None if y is None else y[idx]), description


def _format(path: Path):
    name = path.name.lower()
    if path.is_dir():
        return "folder", _load_folder
    if name.endswith(".npz"):
        return "npz", _load_npz
    if name.endswith(".npy"):
        return "npy", _load_npy
    if "idx3-ubyte" in name or "idx3.ubyte" in name:
        return "idx", _load_idx
    raise ValueError(f"dataset {path}: unknown format; expected 'mnist', a *-idx3-ubyte[.gz] file, a .npz, a .npy "
                     f"or a folder of images")


def _load_npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            image_key = next((k for k in ("images", "x") if k in keys), None)
            if image_key is None:
                raise ValueError(f"dataset {path}: expected an 'images' (or 'x') array, found keys {keys}")
            label_key = "labels" if image_key == "images" else "y"
            return f[image_key], (f[label_key] if label_key in keys else None)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"dataset {path}: not a readable .npz file ({exc})") from exc


def _load_npy(path: Path):
    try:
        return np.load(path, allow_pickle=False), None
    except (OSError, EOFError) as exc:
        raise ValueError(f"dataset {path}: not a readable .npy file ({exc})") from exc
    except ValueError as exc:
        raise ValueError(f"dataset {path}: not a readable .npy array ({exc})") from exc


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array with ``ndim`` dimensions (magic 0x0000080<ndim>), raw or gzipped."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"dataset {path}: not a readable IDX file ({exc})") from exc
    magic = f"0x0000080{ndim}"
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != ndim:
        raise ValueError(f"dataset {path}: bad IDX magic 0x{raw[:4].hex()}; expected {magic} "
                         f"(unsigned bytes, {ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"dataset {path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "has trailing bytes"
        raise ValueError(f"dataset {path}: {what}: {len(raw) - header} data bytes, expected {expected} for "
                         f"shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx(path: Path):
    base = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    label_name = base.replace("images", "labels").replace("idx3", "idx1")
    candidates = [path.with_name(label_name), path.with_name(label_name + ".gz")]
    label_path = next((p for p in candidates if p.is_file()), None)
    if label_path is None:
        raise ValueError(f"dataset {path}: no labels file beside it; expected {candidates[0].name} or "
                         f"{candidates[1].name}")
    return _read_idx(path, 3), _read_idx(label_path, 1)


def _load_folder(path: Path):
    """Images in the folder (unlabelled) or in its subfolders (one class each, sorted names)."""
    try:
        from PIL import Image
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("a folder of images needs Pillow: pip install 'ldmkit[images]'",
                                  name="PIL") from exc

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = [d for d in sorted(path.iterdir()) if d.is_dir() and images_in(d)]
    if classes and images_in(path):
        raise ValueError(f"dataset {path}: holds both images and class subfolders; use one layout")
    files = [(f, c) for c, d in enumerate(classes) for f in images_in(d)] or [(f, -1) for f in images_in(path)]
    if not files:
        raise ValueError(f"dataset {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or its subfolders")
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("L" if im.mode in ("1", "L", "LA", "I", "I;16") else "RGB")))
        except (OSError, ValueError) as exc:
            raise ValueError(f"dataset {f}: not a readable image ({exc})") from exc
    channels = 3 if any(a.ndim == 3 for a in arrays) else 1
    x = [_to_unit_float((np.repeat(a[..., None], 3, -1) if channels == 3 and a.ndim == 2 else a)[None], str(f))
         for a, (f, _) in zip(arrays, files, strict=True)]
    labels = np.array([c for _, c in files]) if classes else None
    return x, labels


def _to_unit_float(images, source: str):
    """uint8 or [0, 1]-float images of shape (N, H, W), (N, H, W, C) or (N, C, H, W), C ∈ {1, 3}
    → float32 tensor (N, C, H, W) in [0, 1]."""
    a = np.asarray(images)
    if a.ndim == 4 and a.shape[-1] in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    elif a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3) or min(a.shape) == 0:
        raise ValueError(f"dataset {source}: images have shape {images.shape}; expected (N, H, W), (N, H, W, C) "
                         f"or (N, C, H, W) with C = 1 or 3 and N, H, W > 0")
    if a.dtype == np.uint8:
        return torch.from_numpy(a.astype(np.float32) / 255.0)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise ValueError(f"dataset {source}: float images must be finite and in [0, 1], got range "
                             f"[{a.min():g}, {a.max():g}]")
        return torch.from_numpy(a.astype(np.float32))
    raise ValueError(f"dataset {source}: images have dtype {a.dtype}; expected uint8 (0..255) or float in [0, 1]")


def _check_labels(labels, n: int, num_classes: int | None, source: str):
    """(labels as an int64 tensor or None, class count: 0 when unlabelled)."""
    if labels is None:
        return None, 0
    a = np.asarray(labels)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"dataset {source}: labels have shape {a.shape} dtype {a.dtype}; expected integers of "
                         f"shape ({n},)")
    if len(a) != n:
        raise ValueError(f"dataset {source}: {len(a)} labels for {n} images; expected one label per image")
    high = MAX_CLASSES if num_classes is None else num_classes
    if a.min() < 0 or a.max() >= high:
        raise ValueError(f"dataset {source}: labels range over {a.min()}..{a.max()}; expected 0..{high - 1}")
    return torch.from_numpy(a.astype(np.int64)), int(a.max()) + 1 if num_classes is None else num_classes


def _fitted_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) of an h×w image once fitted into size×size: unchanged if it fits, else scaled so that its longer
    side is ``size`` (each side rounded, at least 1)."""
    if max(h, w) <= size:
        return h, w
    return max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))


def center_crop(x, size):
    """The centred ``size`` = (h, w) window of images (…, S, S), torch or NumPy: rows (S − h)//2 …, columns
    (S − w)//2 …, where ``_fit`` placed an h×w image, so ``center_crop(_fit(x, S), (h, w))`` equals x (a view,
    not a copy). ``size`` None returns x."""
    if size is None:
        return x
    h, w = size
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def _fit(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) → (N, C, size, size): scale down to fit if larger (``_fitted_size``), then pad (centred)
    with each image's background, the median of its border pixels per channel."""
    h, w = x.shape[-2:]
    if max(h, w) > size:
        h, w = _fitted_size(h, w, size)
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(0.0, 1.0)
    if (h, w) == (size, size):
        return x
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    out = border.median(dim=-1).values[..., None, None].repeat(1, 1, size, size)
    top, left = (size - h) // 2, (size - w) // 2
    out[..., top : top + h, left : left + w] = x
    return out
