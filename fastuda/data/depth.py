"""Depth maps beside the images (CorDA's auxiliary task): reading and cropping like the label.

Format (every dataset): a 16-bit grayscale PNG of inverse depth, ``inverse_depth [1/m] =
value / 65535`` (so depths below 1 m saturate), same size as its image, in a ``depth`` folder:
- synthetic pair / Cityscapes: ``ROOT/depth/<split>/<city>/<name>_depth.png``
- GTA5 / SYNTHIA: ``ROOT/depth/<image file name>``
Value 0 marks pixels without depth (invalid), except in the synthetic pair, where 0 is the sky
(infinitely far; it has no invalid pixel). Invalid pixels and crop padding become NaN here; the
depth losses skip NaN targets.

Training crops are reproduced from the geometry the loaders record in each sample's meta
(``orig_size``, ``scaled_size``, ``crop_box``, ``flip``): the same nearest-neighbour window the
label gets, so depth and label agree pixel for pixel with both loader backends.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from fastuda.data.io import DataError, _load, _open
from fastuda.data.transforms import Geometry, nearest_indices

INVERSE_DEPTH_SCALE = 65535.0
SYNTHETIC_DATASETS = ("synthetic_source", "synthetic_target", "synthetic_night")


def read_inverse_depth(path: str, *, zero_is_invalid: bool = True) -> np.ndarray:
    """A depth PNG as float32 inverse depth in 1/m (HxW); invalid pixels are NaN."""
    with _open(path) as im:
        if im.mode not in ("I;16", "I;16B", "I;16L", "I", "L"):
            raise DataError(path, f"depth image has mode {im.mode!r}; expected a 16-bit "
                                  "grayscale PNG of inverse depth (value / 65535 = 1/m)")
        _load(im, path)
        raw = np.asarray(im)
    if raw.max(initial=0) > 65535 or raw.min(initial=0) < 0:
        raise DataError(path, f"depth values outside [0, 65535]: {int(raw.min())}.."
                              f"{int(raw.max())}")
    inv = raw.astype(np.float32) / INVERSE_DEPTH_SCALE
    if zero_is_invalid:
        inv[raw == 0] = np.nan
    return inv


def depth_crop(meta: dict[str, Any], crop_hw: tuple[int, int]) -> np.ndarray:
    """The training crop of the depth map named in a sample's meta (NaN where invalid or
    padded); the same window, scale and flip as the sample's label."""
    path = meta.get("depth_path")
    if path is None:
        raise DataError(meta.get("path", "?"), "no depth map for this image (expected a "
                                               "16-bit inverse-depth PNG in the dataset's "
                                               "depth folder; see fastuda/data/depth.py)")
    depth = read_inverse_depth(path, zero_is_invalid=meta.get("dataset") not in
                               SYNTHETIC_DATASETS)
    orig_h, orig_w = meta["orig_size"]
    if depth.shape != (orig_h, orig_w):
        raise DataError(path, f"depth size {depth.shape[1]}x{depth.shape[0]} differs from the "
                              f"image size {orig_w}x{orig_h} ({meta.get('path')})")
    g = Geometry.from_meta(meta, crop_hw)
    ys = nearest_indices(g.top, g.valid_h, g.scaled_h, g.orig_h)
    xs = nearest_indices(g.left, g.valid_w, g.scaled_w, g.orig_w)
    window = depth[np.ix_(ys, xs)]
    if g.flip:
        window = window[:, ::-1]
    out = np.full(crop_hw, np.nan, dtype=np.float32)
    out[:g.valid_h, :g.valid_w] = window
    return out


_POOL: ThreadPoolExecutor | None = None


def load_depth_batch(batch: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse depth [B, H, W] (float32, NaN invalid) for a training batch of either loader.
    The images of the batch decode in parallel threads (Pillow releases the GIL while decoding)."""
    global _POOL
    crop_hw = tuple(int(x) for x in batch["image"].shape[-2:])
    metas = batch["meta"]
    if len(metas) > 1:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fastuda-depth")
        crops = list(_POOL.map(lambda meta: depth_crop(meta, crop_hw), metas))
    else:
        crops = [depth_crop(meta, crop_hw) for meta in metas]
    return torch.from_numpy(np.stack(crops)).to(device, non_blocking=True)


__all__ = ["INVERSE_DEPTH_SCALE", "depth_crop", "load_depth_batch", "read_inverse_depth"]
