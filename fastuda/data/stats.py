"""Per-image class pixel counts (the input of rare class sampling), stored as JSON beside the data.

Format of ``<dataset root>/class_stats_<split>.json``::

    {"format": "fastuda-class-stats-1", "num_classes": 19, "class_names": [...],
     "images": {"<image path relative to the root>": {"size": [h, w], "counts": [n_0, ..., n_18]}}}

Counts are at the label's own resolution; 255 (ignore) is not counted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastuda.data.classes import CITYSCAPES_CLASSES
from fastuda.data.io import DataError

if TYPE_CHECKING:
    from fastuda.data.datasets import SegDataset

FORMAT = "fastuda-class-stats-1"


def class_counts(label: np.ndarray, num_classes: int) -> list[int]:
    """Pixels of each train id 0..num_classes-1 in a uint8 label map."""
    return np.bincount(label.ravel(), minlength=256)[:num_classes].astype(int).tolist()


def read_class_stats(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "class statistics not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"unreadable class statistics: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "images" not in data:
        raise DataError(path, f"not a fastuda class statistics file (format {FORMAT!r})")
    return data


def write_class_stats(path: str | Path, images: dict[str, dict[str, Any]],
                      num_classes: int) -> None:
    """Write the statistics atomically (a reader never sees half a file)."""
    path = Path(path)
    data = {"format": FORMAT, "num_classes": num_classes,
            "class_names": list(CITYSCAPES_CLASSES[:num_classes]),
            "images": dict(sorted(images.items()))}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


def prepare_hint(name: str, root: str | Path) -> str:
    """The command that writes the class statistics of dataset ``name`` (a command that exists:
    the synthetic domains share `prepare synthetic`; "folder" datasets have no prepare step)."""
    if name.startswith("synthetic_"):
        return f"run `python -m fastuda.prepare synthetic {root}` first"
    if name == "folder":
        return ("`python -m fastuda.prepare` does not handle 'folder' datasets: set "
                "data.rcs = false")
    return f"run `python -m fastuda.prepare {name} {root}` first"


def count_matrix(dataset: SegDataset) -> tuple[np.ndarray, np.ndarray]:
    """(counts int64 [N, C], areas int64 [N]) aligned with ``dataset.files``, from its stats file.

    Raises DataError telling the user to run prepare when the file is missing or incomplete.
    """
    hint = prepare_hint(dataset.name, dataset.root)
    path = dataset.stats_path
    if not path.is_file():
        raise DataError(path, f"per-image class pixel counts (needed by rare class sampling) not "
                              f"found; {hint}")
    data = read_class_stats(path)
    images = data["images"]
    counts = np.zeros((len(dataset), dataset.num_classes), dtype=np.int64)
    areas = np.zeros(len(dataset), dtype=np.int64)
    for i in range(len(dataset)):
        entry = images.get(dataset.relpath(i))
        if entry is None:
            if dataset.on_error == "skip":  # prepare left a bad file out: never drawn by RCS
                continue
            raise DataError(path, f"has no entry for {dataset.relpath(i)}; {hint}")
        c = entry["counts"][: dataset.num_classes]
        counts[i, : len(c)] = c
        areas[i] = int(entry["size"][0]) * int(entry["size"][1])
    return counts, areas
