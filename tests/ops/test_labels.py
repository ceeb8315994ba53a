"""fastuda.ops.downscale_labels: compiled backends against the reference and hand-made cells."""

from __future__ import annotations

import pytest
import torch

from fastuda.ops import downscale_labels, extension_available, reference
from fastuda.ops._backend import cuda_kernels_built

needs_ext = pytest.mark.skipif(not extension_available(), reason="fastuda._C is not built")
BACKENDS = [
    pytest.param("cpu", marks=needs_ext),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not (torch.cuda.is_available() and cuda_kernels_built()),
        reason="needs a GPU and the CUDA kernels")]),
    "torch",
]


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


def _blocky_labels(B, H, W, C, gen, block=3, ignore_frac=0.15):
    """Spatially coherent labels (blocks of one class) with sprinkled noise and ignore pixels, so
    that cells see majorities, ties and mixtures."""
    coarse = torch.randint(0, C, (B, -(-H // block), -(-W // block)), generator=gen)
    y = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :H, :W].clone()
    noise = torch.rand(B, H, W, generator=gen)
    y[noise < 0.25] = torch.randint(0, C, (B, H, W), generator=gen)[noise < 0.25]
    y[noise > 1 - ignore_frac] = 255
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("min_ratio", [0.0, 0.5, 0.75, 1.0])
def test_matches_reference(backend, factor, min_ratio):
    gen = torch.Generator().manual_seed(factor * 10 + int(min_ratio * 4))
    dev = _device(backend)
    for B, C in ((3, 5), (1, 19)):
        H, W = factor * 5, factor * 7
        for labels in (_blocky_labels(B, H, W, C, gen),
                       torch.randint(0, 3, (B, H, W), generator=gen)):
            got = downscale_labels(labels.to(dev), factor, num_classes=C, min_ratio=min_ratio,
                                   backend=backend)
            want = reference.downscale_labels(labels, factor, num_classes=C, min_ratio=min_ratio)
            assert got.shape == (B, H // factor, W // factor)
            assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_dtypes_and_non_contiguous(backend, dtype):
    gen = torch.Generator().manual_seed(11)
    dev = _device(backend)
    labels = _blocky_labels(3, 12, 16, 7, gen)
    views = [labels, labels.transpose(1, 2), labels[:, :, 4:12], labels.flip(2)]
    for lab in views:
        got = downscale_labels(lab.to(dtype).to(dev), 4, num_classes=7, min_ratio=0.5,
                               backend=backend)
        assert got.dtype == dtype
        want = reference.downscale_labels(lab, 4, num_classes=7, min_ratio=0.5)
        assert torch.equal(got.cpu().long(), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_made_cells(backend):
    """One 2x2 cell per case: ties go to the lowest id, ignore ranks after every class."""
    dev = _device(backend)
    I = 255  # noqa: E741
    cells = [
        ([[1, 1], [1, 0]], 0.75, 1),      # majority 3/4 >= 0.75
        ([[1, 1], [0, 0]], 0.5, 0),       # tie 2:2 -> lowest class id
        ([[2, 2], [0, 0]], 0.75, I),      # tie winner covers only half
        ([[I, I], [3, 3]], 0.5, 3),       # class and ignore tie -> the class
        ([[I, I], [I, 3]], 0.0, I),       # ignore wins outright
        ([[4, 3], [2, 1]], 0.0, 1),       # four-way tie -> lowest id
        ([[4, 3], [2, 1]], 0.3, I),       # ... covering 1/4 < 0.3
    ]
    for cell, ratio, want in cells:
        labels = torch.tensor([cell], device=dev)
        got = downscale_labels(labels, 2, num_classes=5, min_ratio=ratio, backend=backend)
        assert got.item() == want, (cell, ratio)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    dev = _device(backend)
    labels = torch.zeros(2, 6, 9, dtype=torch.long, device=dev)
    with pytest.raises(ValueError, match="labels 6x9 are not divisible by factor 2"):
        downscale_labels(labels, 2, num_classes=3, backend=backend)
    with pytest.raises(ValueError, match=r"must be \[B, H, W\], got shape \(6, 9\)"):
        downscale_labels(labels[0], 3, num_classes=3, backend=backend)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        downscale_labels(labels, 0, num_classes=3, backend=backend)
    labels[1, 4, 7] = 9
    if dev.type != "cuda":  # on a GPU: a device-side assert, checked by test_cuda_device.py
        with pytest.raises(ValueError, match=r"label value 9 .*outside \[0, 3\)"):
            downscale_labels(labels, 3, num_classes=3, backend=backend)
    with pytest.raises(TypeError, match="integer"):
        downscale_labels(labels.float(), 3, num_classes=3, backend=backend)


@needs_ext
def test_cpu_kernel_messages():
    labels = torch.zeros(1, 6, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="labels 6x9 are not divisible by factor 2"):
        torch.ops.fastuda.downscale_labels(labels, 2, 3, 0.75, 255)
    labels[0, 4, 7] = -3
    with pytest.raises(ValueError, match=r"label value -3 \(batch 0, row 4, column 7\)"):
        torch.ops.fastuda.downscale_labels(labels, 3, 3, 0.75, 255)


@needs_ext
def test_opcheck():
    gen = torch.Generator().manual_seed(12)
    labels = _blocky_labels(3, 8, 12, 4, gen)
    for lab in (labels, labels.to(torch.uint8)):
        torch.library.opcheck(torch.ops.fastuda.downscale_labels.default, (lab, 4, 4, 0.75, 255))
