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
