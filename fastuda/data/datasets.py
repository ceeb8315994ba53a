"""Datasets in the layouts users download, read into the 19 Cityscapes train ids.

`build_dataset(cfg)` returns a map-style `SegDataset`: ``ds[i] -> (image uint8 HxWx3, label uint8
HxW train ids, meta)`` at the file's own resolution (resizing and cropping are the pipelines' job).
File lists are sorted, so index i is the same file on every machine and every run.

Layouts (ROOT = ``cfg.root``):
- gta: ``images/*.png``, ``labels/*.png`` (Cityscapes label ids, palette PNG)
- cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png``,
  ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` (or ``*_gtFine_labelTrainIds.png``)
- synthia: ``RGB/*.png``, ``GT/LABELS/*.png`` (16-bit PNG, class id in the red channel)
- dark_zurich: ``rgb_anon/<split>/night/<seq>/*_rgb_anon.png``,
  ``gt/<split>/night/<seq>/*_gt_labelTrainIds.png`` (the train split has no labels); with
  ``day=True`` (SePiCo's day/night variant) also ``corresp/<split>/night/*.csv`` and the day images
  ``rgb_anon/<split>/day/<seq>/*_rgb_anon.png`` they name (fastuda/data/day.py)
- folder: ``<image_dir>/<split>/**/*<image_suffix>`` and ``<label_dir>/<split>/**/*<label_suffix>``
  (``split = ""`` for flat folders), raw ids mapped by ``label_map`` (empty: already train ids)
- synthetic_source / synthetic_target / synthetic_night: the generated pair (fastuda.data.synthetic)
  in the Cityscapes layout under ``ROOT/source``, ``ROOT/target``, ``ROOT/night``.

Optional depth maps (CorDA): a ``depth`` folder beside the images, 16-bit inverse-depth PNGs
(format and file names in fastuda/data/depth.py); a sample's ``meta["depth_path"]`` names its map.

Where ``python -m fastuda.prepare`` has written ``*_labelTrainIds.png`` beside a raw label, that
file is read instead of converting the raw ids on every load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fastuda.config import DatasetConfig
from fastuda.data.classes import CITYSCAPES_CLASSES, IGNORE_INDEX
from fastuda.data.io import (
    DataError,
    LabelEncoding,
    cityscapes_id_encoding,
    map_encoding,
    read_image,
    read_label,
    synthia_encoding,
    train_id_encoding,
)

log = logging.getLogger(__name__)

SYNTHETIC_DOMAINS = {"synthetic_source": "source", "synthetic_target": "target",
                     "synthetic_night": "night"}
TRAIN_ID_SUFFIX = "_labelTrainIds.png"

LAYOUTS: dict[str, str] = {
    "gta": (
        "ROOT/\n"
        "  images/00001.png ...   RGB images (1914x1052)\n"
        "  labels/00001.png ...   Cityscapes label ids (palette PNG), same file names\n"
        "  depth/00001.png ...    (optional, CorDA) 16-bit inverse depth, same file names"),
    "cityscapes": (
        "ROOT/\n"
        "  leftImg8bit/{split}/<city>/<name>_leftImg8bit.png\n"
        "  gtFine/{split}/<city>/<name>_gtFine_labelIds.png   (or _gtFine_labelTrainIds.png)\n"
        "  depth/{split}/<city>/<name>_depth.png   (optional, CorDA) 16-bit inverse depth"),
    "synthia": (
        "ROOT/\n"
        "  RGB/0000000.png ...         RGB images\n"
        "  GT/LABELS/0000000.png ...   16-bit PNG, SYNTHIA class id in the red channel\n"
        "  depth/0000000.png ...       (optional, CorDA) 16-bit inverse depth"),
    "dark_zurich": (
        "ROOT/\n"
        "  rgb_anon/{split}/night/<sequence>/<name>_rgb_anon.png\n"
        "  gt/{split}/night/<sequence>/<name>_gt_labelTrainIds.png   (val only; train has none)\n"
        "  corresp/{split}/night/<sequence>.csv   (day/night variant) 'night,day' name pairs\n"
        "  rgb_anon/{split}/day/<sequence>/<name>_rgb_anon.png   (day/night variant) day images"),
    "folder": (
        "ROOT/\n"
        "  {image_dir}/{split}/**/<name>{image_suffix}\n"
        "  {label_dir}/{split}/**/<name>{label_suffix}   (optional: unlabelled if the folder is "
        "absent)"),
}


class LayoutError(DataError):
    """The dataset root or a split folder is missing; the message shows the expected layout."""

    def __init__(self, path: str | Path, problem: str, layout: str) -> None:
        super().__init__(path, f"{problem}\nexpected layout:\n{layout}")


@dataclass(frozen=True)
class SampleFiles:
    """The files of one sample. ``label`` is what loading reads; ``label_is_train_ids`` says how."""

    image: str
    label: str | None
    label_is_train_ids: bool
    raw_label: str | None = None  # the downloaded label (for prepare), when it is not train ids
    prepared_label: str | None = None  # where prepare writes the train-id PNG for raw_label
    depth: str | None = None  # inverse-depth PNG (synthetic pair), when present
    day: str | None = None  # Dark Zurich: the paired daytime image (fastuda/data/day.py)


class SegDataset:
    """A list of (image, label) files of one split and how to decode them."""

    def __init__(self, name: str, root: Path, split: str, files: list[SampleFiles],
                 raw_encoding: LabelEncoding, num_classes: int, on_error: str = "raise",
                 layout: str = "") -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.name = name
        self.root = root
        self.split = split
        self.files = files
        self.raw_encoding = raw_encoding
        self.train_encoding = train_id_encoding(num_classes)
        self.num_classes = num_classes
        self.class_names: tuple[str, ...] = CITYSCAPES_CLASSES[:num_classes]
        self.on_error = on_error
        self.layout = layout
        self.has_labels = any(f.label is not None for f in files)
        self.skipped: dict[str, str] = {}  # path -> problem, for skips made in this process

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"SegDataset({self.name!r}, root={str(self.root)!r}, split={self.split!r}, "
                f"{len(self)} images, labels={'yes' if self.has_labels else 'no'})")

    @property
    def stats_path(self) -> Path:
        """The JSON of per-image class pixel counts written by prepare (rare class sampling)."""
        return self.root / f"class_stats_{self.split or 'all'}.json"

    def relpath(self, i: int) -> str:
        return str(Path(self.files[i].image).relative_to(self.root))

    def load_label(self, i: int) -> np.ndarray | None:
        f = self.files[i]
        if f.label is None:
            return None
        enc = self.train_encoding if f.label_is_train_ids else self.raw_encoding
        return read_label(f.label, enc)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Load sample i or raise DataError (no skipping)."""
        f = self.files[i]
        image = read_image(f.image)
        label = self.load_label(i)
        if label is None:
            label = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        elif label.shape != image.shape[:2]:
            raise DataError(f.label, f"label size {label.shape[1]}x{label.shape[0]} differs from "
                                     f"the image size {image.shape[1]}x{image.shape[0]} "
                                     f"({f.image})")
        meta = {"path": f.image, "label_path": f.label, "index": i, "dataset": self.name,
                "has_label": f.label is not None, "orig_size": tuple(image.shape[:2])}
        if f.depth is not None:
            meta["depth_path"] = f.depth
        if f.day is not None:
            meta["day_path"] = f.day
        return image, label, meta

    def load_or_skip(self, i: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Load sample i; with on_error="skip", bad samples are replaced by the next good one.

        The skipped files are listed in ``meta["skipped"]`` as (path, problem) pairs, logged, and
        counted in ``self.skipped`` of the process that loaded them.
        """
        skipped: list[tuple[str, str]] = []
        for k in range(len(self)):
            j = (i + k) % len(self)
            try:
                image, label, meta = self.load(j)
            except DataError as err:
                if self.on_error == "raise":
                    raise
                skipped.append((err.path, err.problem))
                if err.path not in self.skipped:
                    log.warning("skipping bad sample %d of %s: %s", j, self.name, err)
                self.skipped[err.path] = err.problem
                continue
            meta["skipped"] = skipped
            return image, label, meta
        raise DataError(self.root, f"every one of the {len(self)} samples of {self.name} "
                                   f"({self.split}) is unreadable")

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {self!r}")
        return self.load_or_skip(i)


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------
def _require_dir(path: Path, what: str, layout: str) -> None:
    if not path.is_dir():
        raise LayoutError(path, f"{what} folder not found", layout)


def _sorted(paths: Any) -> list[Path]:
    return sorted(paths, key=lambda p: str(p))


def _prepared(raw: Path, raw_suffix: str = ".png") -> Path:
    return raw.with_name(raw.name[: -len(raw_suffix)] + TRAIN_ID_SUFFIX)


def _pair(image: Path, raw_label: Path | None, prepared: Path | None,
          raw_is_train_ids: bool, depth: Path | None = None) -> SampleFiles:
    """Pick the file loading reads: the raw label if it holds train ids, else the prepared one if
    prepare wrote it, else the raw label (converted on load)."""
    if raw_label is None or not raw_label.is_file():
        return SampleFiles(str(image), None, True, depth=str(depth) if depth else None)
    if raw_is_train_ids:
        return SampleFiles(str(image), str(raw_label), True, depth=str(depth) if depth else None)
    use_prepared = prepared is not None and prepared.is_file()
    return SampleFiles(str(image), str(prepared if use_prepared else raw_label), use_prepared,
                       raw_label=str(raw_label), prepared_label=str(prepared) if prepared else None,
                       depth=str(depth) if depth else None)


def _check_labels(files: list[SampleFiles], name: str, on_error: str, layout: str,
                  label_root: Path) -> list[SampleFiles]:
    """Some but not all images have a label: error naming the first unlabelled image, or skip."""
    missing = [f for f in files if f.label is None]
    if not missing or len(missing) == len(files):
        return files
    if on_error == "raise":
        raise LayoutError(missing[0].image, f"no label file for this image under {label_root} "
                                            f"({len(missing)} of {len(files)} images of {name} "
                                            f"have none)", layout)
    log.warning("%s: skipping %d images without a label (first: %s)", name, len(missing),
                missing[0].image)
    return [f for f in files if f.label is not None]


def _gta(root: Path, split: str, layout: str) -> list[SampleFiles]:
    if split not in ("train", "all", ""):
        raise LayoutError(root, f"GTA5 has no split {split!r} (use 'train': all images)", layout)
    images, labels = root / "images", root / "labels"
    _require_dir(images, "images", layout)
    _require_dir(labels, "labels", layout)
    return [_pair(p, labels / p.name, _prepared(labels / p.name), False, _depth_beside(root, p))
            for p in _sorted(images.glob("*.png"))]


def _depth_beside(root: Path, image: Path) -> Path | None:
    """ROOT/depth/<image name> when it exists (GTA5, SYNTHIA)."""
    depth = root / "depth" / image.name
    return depth if depth.is_file() else None


def _synthia(root: Path, split: str, layout: str) -> list[SampleFiles]:
    if split not in ("train", "all", ""):
        raise LayoutError(root, f"SYNTHIA has no split {split!r} (use 'train': all images)",
                          layout)
    images, labels = root / "RGB", root / "GT" / "LABELS"
    _require_dir(images, "RGB", layout)
    _require_dir(labels, "GT/LABELS", layout)
    return [_pair(p, labels / p.name, _prepared(labels / p.name), False, _depth_beside(root, p))
            for p in _sorted(images.glob("*.png"))]


def _cityscapes(root: Path, split: str, layout: str, with_depth: bool = True
                ) -> list[SampleFiles]:
    images = root / "leftImg8bit" / split
    _require_dir(root / "leftImg8bit", "leftImg8bit", layout)
    _require_dir(images, f"leftImg8bit/{split}", layout)
    files = []
    for p in _sorted(images.glob("*/*_leftImg8bit.png")):
        stem = p.name[: -len("_leftImg8bit.png")]
        label_dir = root / "gtFine" / split / p.parent.name
        train_ids = label_dir / f"{stem}_gtFine{TRAIN_ID_SUFFIX}"
        depth = root / "depth" / split / p.parent.name / f"{stem}_depth.png"
        depth_path = depth if with_depth and depth.is_file() else None
        if train_ids.is_file():
            files.append(_pair(p, train_ids, None, True, depth_path))
        else:
            raw = label_dir / f"{stem}_gtFine_labelIds.png"
            files.append(_pair(p, raw, train_ids, False, depth_path))
    return files


def _dark_zurich(root: Path, split: str, layout: str, day: bool = False) -> list[SampleFiles]:
    _require_dir(root / "rgb_anon", "rgb_anon", layout)
    images = root / "rgb_anon" / split / "night"
    _require_dir(images, f"rgb_anon/{split}/night", layout)
    files = []
    paths = _sorted(images.glob("*/*_rgb_anon.png"))
    for p in paths:
        stem = p.name[: -len("_rgb_anon.png")]
        label = root / "gt" / split / "night" / p.parent.name / f"{stem}_gt_labelTrainIds.png"
        files.append(_pair(p, label, None, True))
    if day and paths:
        from fastuda.data.day import day_partners

        days = day_partners(root, split, paths)
        files = [replace(f, day=d) for f, d in zip(files, days, strict=True)]
    return files


def _folder(cfg: DatasetConfig, root: Path, layout: str) -> list[SampleFiles]:
    image_root = root / cfg.image_dir / cfg.split if cfg.split else root / cfg.image_dir
    label_root = root / cfg.label_dir / cfg.split if cfg.split else root / cfg.label_dir
    _require_dir(image_root, f"image folder ({cfg.image_dir}/{cfg.split})", layout)
    files = []
    for p in _sorted(image_root.rglob(f"*{cfg.image_suffix}")):
        rel = p.relative_to(image_root)
        label = label_root / rel.parent / (p.name[: -len(cfg.image_suffix)] + cfg.label_suffix)
        files.append(_pair(p, label, None, not cfg.label_map))
    return files


def build_dataset(cfg: DatasetConfig, *, on_error: str = "raise", day: bool = False
                  ) -> SegDataset:
    """Build the dataset ``cfg.name`` at ``cfg.root`` (split ``cfg.split``); see the module doc.
    ``day``: pair every image with its daytime partner (Dark Zurich only; ``meta["day_path"]``)."""
    name = cfg.name
    if day and name != "dark_zurich":
        raise DataError(cfg.root, f"day partners of the target images exist only for "
                                  f"'dark_zurich' (its correspondence lists), not {name!r}")
    root = Path(cfg.root).expanduser()
    num_classes = cfg.num_classes
    if name in SYNTHETIC_DOMAINS:
        from fastuda.data.synthetic import ensure_synthetic

        ensure_synthetic(str(root))
        domain_root = root / SYNTHETIC_DOMAINS[name]
        layout = LAYOUTS["cityscapes"]
        files = _cityscapes(domain_root, cfg.split, layout, with_depth=True)
        encoding = train_id_encoding(num_classes)
        root = domain_root
    else:
        if name not in LAYOUTS:
            raise DataError(name, f"unknown dataset name; expected one of "
                                  f"{sorted([*LAYOUTS, *SYNTHETIC_DOMAINS])}")
        layout = LAYOUTS[name].format(split=cfg.split or "<split>", image_dir=cfg.image_dir,
                                      label_dir=cfg.label_dir, image_suffix=cfg.image_suffix,
                                      label_suffix=cfg.label_suffix)
        if not root.is_dir():
            raise LayoutError(root, f"dataset root of {name!r} not found", layout)
        if name == "gta":
            files, encoding = _gta(root, cfg.split, layout), cityscapes_id_encoding()
        elif name == "synthia":
            files, encoding = _synthia(root, cfg.split, layout), synthia_encoding()
        elif name == "cityscapes":
            files, encoding = _cityscapes(root, cfg.split, layout), cityscapes_id_encoding()
        elif name == "dark_zurich":
            files = _dark_zurich(root, cfg.split, layout, day)
            encoding = train_id_encoding(num_classes)
        else:
            files = _folder(cfg, root, layout)
            encoding = (map_encoding(cfg.label_map, num_classes) if cfg.label_map
                        else train_id_encoding(num_classes))
    if not files:
        raise LayoutError(root, f"no images of {name!r} (split {cfg.split!r}) found", layout)
    label_root = root
    files = _check_labels(files, name, on_error, layout, label_root)
    return SegDataset(name, root, cfg.split, files, encoding, num_classes, on_error, layout)
