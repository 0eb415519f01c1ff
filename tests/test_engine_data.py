"""Dataset loading: the built-in digits, IDX (raw and gzip), .npz, .npy, image folders, and bad files."""

from __future__ import annotations

import gzip
import struct
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ldmkit.engine.data import SPLIT_SEED, TEST_FRACTION, center_crop, load_dataset  # noqa: E402


def _idx(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array: magic 0x0000080<ndim>, big-endian int32 dims, then the data."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _digits(n=16, size=6, seed=0):
    """Random uint8 "digits" on a black border (the padding's background), and labels 0..9."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size), dtype=np.uint8)
    images[:, 1:-1, 1:-1] = rng.integers(0, 256, (n, size - 2, size - 2))
    return images, rng.integers(0, 10, n).astype(np.uint8)


def _write_idx(folder, images, labels, gz=False, prefix="train"):
    suffix = ".gz" if gz else ""
    img = folder / f"{prefix}-images-idx3-ubyte{suffix}"
    lab = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
    write = gzip.compress if gz else (lambda b: b)
    img.write_bytes(write(_idx(images)))
    lab.write_bytes(write(_idx(labels)))
    return img, lab


def _split_indices(n, split):
    test = np.random.default_rng(SPLIT_SEED).permutation(n)[: round(n * TEST_FRACTION)]
    mask = np.isin(np.arange(n), test)
    return np.flatnonzero(mask if split == "test" else ~mask)


def _expected(images_u8, split, pad):
    """The loader's output written out directly: [0, 255] → [−1, 1], black (−1) padding each side."""
    x = images_u8[_split_indices(len(images_u8), split)].astype(np.float32) / 127.5 - 1.0
    return np.pad(x, ((0, 0), (pad, pad), (pad, pad)), constant_values=-1.0)[:, None]


# ------------------------------------------------------------------------------------------ built-in
def test_builtin_mnist_split():
    xtr, ytr, dtr = load_dataset("mnist", "train", 32)
    xte, yte, dte = load_dataset("mnist", "test", 32)
    assert xtr.shape == (7000, 1, 32, 32) and xte.shape == (1000, 1, 32, 32)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert xtr.min() == -1 and xtr.max() == 1
    assert set(ytr.unique().tolist()) == set(range(10)) == set(yte.unique().tolist())
    assert (xtr[:, :, :2] == -1).all() and (xtr[:, :, :, -2:] == -1).all()  # 28 → 32 padded with background
    assert dtr["num_classes"] == dte["num_classes"] == 10 and dtr["num_examples"] == 7000
    assert dte["split"] == "test" and dtr["format"] == "mnist8k"
    # the splits are disjoint and together the whole file, in file order
    raw = np.load(__import__("importlib.resources").resources.files("ldmkit") / "data" / "mnist8k.npz")
    np.testing.assert_array_equal(xte.numpy(), _expected(raw["images"], "test", 2))
    np.testing.assert_array_equal(ytr.numpy(), raw["labels"][_split_indices(8000, "train")])
    again, _, _ = load_dataset("mnist", "test", 32)
    assert torch.equal(again, xte)
    # the data's own size, and its centred window: exactly the 28×28 digits of the file
    assert dtr["content_size"] == dte["content_size"] == [28, 28]
    digits = raw["images"][_split_indices(8000, "test")]
    np.testing.assert_allclose(center_crop(xte, (28, 28)).numpy(), digits[:, None] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(center_crop(xte.numpy(), (28, 28)), xte.numpy()[..., 2:30, 2:30])


def test_builtin_mnist_at_its_own_size():
    x, _, d = load_dataset("mnist", "test", 28)
    assert x.shape == (1000, 1, 28, 28) and d["image_size"] == d["content_size"][0] == d["content_size"][1] == 28


# ------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [False, True])
def test_idx_raw_and_gzip(tmp_path, gz):
    images, labels = _digits()
    img, _ = _write_idx(tmp_path, images, labels, gz=gz)
    for split in ("train", "test"):
        x, y, d = load_dataset(str(img), split, 8)
        np.testing.assert_allclose(x.numpy(), _expected(images, split, 1), atol=1e-6)
        np.testing.assert_array_equal(y.numpy(), labels[_split_indices(16, split)])
        assert d["format"] == "idx" and d["num_total"] == 16 and d["num_classes"] == labels.max() + 1
    assert len(load_dataset(str(img), "test", 8)[0]) == 2  # round(16 / 8)


def test_idx_gz_images_with_raw_labels(tmp_path):
    images, labels = _digits()
    img, lab = _write_idx(tmp_path, images, labels, gz=True)
    lab.rename(tmp_path / "train-labels-idx1-ubyte")
    lab.with_name("train-labels-idx1-ubyte").write_bytes(gzip.decompress(
        (tmp_path / "train-labels-idx1-ubyte").read_bytes()))
    _, y, _ = load_dataset(str(img), "train", 8)
    np.testing.assert_array_equal(y.numpy(), labels[_split_indices(16, "train")])


def _bad_idx(tmp_path, case):
    images, labels = _digits()
    img, lab = _write_idx(tmp_path, images, labels)
    if case == "magic":
        img.write_bytes(_idx(labels))  # a labels file where the images should be
    elif case == "truncated":
        img.write_bytes(_idx(images)[:-5])
    elif case == "trailing":
        img.write_bytes(_idx(images) + b"\x00")
    elif case == "header":
        img.write_bytes(_idx(images)[:9])
    elif case == "no labels":
        lab.unlink()
    elif case == "count":
        lab.write_bytes(_idx(labels[:-1]))
    elif case == "labels magic":
        lab.write_bytes(_idx(labels[:, None]))
    elif case == "gzip":
        img.with_name(img.name + ".gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
        img.unlink()
        img = img.with_name(img.name + ".gz")
    return img


@pytest.mark.parametrize("case, match", [
    ("magic", r"bad IDX magic 0x00000801; expected 0x00000803 \(unsigned bytes, 3 dimensions\)"),
    ("truncated", r"truncated: 571 data bytes, expected 576 for shape \(16, 6, 6\)"),
    ("trailing", r"has trailing bytes: 577 data bytes, expected 576"),
    ("header", r"truncated IDX header \(9 bytes, expected 16\)"),
    ("no labels", r"no labels file beside it; expected train-labels-idx1-ubyte or train-labels-idx1-ubyte\.gz"),
    ("count", r"15 labels for 16 images; expected one label per image"),
    ("labels magic", r"train-labels-idx1-ubyte: bad IDX magic 0x00000802; expected 0x00000801"),
    ("gzip", r"not a readable IDX file"),
])
def test_idx_bad_files(tmp_path, case, match):
    img = _bad_idx(tmp_path, case)
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(str(img), "train", 8)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ npz / npy
@pytest.mark.parametrize("keys", [("images", "labels"), ("x", "y")])
def test_npz(tmp_path, keys):
    images, labels = _digits()
    path = tmp_path / "d.npz"
    np.savez(path, **{keys[0]: images, keys[1]: labels.astype(np.int64)})
    x, y, d = load_dataset(str(path), "train", 8)
    np.testing.assert_allclose(x.numpy(), _expected(images, "train", 1), atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), labels[_split_indices(16, "train")])
    assert d["format"] == "npz"


def test_npz_without_labels_and_npy_are_unlabelled(tmp_path):
    images, _ = _digits()
    np.savez(tmp_path / "d.npz", images=images)
    np.save(tmp_path / "d.npy", images)
    for name in ("d.npz", "d.npy"):
        x, y, d = load_dataset(str(tmp_path / name), "test", 6)
        assert y is None and d["num_classes"] == 0
        np.testing.assert_allclose(x.numpy(), _expected(images, "test", 0), atol=1e-6)


def test_float_rgb_channels_last_and_channels_first(tmp_path):
    rgb = np.random.default_rng(0).random((8, 4, 4, 3)).astype(np.float32)
    np.save(tmp_path / "hwc.npy", rgb)
    np.save(tmp_path / "chw.npy", rgb.transpose(0, 3, 1, 2))
    a, _, d = load_dataset(str(tmp_path / "hwc.npy"), "train", 4)
    b, _, _ = load_dataset(str(tmp_path / "chw.npy"), "train", 4)
    assert a.shape == (7, 3, 4, 4) and d["channels"] == 3
    torch.testing.assert_close(a, b)
    np.testing.assert_allclose(a.numpy(), rgb[_split_indices(8, "train")].transpose(0, 3, 1, 2) * 2 - 1, atol=1e-6)


def test_larger_images_are_scaled_down_to_fit(tmp_path):
    big = np.zeros((8, 64, 48), dtype=np.uint8)
    big[:, 16:48, 12:36] = 255  # a white box in the middle
    np.save(tmp_path / "big.npy", big)
    x, _, d = load_dataset(str(tmp_path / "big.npy"), "train", 32)
    assert x.shape == (7, 1, 32, 32) and d["content_size"] == [32, 24]  # 64×48 scaled by 1/2, then padded
    assert x.min() >= -1 and x.max() <= 1
    assert x[0, 0, 16, 16] == pytest.approx(1.0) and x[0, 0, 0, 0] == -1  # centre white, corner background


def test_padding_uses_each_images_background(tmp_path):
    images = np.full((8, 4, 4, 3), 255, dtype=np.uint8)  # white background, one black pixel on the border
    images[:, 0, 0] = 0
    images[1, :, :, 2] = 0  # image 1: a yellow background
    np.save(tmp_path / "w.npy", images)
    x, _, _ = load_dataset(str(tmp_path / "w.npy"), "train", 8)
    assert (x[0, :, :2] == 1).all() and x[0, :, 2, 2].tolist() == [-1, -1, -1]
    assert x[1, :, 0, 0].tolist() == [1, 1, -1]


@pytest.mark.parametrize("make, match", [
    (lambda p: np.save(p / "d.npy", np.zeros((4, 5, 5), np.int64)),
     r"dtype int64; expected uint8 \(0\.\.255\) or float"),
    (lambda p: np.save(p / "d.npy", np.full((4, 5, 5), 2.0)), r"float images must be finite and in \[0, 1\]"),
    (lambda p: np.save(p / "d.npy", np.full((4, 5, 5), np.nan)), r"float images must be finite"),
    (lambda p: np.save(p / "d.npy", np.zeros((4, 25), np.uint8)), r"images have shape \(4, 25\); expected"),
    (lambda p: np.save(p / "d.npy", np.zeros((4, 2, 5, 5), np.uint8)), r"images have shape \(4, 2, 5, 5\)"),
    (lambda p: np.save(p / "d.npy", np.zeros((0, 5, 5), np.uint8)), r"images have shape \(0, 5, 5\)"),
    (lambda p: np.save(p / "d.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
     r"not a readable \.npy array"),
    (lambda p: (p / "d.npy").write_bytes(b"not numpy at all"), r"not a readable \.npy"),
    (lambda p: np.savez(p / "d.npz", pixels=np.zeros((4, 5, 5), np.uint8)),
     r"expected an 'images' \(or 'x'\) array, found keys \['pixels'\]"),
    (lambda p: (p / "d.npz").write_bytes(b"PK\x03\x04broken"), r"not a readable \.npz file"),
    (lambda p: np.savez(p / "d.npz", images=np.zeros((4, 5, 5), np.uint8), labels=np.arange(3)),
     r"3 labels for 4 images"),
    (lambda p: np.savez(p / "d.npz", images=np.zeros((4, 5, 5), np.uint8), labels=np.array([0, 1, -1, 2])),
     r"labels range over -1\.\.2; expected 0\.\.999"),
    (lambda p: np.savez(p / "d.npz", images=np.zeros((4, 5, 5), np.uint8), labels=np.full(4, 5000)),
     r"labels range over 5000\.\.5000"),
    (lambda p: np.savez(p / "d.npz", images=np.zeros((4, 5, 5), np.uint8), labels=np.zeros(4)),
     r"labels have shape \(4,\) dtype float64; expected integers"),
    (lambda p: np.savez(p / "d.npz", images=np.zeros((4, 5, 5), np.uint8), labels=np.zeros((4, 1), int)),
     r"labels have shape \(4, 1\)"),
    (lambda p: np.save(p / "d.npy", np.zeros((1, 5, 5), np.uint8)), r"too few for a non-empty test split"),
])
def test_array_bad_files(tmp_path, make, match):
    make(tmp_path)
    (path,) = list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(str(path), "test", 8)
    assert str(path) in str(info.value)


def test_labels_outside_num_classes(tmp_path):
    images, labels = _digits()
    labels[3] = 12
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    with pytest.raises(ValueError, match=r"labels range over 0\.\.12; expected 0\.\.9"):
        load_dataset(str(tmp_path / "d.npz"), "train", 8, num_classes=10)


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npz"), "train", 32)
    (tmp_path / "d.csv").write_text("1,2,3")
    with pytest.raises(ValueError, match="unknown format"):
        load_dataset(str(tmp_path / "d.csv"), "train", 32)
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'test'\], got 'val'"):
        load_dataset("mnist", "val", 32)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_dataset("mnist", "train", 0)


# ------------------------------------------------------------------------------------------ folders
def test_folder_with_class_subfolders(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    arrays = {}
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(8):
            a = np.zeros((6, 6), dtype=np.uint8)
            a[1:-1, 1:-1] = rng.integers(0, 256, (4, 4))
            Image.fromarray(a).save(tmp_path / cls / f"{i}.png")
            arrays[(cls, i)] = a
    x, y, d = load_dataset(str(tmp_path), "train", 8)
    order = [arrays[(c, i)] for c in ("cat", "dog") for i in range(8)]  # sorted class names, sorted files
    np.testing.assert_allclose(x.numpy(), _expected(np.stack(order), "train", 1), atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), np.repeat([0, 1], 8)[_split_indices(16, "train")])
    assert d["format"] == "folder" and d["num_classes"] == 2


def test_folder_unlabelled_mixed_sizes_and_modes(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    Image.new("L", (6, 6), 255).save(tmp_path / "a.png")
    Image.new("RGB", (12, 8), (255, 0, 0)).save(tmp_path / "b.png")
    for i in range(6):
        Image.new("L", (4, 4), 0).save(tmp_path / f"c{i}.png")
    x, y, d = load_dataset(str(tmp_path), "train", 6)
    assert y is None and x.shape == (7, 3, 6, 6) and d["channels"] == 3
    assert d["content_size"] == [6, 6]  # 6×6, 8×12 scaled to 4×6, 4×4: the largest height and width


def test_folder_content_size_holds_every_image(tmp_path):
    """Images of several sizes that fit (h×w 10×4, 6×11, 3×3, white on a black frame): content_size is the
    largest height and the largest width, the same for both splits, and every image's pixels lie in its
    centred window (rows 1..10, columns 0..10 of 12×12); the padding outside is the black background."""
    Image = pytest.importorskip("PIL.Image")
    for i, (h, w) in enumerate([(10, 4), (6, 11), (3, 3)] * 3):
        a = np.zeros((h, w), dtype=np.uint8)
        a[1:-1, 1:-1] = 255
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    x, _, d = load_dataset(str(tmp_path), "train", 12)
    _, _, d_test = load_dataset(str(tmp_path), "test", 12)
    assert d["content_size"] == d_test["content_size"] == [10, 11]
    assert int((center_crop(x, (10, 11)) == 1).sum()) == int((x == 1).sum()) > 0
    outside = x.clone()
    outside[..., 1:11, 0:11] = -1
    assert (outside == -1).all()


def test_folder_bad_cases(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    with pytest.raises(ValueError, match="no images"):
        load_dataset(str(tmp_path), "train", 8)
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=r"x\.png: not a readable image"):
        load_dataset(str(tmp_path), "train", 8)
    (tmp_path / "x.png").unlink()
    Image.new("L", (4, 4)).save(tmp_path / "top.png")
    (tmp_path / "sub").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "sub" / "a.png")
    with pytest.raises(ValueError, match="holds both images and class subfolders"):
        load_dataset(str(tmp_path), "train", 8)


def test_folder_without_pillow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ModuleNotFoundError, match=r"needs Pillow: pip install 'ldmkit\[images\]'") as info:
        load_dataset(str(tmp_path), "train", 8)
    assert info.value.name == "PIL"
