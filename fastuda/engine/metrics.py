"""Segmentation metrics accumulated over a whole split (not averaged per image).

IoU_c = TP / (TP + FP + FN) with totals over the split; a class that never occurs in the ground
truth nor in the predictions has no IoU (NaN) and is left out of the mean, as in cityscapesscripts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred`` and ``target`` of equal shape with class ids; ignored targets are skipped."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape "
                             f"{tuple(target.shape)}")
        t = target.reshape(-1).long().cpu()
        p = pred.reshape(-1).long().cpu()
        keep = t != self.ignore_index
        t, p = t[keep], p[keep]
        if t.numel() and (int(t.max()) >= self.num_classes or int(t.min()) < 0):
            raise ValueError(f"label value {int(t.max())} outside [0, {self.num_classes})")
        n = self.num_classes
        self.matrix += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def iou(self) -> Tensor:
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))

    def miou(self, classes: Sequence[int] | None = None) -> float:
        iou = self.iou()
        if classes is not None:
            iou = iou[list(classes)]
        valid = ~torch.isnan(iou)
        return float(iou[valid].mean()) if bool(valid.any()) else math.nan

    def summary(self, class_names: Sequence[str], extra_subsets: dict[str, Sequence[int]] | None
                = None) -> dict[str, object]:
        """The evaluation record: mIoU in percent, per-class IoU by name, optional subset means."""
        iou = self.iou()
        out: dict[str, object] = {
            "mIoU": round(100 * self.miou(), 4),
            "IoU": {name: (None if math.isnan(v) else round(100 * v, 4))
                    for name, v in zip(class_names, iou.tolist(), strict=True)},
        }
        for key, subset in (extra_subsets or {}).items():
            out[key] = round(100 * self.miou(subset), 4)
        return out


def format_table(record: dict[str, object]) -> str:
    """Per-class IoU table a person reads."""
    ious = record["IoU"]
    assert isinstance(ious, dict)
    width = max(len(k) for k in ious) if ious else 5
    lines = [f"{'class':<{width}}  IoU"]
    for name, v in ious.items():
        lines.append(f"{name:<{width}}  {'  n/a' if v is None else f'{v:5.2f}'}")
    for key in (k for k in record if k.startswith("mIoU")):
        lines.append(f"{key:<{width}}  {record[key]:5.2f}")
    return "\n".join(lines)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, NaN where den is 0 (a class with no pixels has no value, not 0)."""
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))


def class_table(conf: ConfusionMatrix, class_names: Sequence[str]) -> list[dict[str, object]]:
    """One row per class: IoU, precision, recall (percent) and the class's share of the labelled
    pixels and of the predicted pixels (percent); None where a value is undefined.

    Rows of the matrix are ground truth, columns predictions: precision_c = TP / (column sum),
    recall_c = TP / (row sum), IoU_c = TP / (row + column - TP).
    """
    m = conf.matrix.double()
    tp, gt, pred = m.diag(), m.sum(1), m.sum(0)
    total = m.sum()
    cols = {"IoU": conf.iou(), "precision": _ratio(tp, pred), "recall": _ratio(tp, gt),
            "pixel_share": _ratio(gt, total.expand_as(gt)),
            "predicted_share": _ratio(pred, total.expand_as(pred))}
    rows = []
    for c, name in enumerate(class_names):
        row: dict[str, object] = {"class": name}
        for key, values in cols.items():
            v = float(values[c])
            row[key] = None if math.isnan(v) else round(100 * v, 4)
        rows.append(row)
    return rows


def row_normalised(conf: ConfusionMatrix) -> Tensor:
    """Each ground-truth row divided by its sum (where a pixel of class r went); a class
    without labelled pixels is a row of NaN."""
    m = conf.matrix.double()
    return _ratio(m, m.sum(1, keepdim=True).expand_as(m))


def confusion_record(conf: ConfusionMatrix, class_names: Sequence[str]) -> dict[str, object]:
    """The JSON form: class names, raw pixel counts (rows ground truth, columns prediction) and
    the row-normalised matrix (null for a class without labelled pixels)."""
    norm = row_normalised(conf).tolist()
    return {"classes": list(class_names), "rows": "ground truth", "columns": "prediction",
            "ignore_index": conf.ignore_index, "counts": conf.matrix.tolist(),
            "row_normalised": [[None if math.isnan(v) else round(v, 6) for v in row]
                               for row in norm]}


def format_class_table(rows: list[dict[str, object]]) -> str:
    """The per-class table as Markdown."""
    keys = ("IoU", "precision", "recall", "pixel_share", "predicted_share")
    heads = ("IoU", "precision", "recall", "pixel share", "predicted share")
    lines = ["| class | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(keys)]
    for row in rows:
        cells = ["n/a" if row[k] is None else f"{row[k]:.2f}" for k in keys]
        lines.append(f"| {row['class']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
