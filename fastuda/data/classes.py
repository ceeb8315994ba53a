"""The 19 Cityscapes train-id classes and the label-id maps of the supported datasets.

Every dataset in fastuda is read into this label space: train ids 0..18, 255 = ignore.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# The Cityscapes colour of each train id (used for visualisations and GTA-style palettes).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# Cityscapes label id -> train id; every id not listed maps to 255.
CITYSCAPES_ID_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
# Cityscapes label ids run 0..33 (-1, license plate, is never written to the label PNGs).
CITYSCAPES_MAX_ID = 33

# SYNTHIA (RAND-CITYSCAPES) class id (red channel of the 16-bit GT) -> train id.
SYNTHIA_ID_TO_TRAIN: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15,
    12: 17, 11: 18,
}
# SYNTHIA class ids run 0 (void) .. 22 (lane marking).
SYNTHIA_MAX_ID = 22

# Train ids of the 16 SYNTHIA classes, and the 13 without wall, fence and pole.
SYNTHIA16: tuple[int, ...] = tuple(sorted(SYNTHIA_ID_TO_TRAIN.values()))
SYNTHIA13: tuple[int, ...] = tuple(i for i in SYNTHIA16 if i not in (3, 4, 5))


def lookup_table(id_to_train: dict[int, int]) -> np.ndarray:
    """A 256-entry uint8 table mapping raw label values to train ids (255 where unmapped)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for raw, train in id_to_train.items():
        lut[int(raw)] = train
    return lut
