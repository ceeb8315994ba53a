"""Shared test set-up: the `cuda` marker skips cleanly where no GPU is visible; Triton runs
interpreted on CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in interpreter mode on CPU tensors. Triton reads the
# variable when it is first imported (importing torch does not import it), so set it here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
