"""examples/node: onnxruntime-node runs sampler.onnx on a noise file and gives Python's images (raw float32
output and the PNG grid's pixels). Installs onnxruntime-node's CPU build from the npm registry into a copy."""

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from ldmkit.export.runtime import OnnxSampler
from ldmkit.images import make_grid

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"


def png_pixels(data: bytes) -> np.ndarray:
    """Pixels (H, W·C) of an 8-bit, non-interlaced PNG whose rows all use filter 0 (what the example writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 1
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (0, 2)
            channels = 1 if color == 0 else 3
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
    assert not rows[:, 0].any()
    return rows[:, 1:]


@pytest.mark.node
@pytest.mark.slow
def test_node_example_matches_python(onnx_artifacts, tmp_path):
    work = tmp_path / "node"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("node_modules", "*.png", "*.f32", "*.npy"))
    install = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--onnxruntime-node-install=skip"],
                             cwd=work, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    runner = OnnxSampler(onnx_artifacts["cond"], provider="cpu")
    x_T, _ = runner.noise(12, 6, seed=4, loop=False)
    np.save(work / "noise.npy", x_T)
    out = work / "grid.png"
    run = subprocess.run(["node", "sample.js", str(onnx_artifacts["cond"]), "noise.npy", str(out), "--steps", "6",
                          "--guidance", "2.5"], cwd=work, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert runner.model.image_shape == (1, 27, 22) and "images [12,1,27,22]" in run.stdout  # the data's size
    node = np.fromfile(f"{out}.f32", dtype="<f4").reshape(12, *runner.model.image_shape)
    labels = np.arange(12) % 10
    default = runner.model.defaults.sampler  # what sample.js runs when not told
    other = next(s for s in runner.model.graph_samplers if s != default)
    graph = runner.sample_graph(12, labels, steps=6, guidance=2.5, noise=(x_T, None), sampler=default)
    python = runner.sample(12, labels, default, steps=6, guidance=2.5, noise=(x_T, None))
    assert np.abs(node - graph).max() <= 1e-5
    assert np.abs(node - python).max() <= 1e-4
    want = np.round(make_grid(python, nrow=10)[0] * 255)
    assert np.abs(png_pixels(out.read_bytes()).astype(np.float64) - want).max() <= 1
    run = subprocess.run(["node", "sample.js", str(onnx_artifacts["cond"]), "noise.npy", str(out), "--steps", "6",
                          "--guidance", "2.5", "--sampler", other], cwd=work, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    node = np.fromfile(f"{out}.f32", dtype="<f4").reshape(12, *runner.model.image_shape)
    python = runner.sample(12, labels, other, steps=6, guidance=2.5, noise=(x_T, None))
    assert np.abs(node - python).max() <= 1e-4 and np.abs(node - graph).max() > 1e-3  # another method
    bad = subprocess.run(["node", "sample.js", str(tmp_path / "missing"), "noise.npy", str(out)], cwd=work,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
