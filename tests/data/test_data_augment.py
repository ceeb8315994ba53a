"""Strong augmentation against Pillow / colorsys / a direct convolution; class-balanced crop."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from fastuda.data import class_balanced_crop, strong_augment
from fastuda.data.augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    candidate_windows,
    gaussian_blur,
)

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _image(seed: int = 0, h: int = 12, w: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _t(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255


def _np(x: torch.Tensor) -> np.ndarray:
    return (x[0].permute(1, 2, 0).numpy() * 255)


@pytest.mark.parametrize("factor", [0.8, 1.17])
def test_colour_ops_match_pillow(factor: float) -> None:
    img = _image()
    pil = Image.fromarray(img)
    for ours, enhancer in ((adjust_brightness, ImageEnhance.Brightness),
                           (adjust_contrast, ImageEnhance.Contrast),
                           (adjust_saturation, ImageEnhance.Color)):
        expected = np.asarray(enhancer(pil).enhance(factor)).astype(float)
        # Pillow rounds to uint8 (and its contrast uses the rounded mean grey level)
        assert np.abs(_np(ours(_t(img), factor)) - expected).max() <= 1.6, ours.__name__


@pytest.mark.parametrize("shift", [-0.2, 0.07, 0.5])
def test_hue_matches_colorsys(shift: float) -> None:
    img = _image(1)
    out = _np(adjust_hue(_t(img), shift)) / 255
    for y, x in np.ndindex(img.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(img[y, x] / 255))
        expected = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
        np.testing.assert_allclose(out[y, x], expected, atol=1e-9)


def test_blur_matches_direct_convolution() -> None:
    img = _image(2, 20, 30).astype(float)
    sigma, k = 0.9, (5, 3)
    out = gaussian_blur(torch.from_numpy(img).permute(2, 0, 1)[None], sigma, k)[0]
    g = [np.exp(-((np.arange(n) - (n - 1) / 2) ** 2) / (2 * sigma**2)) for n in k]
    kernel = np.outer(g[0] / g[0].sum(), g[1] / g[1].sum())
    padded = np.pad(img, ((2, 2), (1, 1), (0, 0)), mode="reflect")
    expected = np.zeros_like(img)
    for dy in range(5):
        for dx in range(3):
            expected += kernel[dy, dx] * padded[dy:dy + 20, dx:dx + 30]
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-9)


@pytest.mark.parametrize("extent", [8, 100, 128, 512, 640, 1024, 31])
def test_kernel_size_formula(extent: int) -> None:
    # DACS: floor(ceil(0.1 * n) - 0.5 + ceil(0.1 * n) % 2)
    c = math.ceil(0.1 * extent)
    assert blur_kernel_size(extent) == max(1, int(math.floor(c - 0.5 + c % 2)))


def _normalised(imgs: list[np.ndarray]) -> torch.Tensor:
    x = torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i in imgs]).float()
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_same_parameters_for_all_images_of_a_call() -> None:
    a, b = _image(3, 32, 32), _image(4, 32, 32)
    for seed in range(6):
        batch = strong_augment(_normalised([a, b]), mean=MEAN, std=STD,
                               generator=torch.Generator().manual_seed(seed))
        one_a = strong_augment(_normalised([a]), mean=MEAN, std=STD,
                               generator=torch.Generator().manual_seed(seed))
        one_b = strong_augment(_normalised([b]), mean=MEAN, std=STD,
                               generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(batch, torch.cat([one_a, one_b]), atol=1e-4, rtol=0)


def test_probabilities_and_identity() -> None:
    x = _normalised([_image(5, 8, 8)])
    gen = torch.Generator().manual_seed(0)
    changed = [not torch.allclose(strong_augment(x, mean=MEAN, std=STD, generator=gen,
                                                 blur_prob=0.0), x, atol=1e-4)
               for _ in range(400)]
    assert abs(np.mean(changed) - 0.8) < 0.07
    x32 = _normalised([_image(6, 32, 32)])  # a 3x3 kernel (10% of the size)
    blurred = [not torch.allclose(strong_augment(x32, mean=MEAN, std=STD, generator=gen,
                                                 jitter_prob=0.0), x32, atol=1e-4)
               for _ in range(400)]
    assert abs(np.mean(blurred) - 0.5) < 0.08
    same = strong_augment(x, mean=MEAN, std=STD, generator=gen, jitter_prob=0, blur_prob=0)
    torch.testing.assert_close(same, x, atol=1e-4, rtol=0)


def _score(window: np.ndarray, max_ratio: float = 0.75) -> float:
    values, counts = np.unique(window[window != 255], return_counts=True)
    if len(values) < 2 or counts.max() / counts.sum() >= max_ratio:
        return -math.inf
    return float(np.log(counts).sum())


def test_class_balanced_crop_keeps_the_best_window() -> None:
    rng = np.random.default_rng(0)
    label = np.zeros((60, 80), dtype=np.int64)
    label[:, 50:] = 1
    label[40:, 60:] = 2
    label[rng.random((60, 80)) < 0.05] = 255
    pl = torch.from_numpy(label)
    for seed in range(5):
        top, left = class_balanced_crop(pl, (20, 30), generator=torch.Generator().manual_seed(seed))
        windows = candidate_windows(60, 80, (20, 30), 10, torch.Generator().manual_seed(seed))
        scores = [_score(label[t:t + 20, x:x + 30]) for t, x in windows]
        assert (top, left) in windows
        assert _score(label[top:top + 20, left:left + 30]) == max(scores)


def test_class_balanced_crop_rejects_single_class_windows() -> None:
    label = torch.zeros(30, 30, dtype=torch.long)
    label[:, 27:] = 4  # only windows reaching the right edge hold two classes
    gen = torch.Generator().manual_seed(1)
    top, left = class_balanced_crop(label, (10, 10), num_windows=40, generator=gen)
    assert left + 10 > 27


def test_truncated_kernel_is_equivalent_to_the_full_one() -> None:
    x = torch.rand(1, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = 1.15
    full = torch.nn.functional.pad(x, (25, 25, 25, 25), mode="reflect")
    g = torch.exp(-(torch.arange(51, dtype=torch.float64) - 25) ** 2 / (2 * sigma**2))
    g = g / g.sum()
    full = torch.nn.functional.conv2d(full.reshape(3, 1, 114, 146), g.view(1, 1, 51, 1))
    full = torch.nn.functional.conv2d(full, g.view(1, 1, 1, 51)).reshape(1, 3, 64, 96)
    assert (gaussian_blur(x, sigma, (51, 51)) - full).abs().max() < 1e-4
