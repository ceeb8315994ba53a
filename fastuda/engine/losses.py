"""The segmentation loss of every pass: pixel-wise cross-entropy with a pixel weight, plus HRDA's
detail term when the outputs carry a detail box (docs/architecture.md, "Losses")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..data.classes import IGNORE_INDEX
from ..models import outputs as O
from ..models.hrda import crop_to_box


def weighted_ce(logits: Tensor, label: Tensor, weight: Tensor | None = None,
                average: str = "valid", class_weight: Tensor | None = None) -> Tensor:
    """Pixel-wise CE (ignore 255) times the pixel weight, averaged over all pixels (DACS).

    Without a weight, ``average`` says over what: ``"valid"``, the labelled pixels (PyTorch's
    ``ignore_index`` mean), or ``"all"``, every pixel, the ignored ones adding 0 (the releases'
    mmseg v0.16 loss: ``F.cross_entropy(reduction='none')`` then a plain mean, SePiCo
    mmseg/models/losses/cross_entropy_loss.py#L21-L32, utils.py#L68-L69).

    ``class_weight`` [C] multiplies each pixel's CE by its label's weight, as mmseg's
    ``F.cross_entropy(weight=class_weight, reduction='none')`` then the mean above (not PyTorch's
    mean normalised by the weights): SePiCo's Dark Zurich variant (fastuda/methods/daynight.py)."""
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear",
                           align_corners=False)
    if weight is None and average == "valid" and class_weight is None:
        return F.cross_entropy(logits, label.long(), ignore_index=IGNORE_INDEX)
    cw = None if class_weight is None else class_weight.to(logits)
    ce = F.cross_entropy(logits, label.long(), weight=cw, ignore_index=IGNORE_INDEX,
                         reduction="none")
    if weight is not None:
        return (ce * weight).mean()
    if average == "valid":  # over the labelled pixels, each counting its class weight
        return ce.sum() / (label != IGNORE_INDEX).sum().clamp_min(1)
    return ce.mean()


def segmentation_losses(prefix: str, out: dict[str, Tensor], label: Tensor,
                        weight: Tensor | None = None, *, detail_weight: float = 0.0,
                        average: str = "valid", class_weight: Tensor | None = None
                        ) -> dict[str, Tensor]:
    """``{prefix}.ce``: weighted CE of the logits; with HRDA outputs (a detail box) that counts
    1 - detail_weight, and ``{prefix}.ce_detail`` is detail_weight x weighted CE of the detail
    logits on the label (and weight) cropped to the box (each image's own with one box per
    image), averaged over the boxes' pixels (the
    released HRDAHead.losses: loss_seg * (1 - hr_loss_weight), hr.loss_seg * hr_loss_weight).
    ``average``: the unweighted CE's mean, ``class_weight``: per-class factors
    (:func:`weighted_ce`)."""
    ce = weighted_ce(out[O.LOGITS], label, weight, average, class_weight)
    if O.DETAIL_BOX in out:
        ce = (1.0 - detail_weight) * ce
    losses = {f"{prefix}.ce": ce}
    if O.DETAIL_BOX in out and detail_weight > 0:
        box = out[O.DETAIL_BOX]  # one box for the batch, or one per image
        w = None if weight is None else crop_to_box(weight, box)
        losses[f"{prefix}.ce_detail"] = detail_weight * weighted_ce(
            out[O.LOGITS_DETAIL], crop_to_box(label, box), w, average, class_weight)
    return losses


__all__ = ["segmentation_losses", "weighted_ce"]
