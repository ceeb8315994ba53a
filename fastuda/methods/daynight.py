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
- ``eval_class_weight``: the test-time re-weighting's weights (std 0.16): evaluation and
  prediction multiply the softmax of the test logits by them, then argmax
  (encoder_decoder_projector.py#L301-L330; ``fastuda.evaluate.predict(..., class_weight)``).

The plug-in ``DayNight`` (``methods = ["sepico", "daynight"]``, section ``[daynight]``) runs
them in the loop as released (mmseg/models/uda/sepico_dark.py#L315-L360): the target batches
carry each night image's day partner (``batch_keys = ("day",)``, fastuda/data/day.py); at every
pseudo-labelling (the class-balanced crop's choice on the whole image, then the regenerated
labels on the crop) the teacher also sees the day image, cropped with the night crop's box, and
the pseudo-labels, their confidence and the quality weight come from the fused, class-weighted
map (``fuse_pseudo_probs``); the loop's segmentation CE of every pass is class-weighted
(``MethodContext.ce_class_weight``; the release sets the decode head's
``loss_decode.class_weight``,
experiments.py#L134-L138); ``[daynight] test_reweight`` (default true, as released) turns the
test-time re-weighting on in ``fastuda.evaluate`` and ``fastuda.predict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import Config, _check
from ..engine.context import MethodContext, StepView
from .base import Method

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


@dataclass
class DayNightSettings:
    """``[daynight]``; the defaults are the released values (BIT-DA/SePiCo experiments.py)."""

    day_ratio: float = DAY_RATIO  # #L259
    day_confidence: float = DAY_CONFIDENCE  # sepico_dark.py#L236
    # half-open train-id ranges [start, stop) whose day prediction is trusted (#L257)
    shift_insensitive_classes: list[list[int]] = field(
        default_factory=lambda: [list(r) for r in SHIFT_INSENSITIVE_CLASSES])
    frequencies: list[float] = field(default_factory=lambda: list(RELEASED_FREQUENCIES))
    class_weight_std: float = TRAIN_CLASS_WEIGHT_STD  # #L491
    ce_class_weight: bool = True  # the decode head's CE class weight (#L135-L137)
    pseudo_class_weight: bool = True  # the fused map's class weight (#L138, sepico_dark #L239)
    # evaluation and prediction: the softmax times the weights of std 0.16 before the argmax
    # (encoder_decoder_projector.py#L301-L330); false: the plain argmax
    test_reweight: bool = True
    test_class_weight_std: float = TEST_CLASS_WEIGHT_STD

    def __post_init__(self) -> None:
        _check(0.0 <= self.day_ratio <= 1.0, "daynight.day_ratio", self.day_ratio, "in [0, 1]")
        _check(0.0 <= self.day_confidence <= 1.0, "daynight.day_confidence",
               self.day_confidence, "in [0, 1]")
        for r in self.shift_insensitive_classes:
            _check(isinstance(r, list) and len(r) == 2 and 0 <= r[0] < r[1],
                   "daynight.shift_insensitive_classes", self.shift_insensitive_classes,
                   "[[start, stop], ...] with 0 <= start < stop")
        _check(len(self.frequencies) > 1 and all(f > 0 for f in self.frequencies),
               "daynight.frequencies", self.frequencies, "two or more values > 0")
        _check(self.class_weight_std >= 0, "daynight.class_weight_std", self.class_weight_std,
               ">= 0")
        _check(self.test_class_weight_std >= 0, "daynight.test_class_weight_std",
               self.test_class_weight_std, ">= 0")


def eval_class_weight(cfg: Config) -> Tensor | None:
    """The test-time class weights of a run (evaluation, prediction): those of
    ``[daynight]`` when the run uses the method with ``test_reweight``, else None."""
    if "daynight" not in cfg.methods:
        return None
    s: DayNightSettings = cfg.settings("daynight")
    if not s.test_reweight:
        return None
    return released_class_weight(s.frequencies, s.test_class_weight_std)


class DayNight(Method):
    """SePiCo's Cityscapes->Dark Zurich variant: day/night pseudo-label fusion, class weights."""

    name = "daynight"
    Settings = DayNightSettings
    needs_self_training = True
    batch_keys = ("day",)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        s: DayNightSettings = cfg.settings(cls.name)
        n = cfg.model.num_classes
        _check(len(s.frequencies) == n, "daynight.frequencies", f"{len(s.frequencies)} values",
               f"one per class (model.num_classes = {n})")
        for r in s.shift_insensitive_classes:
            _check(r[1] <= n, "daynight.shift_insensitive_classes",
                   s.shift_insensitive_classes, f"ranges within the {n} classes")
        if cfg.self_training.class_balanced_crop:
            _check(cfg.self_training.class_balanced_crop_regen,
                   "self_training.class_balanced_crop_regen", False,
                   "true with methods ['daynight'] (the day crop is labelled on the crop)")

    def __init__(self, settings: DayNightSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.classes = tuple((int(a), int(b)) for a, b in settings.shift_insensitive_classes)
        weight = released_class_weight(settings.frequencies, settings.class_weight_std)
        self.register_buffer("class_weight", weight, persistent=False)
        if settings.ce_class_weight:
            if ctx.ce_class_weight is not None:
                raise ValueError("two methods set the segmentation CE's class weights")
            ctx.ce_class_weight = weight

    def fuse_pseudo_probs(self, prob: Tensor, view: StepView,
                          boxes: list[tuple[int, int]] | None,
                          teacher_probs: Callable[[Tensor], Tensor]) -> Tensor:
        day = view.target["day"].to(prob.device, non_blocking=True)
        h, w = prob.shape[-2:]
        if boxes is not None:  # the night crop's window (sepico_dark.py#L246-L271)
            day = torch.stack([d[:, t:t + h, x:x + w] for d, (t, x) in
                               zip(day, boxes, strict=True)])
        if day.shape[-2:] != (h, w):
            raise ValueError(f"day images {tuple(day.shape[-2:])} do not match the target "
                             f"images {(h, w)}")
        s = self.settings
        return mix_day_night_probs(teacher_probs(day), prob, self.classes, s.day_ratio,
                                   s.day_confidence,
                                   self.class_weight if s.pseudo_class_weight else None)


__all__ = ["DAY_CONFIDENCE", "DAY_RATIO", "RELEASED_FREQUENCIES", "SHIFT_INSENSITIVE_CLASSES",
           "TEST_CLASS_WEIGHT_STD", "TRAIN_CLASS_WEIGHT_STD", "DayNight", "DayNightSettings",
           "mix_day_night_probs", "released_class_weight", "eval_class_weight"]
