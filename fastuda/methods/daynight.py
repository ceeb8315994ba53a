"""SePiCo's Cityscapes->Dark Zurich day/night rules (BIT-DA/SePiCo, the ``sepico_dark`` variant).

What is here (the parts of the variant that are pure functions of tensors):
- ``released_class_weight``: the class weights of the variant, ``(mean(log f) - log f) /
  std(log f) * s + 1`` from fixed Cityscapes class frequencies f (torch.std: unbiased), with
  s = 0.05 for the seg-loss and pseudo-label weights (experiments.py#L487-L493) and 0.16 at test
  time (mmseg/models/segmentors/encoder_decoder_projector.py#L304-L308);
- ``mix_day_night_probs``: the DANNet rule that fuses the teacher's softmax on the paired day
  image with its softmax on the night image: for the shift-insensitive classes (road, sidewalk,
  building, wall, fence; vegetation, terrain, sky: channel ranges [0, 5) and [8, 11),
  experiments.py#L257) the day probability counts ``day_ratio`` (0.8, #L259) where it is above
  0.4 and ``1 - day_ratio`` elsewhere; every other class takes the night probability only; the
  fused map is then multiplied by the class weights (sepico_dark.py#L232-L243). Pseudo-labels
  are the argmax of the fused map, the confidence its max (#L335-L338);
- ``reweight_test_probs``: the test-time re-weighting: the softmax of the test logits times the
  test class weights, then argmax (encoder_decoder_projector.py#L301-L330).

Not wired into the loop yet (issue 13; see docs/recipes.md section 2b).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Cityscapes class frequencies the release hard-codes, in train-id order
# (BIT-DA/SePiCo experiments.py#L487-L490, the same list at #L533-L536 and
# mmseg/models/segmentors/encoder_decoder_projector.py#L304-L307)
RELEASED_FREQUENCIES: tuple[float, ...] = (
    0.36869696, 0.06084986, 0.22824049, 0.00655399, 0.00877272, 0.01227341, 0.00207795,
    0.0055127, 0.15928651, 0.01157818, 0.04018982, 0.01218957, 0.00135122, 0.06994545,
    0.00267456, 0.00235192, 0.00232904, 0.00098658, 0.00413907)
TRAIN_CLASS_WEIGHT_STD = 0.05  # experiments.py#L491 ("0.16 for test")
TEST_CLASS_WEIGHT_STD = 0.16  # encoder_decoder_projector.py#L308
SHIFT_INSENSITIVE_CLASSES: tuple[tuple[int, int], ...] = ((0, 5), (8, 11))  # experiments.py#L257
DAY_RATIO = 0.8  # experiments.py#L259
DAY_CONFIDENCE = 0.4  # sepico_dark.py#L236


def released_class_weight(frequencies: tuple[float, ...] | list[float] = RELEASED_FREQUENCIES,
                          std: float = TRAIN_CLASS_WEIGHT_STD) -> Tensor:
    """``(mean(log f) - log f) / std(log f) * std + 1`` (float32 [C]): rarer classes weigh more."""
    logf = torch.log(torch.tensor(frequencies, dtype=torch.float32))
    return (logf.mean() - logf) / logf.std() * std + 1.0


def mix_day_night_probs(day: Tensor, night: Tensor,
                        classes: tuple[tuple[int, int], ...] = SHIFT_INSENSITIVE_CLASSES,
                        day_ratio: float = DAY_RATIO, day_confidence: float = DAY_CONFIDENCE,
                        class_weight: Tensor | None = None) -> Tensor:
    """Fuse day and night softmax maps [B, C, H, W] into the (class-weighted) map the
    pseudo-labels are taken from. ``classes``: half-open channel ranges [start, stop)."""
    mix = torch.zeros_like(night)
    for start, stop in classes:
        d = day[:, start:stop]
        mix[:, start:stop] = torch.where(d > day_confidence, day_ratio, 1.0 - day_ratio)
    fused = mix * day + (1.0 - mix) * night
    if class_weight is not None:
        fused = fused * class_weight.to(fused)[None, :, None, None]
    return fused


def reweight_test_probs(logits: Tensor, class_weight: Tensor) -> Tensor:
    """The test-time class re-weighting: softmax over classes, times the weights [C]."""
    return torch.softmax(logits.float(), dim=1) * class_weight.to(logits.device)[None, :, None,
                                                                                  None]


__all__ = ["DAY_CONFIDENCE", "DAY_RATIO", "RELEASED_FREQUENCIES", "SHIFT_INSENSITIVE_CLASSES",
           "TEST_CLASS_WEIGHT_STD", "TRAIN_CLASS_WEIGHT_STD", "mix_day_night_probs",
           "released_class_weight", "reweight_test_probs"]
