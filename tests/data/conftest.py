"""Shared fixtures of the data tests: one small generated synthetic tree per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_fixtures import SMALL_SYNTHETIC

from fastuda.data.synthetic import generate_synthetic


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "synthetic"
    generate_synthetic(root, counts=SMALL_SYNTHETIC, workers=1)
    return root


@pytest.fixture(autouse=True)
def _one_torch_thread() -> object:
    """Small tensors: threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
