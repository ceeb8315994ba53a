"""MIC: masked image consistency (Hoyer et al., CVPR 2023), as a plug-in of the self-training loop.

Each step MIC adds one student pass, ``masked``: the target image, colour-augmented afresh
(the loop's strong augmentation: jitter and blur, no mixing), with random square blocks set to
0 (the normalised mean colour) goes through the student, and the prediction is trained with the
weighted CE against the EMA teacher's pseudo-labels of the unmasked image and their quality
weight: the very pseudo-labels and weights the mixed pass uses. With HRDA the pass is HRDA's
training forward, so the loss carries HRDA's detail term too, as in the release.

The mask (``block_mask``): rand(B, 1, round(H/b), round(W/b)) > ratio, upsampled (nearest) to
H x W: each block of b x b pixels is kept with probability 1 - ratio. The numbers are drawn from
the step's generator, after the pass's augmentation, so a resumed run masks exactly as the
uninterrupted one.

Released code (github.com/lhoyer/MIC, seg/):
- mmseg/models/uda/masking_consistency_module.py: mask_mode "separatetrgaug" (target image,
  strong_transform with mix None, then mask_image), shared pseudo-labels and weights
  (mask_alpha = mask_pseudo_threshold = "same"), loss scaled by mask_lambda;
- mmseg/models/utils/masking_transforms.py: BlockMaskGenerator (the mask above; mmseg's resize
  defaults to nearest);
- mmseg/models/uda/dacs.py: the masked loss's backward comes after the mixed one;
- experiments.py: mask_ratio 0.7, mask_lambda 1, block size 64 with HRDA (full resolution,
  exp 80/81) and 32 without (half-resolution DAFormer setting, exp 81).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import Config, ConfigError, _check
from ..engine.context import MethodContext, Pass, StepView
from .base import Losses, Method, Outputs


@dataclass
class MICSettings:
    """``[mic]``; defaults are the released settings for MIC(HRDA) (experiments.py)."""

    weight: float = 1.0  # mask_lambda
    mask_ratio: float = 0.7  # share of the blocks masked
    block_size: int = 64  # pixels; the release uses 32 for the half-resolution DAFormer setting
    augment: bool = True  # colour-augment the target before masking ("separatetrgaug")

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "mic.weight", self.weight, ">= 0")
        _check(0 <= self.mask_ratio < 1, "mic.mask_ratio", self.mask_ratio, "in [0, 1)")
        _check(self.block_size >= 1, "mic.block_size", self.block_size, ">= 1 (pixels)")


@torch.no_grad()
def block_mask(batch: int, height: int, width: int, *, block_size: int, ratio: float,
               generator: torch.Generator) -> Tensor:
    """[B, 1, H, W] float mask, 1 = kept: rand(B, 1, round(H/b), round(W/b)) > ratio upsampled
    (nearest) to H x W; the random numbers come from ``generator`` (CPU)."""
    cells = (batch, 1, max(round(height / block_size), 1), max(round(width / block_size), 1))
    keep = (torch.rand(cells, generator=generator) > ratio).float()
    return F.interpolate(keep, size=(height, width), mode="nearest")


class MIC(Method):
    name = "mic"
    Settings = MICSettings
    needs_self_training = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        crop = min(cfg.data.crop_size)
        if cfg.settings("mic").block_size > crop:
            raise ConfigError(f"invalid value for mic.block_size: "
                              f"{cfg.settings('mic').block_size} (expected <= the training "
                              f"crop's side, data.crop_size = {cfg.data.crop_size})")

    def __init__(self, settings: MICSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)

    def masked_images(self, view: StepView) -> Tensor:
        """The pass's input: the (augmented) target image times a block mask."""
        images = view.target_image
        if self.settings.augment:
            images = self.ctx.augment(images)
        B, _, H, W = images.shape
        mask = block_mask(B, H, W, block_size=self.settings.block_size,
                          ratio=self.settings.mask_ratio, generator=self.ctx.generator)
        return images * mask.to(images.device, images.dtype)

    def masked_losses(self, out: Outputs, view: StepView) -> Losses:
        """The loop's weighted CE against the pseudo-labels of the unmasked target, times
        ``weight``."""
        losses = self.ctx.segmentation_loss("masked", out, view.pseudo_label, view.pseudo_weight)
        return {k: self.settings.weight * v for k, v in losses.items()}

    def extra_passes(self, it: int) -> list[Pass]:
        if self.settings.weight == 0:
            return []
        return [Pass("masked", self.masked_images, self.masked_losses)]


__all__ = ["MIC", "MICSettings", "block_mask"]
