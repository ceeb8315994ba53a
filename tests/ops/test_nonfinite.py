"""A NaN or an Inf feature is never silently dropped: every op on every backend (the torch
reference, the C++ CPU kernels, the CUDA kernel sources run by the host emulator `_C_emu`, Triton
in its interpreter) gives that pixel a non-finite loss (and statistics), so the trainer's
non-finite guard sees it. The reference is the expectation: torch propagates NaN/Inf."""

from __future__ import annotations

import importlib
import math
import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastuda.ops  # noqa: E402, F401  (registers torch.ops.fastuda)
from fastuda.ops import (  # noqa: E402
    _backend,  # noqa: E402
    bank_contrast,
    class_stats,
    dist_contrast,
    pixel_contrast,
    proto_contrast,
)

B, D, H, W, C, M = 2, 8, 3, 5, 3, 4
BAD_PIXEL = (0, 1, 2)  # (image, row, column), class 1


def _interpreted_triton() -> bool:
    if not _backend.triton_available() or not _backend.triton_interpreted():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.sum, InterpretedFunction)


BACKENDS = ["torch", "cpu", "emu",
            pytest.param("triton", marks=pytest.mark.skipif(
                not _interpreted_triton(), reason="triton not importable in interpreter mode"))]


def _case(bad: float) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(B, D, H, W, generator=g), dim=1)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    b, r, c = BAD_PIXEL
    feats[b, :, r, c] = torch.randn(D, generator=g)
    feats[b, 3, r, c] = bad
    labels[b, r, c] = 1
    labels[1, 0, :3] = 1  # other pixels of class 1 (positives for pixel_contrast)
    centroids = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=1)
    covariance = torch.rand(C, D, generator=g) * 0.1
    bank = torch.nn.functional.normalize(torch.randn(C, M, D, generator=g), dim=-1)
    bank_len = torch.tensor([M, M, 2])
    return feats, labels, centroids, covariance, bank, bank_len


def _emu_per_pixel(op: str, feats, labels, centroids, covariance, bank, bank_len):
    """(per-pixel loss [B, P], d loss / d feats [B, D, P]) from the emulated CUDA kernels."""
    importlib.import_module("fastuda._C_emu")
    emu = torch.ops.fastuda_emu
    x, y = _backend.as_bdp(feats).contiguous(), labels.reshape(B, H * W)
    g = torch.ones(B, H * W)
    if op == "proto":
        loss, lse, _ = emu.proto_contrast_forward(x, y, centroids, 0.5, 255, None)
        grad = emu.proto_contrast_backward(g, x, y, centroids, lse, 0.5, 255, None, False)[0]
    elif op == "dist":
        loss, lse, _ = emu.dist_contrast_forward(x, y, centroids, covariance, 0.5, 1.0, 255, None)
        grad = emu.dist_contrast_backward(g, x, y, centroids, covariance, lse, 0.5, 1.0, 255,
                                          None, False)[0]
    elif op == "bank":
        loss, lse = emu.bank_contrast_forward(x, y, bank, bank_len, 0.5, 255)
        grad = emu.bank_contrast_backward(g, x, y, bank, bank_len, lse, 0.5, 255)
    else:
        unit = torch.nn.functional.normalize(x, dim=1)
        loss, nu, acc, _ = emu.pixel_contrast_forward(unit, y, 0.5, 255, None, None)
        grad = emu.pixel_contrast_backward(g, unit, y, nu, acc, 0.5, 255, None, None)[0]
    return loss, grad


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["proto", "dist", "bank", "pixel"])
def test_a_non_finite_pixel_gives_a_non_finite_loss_and_gradient(op: str, backend: str,
                                                                  bad: float) -> None:
    feats, labels, centroids, covariance, bank, bank_len = _case(bad)
    b, r, c = BAD_PIXEL
    if backend == "emu":
        per, grad = _emu_per_pixel(op, feats, labels, centroids, covariance, bank, bank_len)
        assert not torch.isfinite(per[b, r * W + c]), per
        assert not torch.isfinite(grad[b, :, r * W + c]).all()
        return
    feats.requires_grad_(True)
    kw = {"tau": 0.5, "backend": backend}
    if op == "proto":
        loss = proto_contrast(feats, labels, centroids, **kw)
    elif op == "dist":
        loss = dist_contrast(feats, labels, centroids, covariance, **kw)
    elif op == "bank":
        loss = bank_contrast(feats, labels, bank, bank_len, **kw)
    else:
        loss = pixel_contrast(feats, labels, **kw)
    assert not torch.isfinite(loss), f"{op}/{backend}: {bad} feature gave the finite loss {loss}"
    loss.backward()
    assert not torch.isfinite(feats.grad[b, :, r, c]).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "emu"])
def test_a_non_finite_pixel_makes_its_class_statistics_non_finite(backend: str,
                                                                  bad: float) -> None:
    feats, labels, *_ = _case(bad)
    if backend == "emu":
        importlib.import_module("fastuda._C_emu")
        count, mean, m2 = torch.ops.fastuda_emu.class_stats(
            _backend.as_bdp(feats).contiguous(), labels.reshape(B, -1), C, 255, None, False)
    else:
        stats = class_stats(feats, labels, C, backend=backend)
        count, mean, m2 = stats.count, stats.mean, stats.m2
    assert not torch.isfinite(mean[1, 3]) and not torch.isfinite(m2[1, 3])
    assert torch.isfinite(mean[0]).all() and torch.isfinite(mean[2]).all()  # others untouched
    assert int(count[1]) == int((labels == 1).sum())
