"""Training and validation geometry: resize, random rescale, crop with cat_max_ratio, flip, pad.

The geometry of a training crop is decided on the label alone (`choose_crop`) from random draws
made beforehand (`CropParams`), so both loaders (PyTorch and DALI) apply identical geometry for the
same seed. The image is then resampled only inside the crop window: resizing the region
``source_box`` of the original image to the crop's size samples exactly the pixels that resizing
the whole image and cropping would (pixel-centre aligned, antialiased when shrinking).

mmseg's defaults: ratio range (0.5, 2.0) (the DAFormer-lineage releases use none: their presets
set [1, 1]; DASS draws one of a few fixed scales instead, ``data.scale_choices``), cat_max_ratio
0.75 with up to 10 crop draws (the last draw is kept when none passes), flip probability 0.5,
padding of the image with 0 after normalisation (the mean colour) and of the label with 255 at the
bottom/right (with ``data.small_crop = "resize"`` there is no padding: an image smaller than the
crop is enlarged to fit, :func:`fit_crop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from fastuda.data.classes import IGNORE_INDEX

CROP_TRIES = 10
# what a rescaled image smaller than the crop gets: padding (mmseg) or enlarged to fit (DASS)
SMALL_CROP = ("pad", "resize")


@dataclass(frozen=True)
class CropParams:
    """The random draws of one crop attempt: scale ratio, up to 10 crop anchors, flip."""

    ratio: float
    anchors: tuple[tuple[float, float], ...]  # uniform [0, 1) (y, x) per crop draw
    flip: bool


@dataclass(frozen=True)
class Geometry:
    """Where a training crop comes from: rescaled size, crop window, flip."""

    orig_h: int
    orig_w: int
    scaled_h: int
    scaled_w: int
    top: int
    left: int
    crop_h: int
    crop_w: int
    flip: bool

    @property
    def valid_h(self) -> int:  # rows of the crop inside the image; the rest is padding
        return min(self.crop_h, self.scaled_h - self.top)

    @property
    def valid_w(self) -> int:
        return min(self.crop_w, self.scaled_w - self.left)

    def source_box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the crop's valid part in original image coordinates."""
        sx, sy = self.orig_w / self.scaled_w, self.orig_h / self.scaled_h
        return (self.left * sx, self.top * sy, (self.left + self.valid_w) * sx,
                (self.top + self.valid_h) * sy)

    def as_meta(self) -> dict[str, object]:
        return {"scaled_size": (self.scaled_h, self.scaled_w),
                "crop_box": (self.top, self.left, self.valid_h, self.valid_w), "flip": self.flip}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], crop_hw: tuple[int, int]) -> Geometry:
        """The geometry a loader recorded in a sample's meta (``orig_size`` and :meth:`as_meta`'s
        keys), for the files cropped like the image (depth maps, day images)."""
        orig_h, orig_w = meta["orig_size"]
        scaled_h, scaled_w = meta["scaled_size"]
        top, left, _, _ = meta["crop_box"]
        return cls(int(orig_h), int(orig_w), int(scaled_h), int(scaled_w), int(top), int(left),
                   int(crop_hw[0]), int(crop_hw[1]), bool(meta["flip"]))


def draw_crop_params(rng: np.random.Generator, ratio_range: tuple[float, float],
                     flip_prob: float, scale_choices: tuple[float, ...] = ()) -> CropParams:
    """One crop attempt's draws: the scale ratio uniform in ``ratio_range``, or one of
    ``scale_choices`` with equal probability when given (DASS's ``random.choice``)."""
    if scale_choices:
        ratio = float(scale_choices[int(rng.integers(len(scale_choices)))])
    else:
        ratio = float(rng.uniform(ratio_range[0], ratio_range[1]))
    anchors = tuple((float(a), float(b)) for a, b in rng.random((CROP_TRIES, 2)))
    return CropParams(ratio, anchors, bool(rng.random() < flip_prob))


def scaled_size(orig_hw: tuple[int, int], resize_wh: tuple[int, int] | None,
                ratio: float, keep_ratio: bool = False) -> tuple[int, int]:
    """(height, width) after the fixed resize (``resize_wh`` or the original size) times ratio.

    ``keep_ratio``: mmcv's ``Resize(img_scale, keep_ratio=True)`` (the mmseg releases' default):
    one factor, the largest that fits the long side into max(img_scale) and the short side into
    min(img_scale), e.g. GTA 1914x1052 -> 1280x704 for (1280, 720)."""
    if resize_wh and keep_ratio:
        h, w = orig_hw
        f = min(max(resize_wh) / max(h, w), min(resize_wh) / min(h, w)) * ratio
        return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))
    base_h, base_w = (resize_wh[1], resize_wh[0]) if resize_wh else orig_hw
    return max(1, int(base_h * ratio + 0.5)), max(1, int(base_w * ratio + 0.5))


def fit_crop(scaled_hw: tuple[int, int], crop_hw: tuple[int, int]) -> tuple[int, int]:
    """The rescaled size enlarged, aspect ratio kept, until the crop fits inside
    (``data.small_crop = "resize"``); a size the crop already fits is returned unchanged.

    DASS crops a square of the image's shorter side when the image is smaller than the crop and
    resizes that square to the crop size (cvlab-yonsei/DASS dataset/joint_transforms.py
    #L108-L112 with nopad=True, dataset/dataset.py#L103-L104; then Resize, #L110 and
    joint_transforms.py#L330-L356):
    the same pixels as enlarging the image until its binding side equals the crop's and cropping
    there, which keeps one resampling of the window (the module doc)."""
    sh, sw = scaled_hw
    ch, cw = crop_hw
    if sh >= ch and sw >= cw:
        return sh, sw
    if ch * sw >= cw * sh:  # the height binds: it becomes the crop's height
        return ch, max(cw, int(sw * ch / sh + 0.5))
    return max(ch, int(sh * cw / sw + 0.5)), cw


def nearest_indices(start: int, length: int, out_total: int, in_total: int) -> np.ndarray:
    """Source indices of output pixels start..start+length of a nearest resize in_total->out_total
    (pixel-centre aligned: floor((i + 0.5) * in / out), exact in integers)."""
    i = np.arange(start, start + length, dtype=np.int64)
    return np.minimum(((2 * i + 1) * in_total) // (2 * out_total), in_total - 1)


def _window(label: np.ndarray, g: Geometry) -> np.ndarray:
    ys = nearest_indices(g.top, g.valid_h, g.scaled_h, g.orig_h)
    xs = nearest_indices(g.left, g.valid_w, g.scaled_w, g.orig_w)
    return label[np.ix_(ys, xs)]


def passes_cat_max_ratio(window: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's test: more than one class, and no class above cat_max_ratio of the valid pixels."""
    counts = np.bincount(window.ravel(), minlength=256)[:IGNORE_INDEX]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def choose_crop(label: np.ndarray, params: CropParams, crop_hw: tuple[int, int],
                resize_wh: tuple[int, int] | None, cat_max_ratio: float,
                keep_ratio: bool = False, small_crop: str = "pad") -> tuple[Geometry, np.ndarray]:
    """Rescale by ``params.ratio`` and pick the first crop draw that passes cat_max_ratio
    (``cat_max_ratio >= 1``: the first draw, whatever the label holds). A rescaled image smaller
    than the crop is padded (``small_crop = "pad"``, mmseg) or enlarged until the crop fits
    (``"resize"``, DASS; :func:`fit_crop`).

    Returns the geometry and the label crop (flipped, padded with 255 to ``crop_hw``).
    """
    if small_crop not in SMALL_CROP:
        raise ValueError(f"small_crop must be one of {SMALL_CROP}, got {small_crop!r}")
    orig_h, orig_w = label.shape
    sh, sw = scaled_size((orig_h, orig_w), resize_wh, params.ratio, keep_ratio)
    if small_crop == "resize":
        sh, sw = fit_crop((sh, sw), crop_hw)
    ch, cw = crop_hw
    margin_h, margin_w = max(sh - ch, 0), max(sw - cw, 0)
    window = None
    for u, v in params.anchors:
        g = Geometry(orig_h, orig_w, sh, sw, min(int(u * (margin_h + 1)), margin_h),
                     min(int(v * (margin_w + 1)), margin_w), ch, cw, params.flip)
        window = _window(label, g)
        if cat_max_ratio >= 1 or passes_cat_max_ratio(window, cat_max_ratio):
            break
    return g, finish_label(window, g)


def finish_label(window: np.ndarray, g: Geometry) -> np.ndarray:
    """Flip the label window if asked, then pad it with 255 to the crop size (bottom/right)."""
    if g.flip:
        window = window[:, ::-1]
    out = np.full((g.crop_h, g.crop_w), IGNORE_INDEX, dtype=np.uint8)
    out[: window.shape[0], : window.shape[1]] = window
    return out


def crop_image(image: np.ndarray, g: Geometry) -> np.ndarray:
    """Resample the crop window of ``image`` (bilinear, antialiased), flip, pad with 0 to the crop
    size. Returns uint8 HxWx3 (the padded area is re-filled after normalisation)."""
    box = g.source_box()
    pil = Image.fromarray(image)
    if (g.valid_w, g.valid_h) == (g.orig_w, g.orig_h) and box == (0, 0, g.orig_w, g.orig_h):
        region = image
    else:
        region = np.asarray(pil.resize((g.valid_w, g.valid_h), Image.Resampling.BILINEAR,
                                       box=box))
    if g.flip:
        region = region[:, ::-1]
    out = np.zeros((g.crop_h, g.crop_w, 3), dtype=np.uint8)
    out[: region.shape[0], : region.shape[1]] = region
    return out


def resize_pair(image: np.ndarray, label: np.ndarray, resize_wh: tuple[int, int] | None,
                keep_ratio: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validation resize: image bilinear (antialiased), label nearest, to (width, height)
    (``keep_ratio``: the size :func:`scaled_size` gives)."""
    if resize_wh and keep_ratio:
        h, w = scaled_size(image.shape[:2], resize_wh, 1.0, True)
        resize_wh = (w, h)
    if not resize_wh or (image.shape[1], image.shape[0]) == tuple(resize_wh):
        return image, label
    w, h = resize_wh
    image = np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    ys = nearest_indices(0, h, h, label.shape[0])
    xs = nearest_indices(0, w, w, label.shape[1])
    return image, label[np.ix_(ys, xs)]
