"""The CUDA kernels of csrc/cuda, executed on the CPU through the host SIMT layer.

fastuda._C_emu compiles the very kernel sources nvcc compiles (csrc/cuda/*_kernels.cuh) against
csrc/common/simt_host.h and registers them as CPU ops under torch.ops.fastuda_emu with the schemas
of torch.ops.fastuda. Every test compares them with fastuda.ops.reference. Shapes are small (the
emulator runs every simulated thread on one core) but chosen so launches have several blocks and
partial tail blocks/tiles.
"""

from __future__ import annotations

import re

import pytest
import torch

import fastuda._C_emu  # noqa: F401  (registers torch.ops.fastuda_emu)
import fastuda.ops  # noqa: F401  (registers torch.ops.fastuda)
from fastuda.ops import reference as ref

emu = torch.ops.fastuda_emu

LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _schema_text(op: str, namespace: str) -> str:
    schema = str(getattr(getattr(torch.ops, namespace), op).default._schema)
    return re.sub(rf"^{namespace}::", "", schema)


@pytest.mark.parametrize("op", ["class_stats", "proto_contrast_forward", "proto_contrast_backward",
                                "dist_contrast_forward", "dist_contrast_backward",
                                "bank_contrast_forward", "bank_contrast_backward",
                                "downscale_labels"])
def test_emulated_schemas_match_the_real_ops(op: str) -> None:
    assert _schema_text(op, "fastuda_emu") == _schema_text(op, "fastuda")


# ----------------------------------------------------------------------------------------------
# downscale_labels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LABEL_DTYPES)
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_downscale_labels_random(dtype: torch.dtype, factor: int) -> None:
    g = torch.Generator().manual_seed(factor)
    B, H, W, C = 2, 24, 44, 5  # 2*12*22 = 528 cells at factor 2: three 256-thread blocks
    labels = torch.randint(0, C, (B, H, W), generator=g)
    # blocky regions as in real label maps, plus ignore and out-of-range values
    labels = labels.repeat_interleave(2, 1)[:, :H].repeat_interleave(2, 2)[:, :, :W]
    labels[torch.rand(B, H, W, generator=g) < 0.15] = 255 if dtype != torch.int8 else -1
    labels = labels.to(dtype)
    for min_ratio in (0.0, 0.5, 0.75):
        got = emu.downscale_labels(labels, factor, C, min_ratio, 255)
        want = ref.downscale_labels(labels, factor, num_classes=C, min_ratio=min_ratio)
        assert got.dtype == labels.dtype
        assert torch.equal(got, want)


def test_downscale_labels_ties_and_ratio() -> None:
    cells = torch.tensor([
        [[2, 2], [1, 1]],      # tie between classes 1 and 2 -> lowest id (1)
        [[255, 255], [3, 3]],  # tie between class 3 and ignore -> the class
        [[255, 255], [255, 0]],  # ignore wins -> ignore
        [[0, 0], [0, 4]],      # 3/4 of class 0: kept at min_ratio 0.75
    ])
    labels = torch.cat(list(cells), dim=1)[None]  # [1, 2, 8]: four 2x2 cells side by side
    got = emu.downscale_labels(labels, 2, 5, 0.5, 255)
    assert got.tolist() == [[[1, 3, 255, 0]]]
    assert emu.downscale_labels(labels, 2, 5, 0.75, 255).tolist() == [[[255, 255, 255, 0]]]
    assert emu.downscale_labels(labels, 2, 5, 0.8, 255).tolist() == [[[255, 255, 255, 255]]]


def test_downscale_labels_non_contiguous_and_all_ignore() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 3, (3, 20, 36), generator=g)
    for labels in (base.transpose(1, 2), base[:, ::2, 4:], base[::2]):
        got = emu.downscale_labels(labels, 2, 3, 0.5, 255)
        assert torch.equal(got, ref.downscale_labels(labels, 2, num_classes=3, min_ratio=0.5))
    ignore = torch.full((1, 8, 8), 255, dtype=torch.uint8)
    assert torch.equal(emu.downscale_labels(ignore, 4, 3, 0.0, 255), torch.full((1, 2, 2), 255,
                                                                                dtype=torch.uint8))
    empty = torch.zeros(0, 8, 8, dtype=torch.long)
    assert emu.downscale_labels(empty, 4, 3, 0.5, 255).shape == (0, 2, 2)


def test_downscale_labels_errors() -> None:
    with pytest.raises(RuntimeError, match="not divisible by factor 3"):
        emu.downscale_labels(torch.zeros(1, 8, 8, dtype=torch.long), 3, 3, 0.5, 255)
    with pytest.raises(RuntimeError, match=r"must be \[B, H, W\]"):
        emu.downscale_labels(torch.zeros(8, 8, dtype=torch.long), 2, 3, 0.5, 255)
    with pytest.raises(RuntimeError, match="labels must be uint8"):
        emu.downscale_labels(torch.zeros(1, 8, 8), 2, 3, 0.5, 255)
