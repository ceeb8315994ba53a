"""Dark Zurich's daytime partners of its night images (SePiCo's Cityscapes->Dark Zurich variant).

Dark Zurich ships, per night sequence, a correspondence list
``ROOT/corresp/<split>/night/<sequence>.csv``: one ``night,day`` line per night frame, both names
relative to ``rgb_anon`` without the ``_rgb_anon.png`` suffix, e.g.
``train/night/GOPR0356/GOPR0356_frame_000321,train/day/GOPR0351/GOPR0351_frame_000159``.
The released SePiCo reads every ``*.csv`` under ``corresp/train/night/`` into one map (a night
name listed twice with two different days is an error) and loads the day image
``rgb_anon/<split>/day/<part after "day/">_rgb_anon.png`` through the target's pipeline with the
night image's flip (BIT-DA/SePiCo mmseg/models/uda/sepico_dark.py#L60-L68, #L213-L229;
experiments.py#L486). Here the pairing is resolved when the dataset is built, so a missing list,
an unlisted night image or a missing day file is one error naming the file before training
starts; the loaders then crop each day image with its night image's geometry (``day_crop``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from fastuda.data.io import DataError, read_image
from fastuda.data.transforms import Geometry, crop_image

SUFFIX = "_rgb_anon.png"


def read_correspondence(folder: Path) -> dict[str, str]:
    """night name -> day name from every ``*.csv`` under ``folder`` (recursively)."""
    if not folder.is_dir():
        raise DataError(folder, "Dark Zurich correspondence folder not found (the day/night "
                                "pairs: corresp/<split>/night/<sequence>.csv)")
    lists = sorted(folder.rglob("*.csv"), key=str)
    if not lists:
        raise DataError(folder, "no correspondence list (*.csv) in this folder")
    pairs: dict[str, str] = {}
    for path in lists:
        with open(path, newline="") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row:
                    continue
                if len(row) < 2 or "day/" not in row[1]:
                    raise DataError(path, f"line {n}: expected 'night,day' names, got {row!r}")
                night, day = row[0].strip(), row[1].strip()
                if pairs.get(night, day) != day:
                    raise DataError(path, f"line {n}: {night} paired with {day} and with "
                                          f"{pairs[night]}")
                pairs[night] = day
    return pairs


def day_partners(root: Path, split: str, night_images: list[Path]) -> list[str]:
    """The day image file of each night image (``rgb_anon/<split>/night/<seq>/<name>``)."""
    pairs = read_correspondence(root / "corresp" / split / "night")
    night_root = root / "rgb_anon" / split / "night"
    out = []
    for image in night_images:
        name = image.relative_to(night_root).as_posix()[: -len(SUFFIX)]
        key = f"{split}/night/{name}"
        if key not in pairs:
            raise DataError(image, f"night image not in the correspondence lists under "
                                   f"{root / 'corresp' / split / 'night'} (no day partner)")
        # as released: the part after "day/" under rgb_anon/<split>/day (sepico_dark.py#L217-L221)
        day = root / "rgb_anon" / split / "day" / (pairs[key].split("day/", 1)[1] + SUFFIX)
        if not day.is_file():
            raise DataError(day, f"day image of {image} not found")
        out.append(str(day))
    return out


def day_crop(meta: dict[str, Any], crop_hw: tuple[int, int]) -> np.ndarray:
    """The training crop (uint8 HxWx3) of the day image named in a night sample's meta: the
    window, scale and flip of the night image (the release flips both alike, #L222-L224)."""
    path = meta.get("day_path")
    if path is None:
        raise DataError(meta.get("path", "?"), "no day image paired with this image (the "
                                               "target needs Dark Zurich's correspondence)")
    image = read_image(path)
    orig_h, orig_w = meta["orig_size"]
    if image.shape[:2] != (orig_h, orig_w):
        raise DataError(path, f"day image size {image.shape[1]}x{image.shape[0]} differs from "
                              f"its night image's {orig_w}x{orig_h} ({meta.get('path')})")
    return crop_image(image, Geometry.from_meta(meta, crop_hw))


__all__ = ["day_crop", "day_partners", "read_correspondence"]
