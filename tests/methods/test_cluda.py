"""CLUDA's losses against a per-anchor loop written from the formula, and a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastuda.engine.context import MethodContext
from fastuda.methods.cluda import CLUDA, CLUDASettings, to_grid


def make(grid: tuple[int, int], **kw) -> CLUDA:
    return CLUDA(CLUDASettings(grid=list(grid), **kw),
                 MethodContext(num_classes=4, backend="torch"))


def loop_reference(feats: torch.Tensor, labels: torch.Tensor, tau: float,
                   a: torch.Tensor | None = None) -> float:
    """l_i = -(1/|P_i|) sum_p a_i a_p [s_ip - log(exp(s_ip) + sum_n exp(s_in))], averaged over
    the anchors with a positive; pixels flattened image by image (batch-major)."""
    B, D, H, W = feats.shape
    f = [F.normalize(feats[b, :, y, x].double(), dim=0) for b in range(B) for y in range(H)
         for x in range(W)]
    y_ = [int(labels[b, y, x]) for b in range(B) for y in range(H) for x in range(W)]
    w = [1.0 if a is None else float(a[b, y, x]) for b in range(B) for y in range(H)
         for x in range(W)]
    total, anchors = 0.0, 0
    for i in range(len(f)):
        if y_[i] == 255:
            continue
        pos = [p for p in range(len(f)) if p != i and y_[p] == y_[i]]
        neg = [n for n in range(len(f)) if y_[n] not in (255, y_[i])]
        if not pos:
            continue
        neg_sum = sum(math.exp(float(f[i] @ f[n]) / tau) for n in neg)
        li = 0.0
        for p in pos:
            s = float(f[i] @ f[p]) / tau
            li -= w[i] * w[p] * (s - math.log(math.exp(s) + neg_sum))
        total += li / len(pos)
        anchors += 1
    return total / anchors


def test_hand_computed_case() -> None:
    # two class-0 pixels with the same feature, one class-1 pixel orthogonal to them, tau = 1:
    # anchors 0 and 1 each: -(1 - log(e + 1)); pixel 2 has no positive and does not count
    feats = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]).view(1, 2, 1, 3)
    labels = torch.tensor([[[0, 0, 1]]])
    m = make((1, 3), tau=1.0, weight=1.0)
    expected = math.log(math.e + 1) - 1
    assert float(m.contrast(feats, labels)) == pytest.approx(expected, rel=1e-6)
    assert float(m.source_losses({"features": feats}, labels, 0)["src.contrast"]) == \
        pytest.approx(0.5 * expected, rel=1e-6)


def test_source_and_mixed_losses_match_the_loop() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 3, 4, generator=g)
    labels = torch.randint(0, 3, (2, 6, 8), generator=g)
    labels[0, :2] = 255
    weight = torch.rand(2, 6, 8, generator=g)
    m = make((3, 4), tau=0.7, weight=2.0)
    small = labels[:, ::2, ::2]  # nearest from 6x8 to 3x4
    src = m.source_losses({"features": feats}, labels, 0)["src.contrast"]
    assert float(src) == pytest.approx(1.0 * loop_reference(feats, small, 0.7), rel=1e-5)
    mix = m.mixed_losses({"features": feats}, labels, weight, 0)["mix.contrast"]
    expected = loop_reference(feats, small, 0.7, weight[:, ::2, ::2])
    assert float(mix) == pytest.approx(expected, rel=1e-5)


def test_ignore_pixels_change_nothing_and_grid_resize() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 4, 2, 2, generator=g)
    labels = torch.tensor([[[0, 1], [0, 255]], [[1, 0], [255, 1]]])
    m = make((2, 2), tau=0.5)
    before = m.contrast(feats, labels)
    other = feats.clone()
    other[0, :, 1, 1] = torch.randn(4, generator=g) * 10  # an ignored pixel's feature
    assert torch.allclose(m.contrast(other, labels), before)
    # resizing: labels nearest, features bilinear of the unit vectors
    f, lbl, w = to_grid(feats, labels.repeat_interleave(2, 1).repeat_interleave(2, 2),
                        None, (2, 2))
    assert torch.equal(lbl, labels) and w is None
    assert torch.allclose(f, F.normalize(feats, dim=1), atol=1e-6)


def test_gradients_reach_the_features() -> None:
    feats = torch.randn(1, 3, 2, 3, requires_grad=True)
    labels = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    m = make((2, 3))
    m.source_losses({"features": feats}, labels, 0)["src.contrast"].backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
