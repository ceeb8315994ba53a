"""CLUDA: supervised pixel-to-pixel contrast inside the student-teacher loop.

The decoder's fused multi-level feature map (``"features"``: DAFormer's 256-channel fusion) is
L2-normalised and resized to a small grid (published 65x65, bilinear; labels nearest). Every valid
pixel of the grid is an anchor of ``ops.pixel_contrast`` (positives: the other pixels of its class
in the batch, negatives: the pixels of other classes; never an N x N matrix in memory), once on
the source batch with its ground truth and once on the mixed batch with the mixed labels, where
the pair weights are the outer product of the mixed pseudo-weights. The two losses count half
each. Features, labels and weights are flattened batch-major together (the op reads [B, D, h, w]
and [B, h, w]); ignore pixels are neither positives nor negatives.

Not here: the multi-resolution (HRDA) setting with its learned scale-attention weighting
(pairs a_i a_j between context pixels, 1 - a_i a_j between context and detail pixels); see
methods.md. In single-resolution training there is no scale attention to weight pairs with.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..config import MethodConfig
from .base import Losses, Method, Outputs


def to_grid(feats: Tensor, labels: Tensor, weights: Tensor | None, grid: tuple[int, int]
            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Unit-norm features resized to ``grid`` (bilinear), labels and weights (nearest)."""
    f = F.interpolate(F.normalize(feats.float(), dim=1), size=grid, mode="bilinear",
                      align_corners=False)
    lbl = F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0].long()
    w = None if weights is None else F.interpolate(weights[:, None].float(), size=grid,
                                                   mode="nearest")[:, 0]
    return f, lbl, w


class CLUDA(Method):
    name = "cluda"

    def __init__(self, cfg: MethodConfig, *, num_classes: int, backend: str = "auto",
                 ignore_index: int = 255) -> None:
        super().__init__()
        self.cfg, self.num_classes, self.backend = cfg, num_classes, backend
        self.ignore_index = ignore_index
        self.grid = (int(cfg.cluda_grid[0]), int(cfg.cluda_grid[1]))

    def contrast(self, feats: Tensor, labels: Tensor, pair_weights: Tensor | None = None
                 ) -> Tensor:
        """pixel_contrast of ``feats`` [B, D, h, w] with full-resolution ``labels`` [B, H, W]
        (and per-pixel pair weights [B, H, W]) on the configured grid."""
        f, lbl, w = to_grid(feats, labels, pair_weights, self.grid)
        return ops.pixel_contrast(f, lbl, tau=self.cfg.cluda_tau, pair_weights=w,
                                  ignore_index=self.ignore_index, backend=self.backend)

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        if self.cfg.cluda_weight == 0:
            return {}
        return {"src.contrast": 0.5 * self.cfg.cluda_weight * self.contrast(out["features"],
                                                                             label)}

    def mixed_losses(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                     it: int) -> Losses:
        if self.cfg.cluda_weight == 0:
            return {}
        loss = self.contrast(out["features"], mixed_label, mixed_weight)
        return {"mix.contrast": 0.5 * self.cfg.cluda_weight * loss}


__all__ = ["CLUDA", "to_grid"]
