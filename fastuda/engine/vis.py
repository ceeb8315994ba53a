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


def overlay(image: np.ndarray, colours: np.ndarray, opacity: float) -> np.ndarray:
    """[H, W, 3] uint8 image blended with [H, W, 3] uint8 class colours at ``opacity``."""
    mixed = (1 - opacity) * image.astype(np.float32) + opacity * colours.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def save_confusion_png(matrix: Tensor, class_names: Sequence[str], path: str | Path,
                       cell: int = 26) -> None:
    """Heat map of a row-normalised confusion matrix [C, C] (values in [0, 1], NaN rows for
    classes without labelled pixels drawn grey): ground truth down the left, predictions along
    the top, each cell's percentage written in it."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    n = matrix.shape[0]
    values = matrix.double().cpu().numpy()
    label_w = max(int(font.getlength(name)) for name in class_names) + 10
    left, top = label_w + 18, label_w + 18  # the two axis titles take 18 pixels
    canvas = Image.new("RGB", (left + n * cell + 4, top + n * cell + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(n):
        for c in range(n):
            v = values[r, c]
            x, y = left + c * cell, top + r * cell
            if np.isnan(v):
                fill, ink = (200, 200, 200), (90, 90, 90)
            else:  # white (0) to dark blue (1)
                fill = tuple(int(round(255 + (t - 255) * v)) for t in (8, 48, 107))
                ink = (255, 255, 255) if v > 0.5 else (0, 0, 0)
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fill, outline=(230, 230, 230))
            if not np.isnan(v) and round(100 * v) > 0:
                draw.text((x + cell / 2, y + cell / 2), f"{100 * v:.0f}", fill=ink, font=font,
                          anchor="mm")
    for i, name in enumerate(class_names):  # row labels; column labels drawn rotated
        draw.text((left - 4, top + i * cell + cell / 2), name, fill="black", font=font,
                  anchor="rm")
        strip = Image.new("RGB", (label_w, cell), "white")
        ImageDraw.Draw(strip).text((4, cell / 2), name, fill="black", font=font, anchor="lm")
        canvas.paste(strip.rotate(90, expand=True), (left + i * cell, top - label_w))
    title = Image.new("RGB", (n * cell, 16), "white")  # the row axis title, drawn rotated
    ImageDraw.Draw(title).text((n * cell / 2, 8), "ground truth", fill="black", font=font,
                               anchor="mm")
    canvas.paste(title.rotate(90, expand=True), (0, top))
    draw.text((left + n * cell / 2, 2), "prediction (% of each ground-truth row)", fill="black",
              font=font, anchor="mt")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
