"""PNG grids for a person to look at: image | ground truth | pseudo-label | prediction per row."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def colorize(label: Tensor, palette: Sequence[Sequence[int]], ignore_index: int = 255
             ) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8 (ignored pixels black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    lut[ignore_index] = 0
    return lut[label.cpu().numpy().astype(np.uint8)]


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, H, W] normalised float -> [H, W, 3] uint8."""
    m = torch.tensor(mean, device=image.device)[:, None, None]
    s = torch.tensor(std, device=image.device)[:, None, None]
    return (image.float() * s + m).clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()


def save_grid(path: str | Path, rows: list[list[np.ndarray]]) -> None:
    """Each row a list of equally sized [H, W, 3] uint8 panels."""
    if not rows:
        return
    h, w = rows[0][0].shape[:2]
    pad = 2
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad), ncol * (w + pad), 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            canvas[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = panel[:h, :w]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
