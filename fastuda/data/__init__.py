"""Datasets, the synthetic domain pair, transforms, sampling and the two loaders (see spec/data.md).

Public entry points: `build_dataset`, `ensure_synthetic`, `build_train_iterators`,
`build_val_loader`, `strong_augment`, `class_balanced_crop`.
"""

from fastuda.data.augment import class_balanced_crop, strong_augment
from fastuda.data.classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAIN,
    IGNORE_INDEX,
    PALETTE,
    SYNTHIA13,
    SYNTHIA16,
    SYNTHIA_ID_TO_TRAIN,
)
from fastuda.data.datasets import LayoutError, SegDataset, build_dataset
from fastuda.data.io import DataError
from fastuda.data.loaders import (
    TrainIterator,
    ValLoader,
    build_train_iterators,
    build_val_loader,
    resolve_loader,
)
from fastuda.data.synthetic import ensure_synthetic

__all__ = [
    "CITYSCAPES_CLASSES", "CITYSCAPES_ID_TO_TRAIN", "IGNORE_INDEX", "PALETTE", "SYNTHIA13",
    "SYNTHIA16", "SYNTHIA_ID_TO_TRAIN", "DataError", "LayoutError", "SegDataset", "TrainIterator",
    "ValLoader", "build_dataset", "build_train_iterators", "build_val_loader",
    "class_balanced_crop", "ensure_synthetic", "resolve_loader", "strong_augment",
]
