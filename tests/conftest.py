"""Shared pytest set-up: skip `gpu` tests without CUDA and `node` tests without Node.js/npm.

torch is imported only when a `gpu` test was collected, so a numpy-only environment runs the rest.
"""

from __future__ import annotations

import shutil

import pytest


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
