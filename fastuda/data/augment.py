"""Batched tensor augmentations used inside the training step.

`strong_augment` (DACS/DAFormer): colour jitter (brightness, contrast, saturation, hue with strength
0.2, applied with probability 0.8, the four in a random order) and Gaussian blur (sigma uniform in
[0.15, 1.15], probability 0.5, kernel about 10% of the image size, odd), on normalised images; all
images of one call share the random parameters. Colour operations follow the usual definitions
(torchvision/Pillow): brightness scales, contrast blends with the mean grey level of each image,
saturation blends with the per-pixel grey level (ITU-R 601 luma), hue rotates the HSV hue.

`class_balanced_crop` (SePiCo): the best of 10 random windows of a pseudo-label map.

`color_jitter` (SPCL's source augmentation, ``data.source.color_jitter``): torchvision's
``ColorJitter`` with the same colour operations, one `ColorJitterDraw` per training crop, drawn by
the sample planner (fastuda/data/sampling.py) so that a stream resumes with the same draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> [B,1,H,W] luma."""
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (x * factor).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (factor * x + (1 - factor) * _grey(x)).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe_delta) % 6,
                    torch.where(maxc == g, (b - r) / safe_delta + 2, (r - g) / safe_delta + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h)) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                    torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Closed form: channel n in (5, 3, 1) for (r, g, b) is v - v s clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 h) mod 6."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (n + 6 * h) % 6
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(x)
    hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
    return hsv_to_rgb(hsv)


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # the operations of a ColorJitterDraw's order


@dataclass(frozen=True)
class ColorJitterDraw:
    """One image's ColorJitter parameters: the order of the four operations and their factors
    (None: that strength is 0, the operation is skipped, as torchvision skips it)."""

    order: tuple[int, ...]
    brightness: float | None
    contrast: float | None
    saturation: float | None
    hue: float | None


def draw_color_jitter(rng: np.random.Generator, strengths: Sequence[float]) -> ColorJitterDraw:
    """torchvision's ``ColorJitter.get_params`` for ``strengths = (b, c, s, h)``: a random order
    of the four, factors uniform in [max(0, 1 - x), 1 + x], the hue shift uniform in [-h, h]."""
    b, c, s, h = (float(x) for x in strengths)
    order = tuple(int(k) for k in rng.permutation(4))

    def factor(x: float) -> float | None:
        return float(rng.uniform(max(0.0, 1.0 - x), 1.0 + x)) if x > 0 else None

    brightness, contrast, saturation = factor(b), factor(c), factor(s)
    hue = float(rng.uniform(-h, h)) if h > 0 else None
    return ColorJitterDraw(order, brightness, contrast, saturation, hue)


def color_jitter(x: torch.Tensor, draw: ColorJitterDraw) -> torch.Tensor:
    """Apply ``draw`` to [B,3,H,W] RGB images in [0, 1] (each op clamps to [0, 1], contrast
    blends with each image's mean grey level)."""
    ops = {BRIGHTNESS: (adjust_brightness, draw.brightness),
           CONTRAST: (adjust_contrast, draw.contrast),
           SATURATION: (adjust_saturation, draw.saturation), HUE: (adjust_hue, draw.hue)}
    for k in draw.order:
        op, value = ops[k]
        if value is not None:
            x = op(x, value)
    return x


def jitter_crop(crop: np.ndarray, valid_hw: tuple[int, int], draw: ColorJitterDraw
                ) -> np.ndarray:
    """A uint8 HxWx3 training crop jittered inside its valid (unpadded) part, rounded back to
    uint8 (the release jitters a uint8 PIL image); the padding is left as it is."""
    vh, vw = valid_hw
    out = crop.copy()
    x = torch.from_numpy(np.ascontiguousarray(crop[:vh, :vw])).permute(2, 0, 1)[None]
    y = color_jitter(x.float() / 255.0, draw)
    out[:vh, :vw] = (y * 255.0).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    return out


def jitter_normalised(images: torch.Tensor, metas: Sequence[dict[str, Any]],
                      draws: Sequence[ColorJitterDraw | None], mean: Sequence[float],
                      std: Sequence[float]) -> torch.Tensor:
    """`jitter_crop` on a batch the loader already normalised (DALI): the valid part of each
    image un-normalised, jittered, rounded to grey levels as `jitter_crop` rounds, normalised
    again; the padding stays 0."""
    out = images.clone()
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    sd = torch.tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    for b, (meta, draw) in enumerate(zip(metas, draws, strict=True)):
        if draw is None:
            continue
        _, _, vh, vw = meta["crop_box"]
        x = ((images[b, :, :vh, :vw] * sd + m) / 255.0).clamp(0, 1)
        y = (color_jitter(x[None], draw)[0] * 255.0).round()
        out[b, :, :vh, :vw] = (y - m) / sd
    return out


def blur_kernel_size(extent: int) -> int:
    """DACS's kernel size: ceil(10% of the extent), made odd by going down one when even."""
    k = math.ceil(0.1 * extent)
    return max(1, k if k % 2 == 1 else k - 1)


# taps further out than this many sigmas weigh < 1e-5 of the centre tap: they are dropped
_BLUR_TRUNCATE = 4.8


def _blur_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Convolve [B,C,H,W] along dim (2 or 3) with an odd 1-D kernel, reflect padding."""
    k = kernel.numel()
    r = k // 2
    pad = (0, 0, r, r) if dim == 2 else (r, r, 0, 0)
    padded = F.pad(x, pad, mode="reflect")
    if x.is_cuda:  # one depthwise convolution
        c = x.shape[1]
        shape = (c, 1, k, 1) if dim == 2 else (c, 1, 1, k)
        return F.conv2d(padded, kernel.view(1, 1, *shape[2:]).expand(shape).contiguous(),
                        groups=c)
    n = x.shape[dim]  # CPU: a few shifted multiply-adds beat a thin convolution
    out = padded.narrow(dim, 0, n) * kernel[0]
    for j in range(1, k):
        out += padded.narrow(dim, j, n) * kernel[j]
    return out


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_hw: tuple[int, int] | None = None
                  ) -> torch.Tensor:
    """Separable Gaussian blur of [B,C,H,W] with reflect padding.

    The kernel size defaults to DACS's (about 10% of the image, odd); taps beyond 4.8 sigma
    (weights < 1e-5 of the centre) are dropped, which changes no pixel by more than 1e-4 of the
    value range and makes the blur of a 512x512 image several times cheaper.
    """
    _, _, h, w = x.shape
    kh, kw = kernel_hw or (blur_kernel_size(h), blur_kernel_size(w))
    radius_cap = max(1, math.ceil(_BLUR_TRUNCATE * sigma))
    out = x
    for dim, k, extent in ((2, kh, h), (3, kw, w)):
        r = min(k // 2, radius_cap, extent - 1)  # reflect padding must stay inside the image
        if r <= 0:
            continue
        coords = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-(coords**2) / (2 * sigma**2))
        out = _blur_axis(out, kernel / kernel.sum(), dim)
    return out


def strong_augment(images: torch.Tensor, *, mean: Sequence[float], std: Sequence[float],
                   generator: torch.Generator, jitter_strength: float = 0.2,
                   jitter_prob: float = 0.8, blur_prob: float = 0.5,
                   blur_sigma: Sequence[float] = (0.15, 1.15)) -> torch.Tensor:
    """Colour jitter + Gaussian blur on normalised [B,3,H,W] images (same parameters for all).

    The random numbers come from ``generator`` (a CPU generator; the images may live anywhere), a
    fixed count per call, so the stream of parameters does not depend on the branches taken.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"strong_augment expects [B,3,H,W] images, got {tuple(images.shape)}")
    u = torch.rand(7, generator=generator, dtype=torch.float64).tolist()
    order = torch.randperm(4, generator=generator).tolist()
    s = jitter_strength
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    x = (images * sd + m) / 255.0
    if u[0] < jitter_prob and s > 0:
        ops = (lambda t: adjust_brightness(t, 1 - s + 2 * s * u[1]),
               lambda t: adjust_contrast(t, 1 - s + 2 * s * u[2]),
               lambda t: adjust_saturation(t, 1 - s + 2 * s * u[3]),
               lambda t: adjust_hue(t, min(0.5, s) * (2 * u[4] - 1)))
        x = x.clamp(0, 1)
        for k in order:
            x = ops[k](x)
    if u[5] < blur_prob:
        x = gaussian_blur(x, blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[6])
    return (x * 255.0 - m) / sd


def window_score(window: torch.Tensor, *, max_ratio: float = 0.75, ignore_index: int = 255
                 ) -> float:
    """SePiCo's window score: sum of log(pixel count) over the classes present, or -inf when the
    window holds fewer than two classes or one class covers max_ratio of its valid pixels."""
    valid = window[window != ignore_index]
    if valid.numel() == 0:
        return -math.inf
    counts = torch.bincount(valid.long().flatten())
    counts = counts[counts > 0].double()
    if counts.numel() < 2 or counts.max() / counts.sum() >= max_ratio:
        return -math.inf
    return float(torch.log(counts).sum())


def candidate_windows(height: int, width: int, crop_size: tuple[int, int], num_windows: int,
                      generator: torch.Generator) -> list[tuple[int, int]]:
    """Uniform random (top, left) of crop windows inside an image (0 where the crop is larger)."""
    ch, cw = crop_size
    tops = torch.randint(0, max(height - ch, 0) + 1, (num_windows,), generator=generator)
    lefts = torch.randint(0, max(width - cw, 0) + 1, (num_windows,), generator=generator)
    return list(zip(tops.tolist(), lefts.tolist(), strict=True))


def class_balanced_crop(pseudo_label: torch.Tensor, crop_size: tuple[int, int], *,
                        num_windows: int = 10, max_ratio: float = 0.75, ignore_index: int = 255,
                        generator: torch.Generator) -> tuple[int, int]:
    """(top, left) of the best of ``num_windows`` random windows of a [H,W] pseudo-label map.

    Windows with fewer than two classes or one class above ``max_ratio`` are rejected; when all
    are, the first window is returned.
    """
    if pseudo_label.ndim != 2:
        raise ValueError(f"pseudo_label must be [H, W], got {tuple(pseudo_label.shape)}")
    h, w = pseudo_label.shape
    ch, cw = crop_size
    windows = candidate_windows(h, w, (ch, cw), num_windows, generator)
    best, best_score = windows[0], -math.inf
    for top, left in windows:
        score = window_score(pseudo_label[top:top + ch, left:left + cw], max_ratio=max_ratio,
                             ignore_index=ignore_index)
        if score > best_score:
            best, best_score = (top, left), score
    return best
