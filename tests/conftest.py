"""Shared pytest set-up: skip `gpu` tests without CUDA, `node` tests without Node.js/npm and `browser` tests
without Chromium (``chromium()``: $CHROMIUM, else chromium on PATH; `make test` installs Debian's package
when it runs as root and it is missing); the tiny
checkpoints and ONNX artifacts the export tests share (built once per session, skipped without torch/onnx).

torch is imported only when a `gpu` test was collected or an ONNX fixture is used, so a numpy-only
environment runs the rest.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest
from mutations import write_random_checkpoint  # standard library only at import


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
        for item in gpu_items:
            item.add_marker(skip)
    node_items = [item for item in items if item.get_closest_marker("node") is not None]
    if node_items and not (shutil.which("node") and shutil.which("npm")):
        skip = pytest.mark.skip(reason="needs Node.js and npm on PATH")
        for item in node_items:
            item.add_marker(skip)
    browser_items = [item for item in items if item.get_closest_marker("browser") is not None]
    if browser_items and not chromium():
        skip = pytest.mark.skip(reason="needs Chromium ($CHROMIUM or chromium on PATH: Debian's chromium package, "
                                       "which `make test` installs when run as root)")
        for item in browser_items:
            item.add_marker(skip)


def chromium() -> str | None:
    """The headless browser of the `browser` tests: $CHROMIUM, else ``chromium`` on PATH, else None."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium")


# ------------------------------------------------------------------ ONNX export fixtures (tests/test_export.py,
# tests/test_runtime.py, tests/test_node_example.py): two tiny checkpoints, exported once per session.


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread for the ONNX tests' tiny models: two OpenMP threads on a shared 2-core machine
    spend most of their time waiting for each other at barriers."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torch_one_thread():
    """``one_torch_thread`` for a whole test module."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Two tiny checkpoints (checkpoint.pt, each in its own folder) made with the engine's checkpoint writer
    from freshly initialised networks whose zero-initialised layers are redrawn, so every output is O(1):
    "cond": class-conditional (10 classes), ε-prediction, linear schedule, T = 50, its data 27×22 images padded
    to 32×32 (``data.content_size``), so its samples are 27×22;
    "uncond": unconditional, v-prediction, cosine schedule, T = 40, attention at both levels, and no
    ``data.content_size`` (a checkpoint from before ldmkit recorded it), so its samples are 32×32."""
    for name in ("torch", "onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)

    from ldmkit.engine.config import Config, DiffusionConfig, UNetConfig, VAEConfig

    vae = VAEConfig(base_channels=8, channel_mult=(1, 2, 2), latent_channels=2, groups=4)
    configs = {
        "cond": Config(data={"spec": "mnist", "content_size": [27, 22]}, vae=vae, diffusion=DiffusionConfig(T=50),
                       latent_shape=(2, 8, 8), latent_scale=1.3,
                       unet=UNetConfig(in_channels=2, base_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                                       num_heads=2, num_classes=10, groups=4)),
        "uncond": Config(vae=vae, diffusion=DiffusionConfig(schedule="cosine", T=40, prediction="v"),
                         latent_shape=(2, 8, 8), latent_scale=0.8,
                         unet=UNetConfig(in_channels=2, base_channels=16, channel_mult=(1, 2),
                                         attention_levels=(0, 1), num_heads=2, num_classes=0, groups=4)),
    }
    return {name: write_random_checkpoint(tmp_path_factory.mktemp(name) / "checkpoint.pt", config, seed)
            for seed, (name, config) in enumerate(configs.items())}


@pytest.fixture(scope="session")
def onnx_artifacts(tiny_checkpoints):
    """{"cond": the conditional checkpoint's artifact (default opset, 8 default steps), "uncond": the
    unconditional one's (opset 20, 40 default steps)}, each exported into an ``onnx`` folder beside it."""
    from ldmkit.export.onnx_export import export_onnx

    with one_torch_thread():
        return {"cond": export_onnx(tiny_checkpoints["cond"], steps=8, log=lambda line: None),
                "uncond": export_onnx(tiny_checkpoints["uncond"], opset=20, steps=40, log=lambda line: None)}


@pytest.fixture(scope="session")
def zero_snr_artifact(tmp_path_factory):
    """(checkpoint path, its ONNX artifact folder (6 default steps)): a tiny class-conditional checkpoint made as
    ``tiny_checkpoints`` makes its own, with v-prediction on the zero-terminal-SNR linear schedule (R2), T = 50."""
    for name in ("torch", "onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)

    from ldmkit.engine.config import Config, DiffusionConfig, UNetConfig, VAEConfig
    from ldmkit.export.onnx_export import export_onnx

    config = Config(vae=VAEConfig(base_channels=8, channel_mult=(1, 2, 2), latent_channels=2, groups=4),
                    diffusion=DiffusionConfig(T=50, prediction="v", zero_terminal_snr=True, min_snr_gamma=5.0),
                    latent_shape=(2, 8, 8), latent_scale=1.3,
                    unet=UNetConfig(in_channels=2, base_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                                    num_heads=2, num_classes=10, groups=4))
    path = write_random_checkpoint(tmp_path_factory.mktemp("zero_snr") / "checkpoint.pt", config, 2)
    with one_torch_thread():
        return path, export_onnx(path, steps=6, log=lambda line: None)
