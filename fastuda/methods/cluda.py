"""CLUDA: supervised pixel-to-pixel contrast inside the student-teacher loop.

The decoder's fused multi-level feature map (``"features"``: DAFormer's 256-channel fusion) is
L2-normalised and resized to a small grid (published 65x65, bilinear; labels nearest). Every valid
pixel of the grid is an anchor of ``ops.pixel_contrast`` (positives: the other pixels of its class
in the batch, negatives: the pixels of other classes; never an N x N matrix in memory), once on
the source batch with its ground truth and once on the mixed batch with the mixed labels, where
the pair weights are the outer product of the mixed pseudo-weights. The two losses count half
each. Features, labels and weights are flattened batch-major together (the op reads [B, D, h, w]
and [B, h, w]); ignore pixels are neither positives nor negatives.

Multi-resolution (HRDA, ``hrda.enabled``): the learned weighting of CLUDA, "an extra 1-channel
head with sigmoid output a_i". It is CLUDA's own head (``SigmoidMapHead``: 3x3 conv-BN-ReLU with
``cluda.head_channels`` hidden channels, 1x1 conv to one channel, sigmoid), a submodule of this
method (a loss-only head, see docs/architecture.md: the loop trains it with the student at the
head learning rate and checkpoints it with the method's state_dict). It is not HRDA's scale
attention: that one fuses the two predictions and learns from the segmentation loss; pair
weights taken from it would let the contrast push the fusion attention towards 0/1 against the
CE. The contrast never reads the fusion attention. The pixels are the context features on the
grid (labels of the whole crop, nearest) and the detail features on the same grid (labels cropped
to the detail box); a_i is the head on the features of the pixel's own view (``"features"`` for
context pixels, ``"features_detail"`` for detail pixels, each at its native resolution, then
bilinear to the grid), so the contrast loss trains the head (and, through it, the features)
via the pair weights. The head's BatchNorm normalises each view's batch separately; its
parameters are outside DDP's module, so the loop averages their gradients over the ranks.
Pair weights:
    w_ip = a_i a_p        both pixels of the same view (context/context, and detail/detail,
                          which CLUDA does not specify: we weight it like context/context)
    w_ip = 1 - a_i a_p    one context and one detail pixel,
times q_i q_p on the mixed batch (q: mixed pseudo-weights). ``ops.pixel_contrast`` only takes
w_ip = u_i u_p, but its loss is linear in w at fixed anchors and positives (neither depends on the
weights), and with r_i = +1 for context and -1 for detail pixels
    W = (q r a)(q r a)^T + 1/2 q q^T - 1/2 (q r)(q r)^T
exactly (same view: r_i r_p = 1, q q a a; cross: r_i r_p = -1, q q (1 - a a)), so
    L = L[u = q r a] + 1/2 L[u = q] - 1/2 L[u = q r]
is computed with three exact calls of the op (the [N, N] matrix is still never stored; the
second and third do not depend on a). No approximation; tests/methods/test_cluda_hrda.py checks
it against a per-pair loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..config import Config, ConfigError, _check
from ..engine.context import MethodContext
from ..models import outputs as O
from ..models.heads import SigmoidMapHead
from .base import Losses, Method, Outputs


@dataclass
class CLUDASettings:
    """``[cluda]``: pixel-to-pixel contrast on the fused decoder features (source and mixed)."""

    weight: float = 1.0  # each of the two losses counts weight / 2
    tau: float = 1.0
    grid: list[int] = field(default_factory=lambda: [65, 65])  # (height, width)
    head_channels: int = 256  # hidden channels of the pair-weight head (HRDA mode only)

    def __post_init__(self) -> None:
        _check(self.tau > 0, "cluda.tau", self.tau, "> 0")
        _check(self.weight >= 0, "cluda.weight", self.weight, ">= 0")
        _check(len(self.grid) == 2 and min(self.grid) > 0, "cluda.grid", self.grid,
               "two positive integers (height, width)")
        _check(self.head_channels >= 1, "cluda.head_channels", self.head_channels, ">= 1")


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
    """In HRDA mode (``ctx.multi_resolution``) CLUDA builds the multi-resolution pair-weight
    head (``weight_head``) on the ``ctx.feature_channels``-channel features it contrasts;
    single resolution: no head, no parameters."""

    name = "cluda"
    Settings = CLUDASettings

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if not cfg.self_training.enabled:
            raise ConfigError("methods = [..., 'cluda'] adapts with the self-training loop: set "
                              "self_training.enabled = true")
        if cfg.self_training.mix != "classmix":
            raise ConfigError("methods = [..., 'cluda'] contrasts the mixed batch: set "
                              "self_training.mix = 'classmix'")

    def __init__(self, settings: CLUDASettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.num_classes, self.backend = ctx.num_classes, ctx.backend
        self.ignore_index = ctx.ignore_index
        self.grid = (int(settings.grid[0]), int(settings.grid[1]))
        self.weight_head = None
        if ctx.multi_resolution:
            if ctx.feature_channels <= 0:
                raise ValueError("CLUDA in HRDA mode builds a pair-weight head on the features: "
                                 "the context needs the network's feature_channels")
            self.weight_head = SigmoidMapHead(ctx.feature_channels, settings.head_channels)

    def pair_weight(self, feats: Tensor) -> Tensor:
        """a [B, h, w] on the grid: the pair-weight head on ``feats`` [B, D, h', w'], bilinear."""
        if self.weight_head is None:
            raise RuntimeError("CLUDA: the multi-resolution contrast needs the pair-weight head; "
                               "CLUDA builds it when its context is multi-resolution (HRDA)")
        a = self.weight_head(feats).float()
        return F.interpolate(a, size=self.grid, mode="bilinear", align_corners=False)[:, 0]

    def contrast(self, feats: Tensor, labels: Tensor, pair_weights: Tensor | None = None
                 ) -> Tensor:
        """pixel_contrast of ``feats`` [B, D, h, w] with full-resolution ``labels`` [B, H, W]
        (and per-pixel pair weights [B, H, W]) on the configured grid."""
        f, lbl, w = to_grid(feats, labels, pair_weights, self.grid)
        return ops.pixel_contrast(f, lbl, tau=self.settings.tau, pair_weights=w,
                                  ignore_index=self.ignore_index, backend=self.backend)

    def contrast_multires(self, out: Outputs, labels: Tensor, weights: Tensor | None = None
                          ) -> Tensor:
        """The multi-resolution contrast of HRDA outputs (see the module docstring): context
        and detail pixels on the grid, a from this method's pair-weight head on each view's
        features, pair weights a_i a_p within a view and 1 - a_i a_p across views (times the
        pixel weights' product), as three exact ``pixel_contrast`` calls."""
        y1, y2, x1, x2 = (int(v) for v in out[O.DETAIL_BOX])
        f_c, l_c, q_c = to_grid(out[O.FEATURES], labels, weights, self.grid)
        f_d, l_d, q_d = to_grid(out[O.FEATURES_DETAIL], labels[:, y1:y2, x1:x2],
                                None if weights is None else weights[:, y1:y2, x1:x2], self.grid)
        a_c = self.pair_weight(out[O.FEATURES])
        a_d = self.pair_weight(out[O.FEATURES_DETAIL])
        feats, lbl = torch.cat([f_c, f_d]), torch.cat([l_c, l_d])
        a = torch.cat([a_c, a_d])
        r = torch.cat([torch.ones_like(a_c), -torch.ones_like(a_d)])
        q = None if weights is None else torch.cat([q_c, q_d])
        return multires_pair_contrast(feats, lbl, a, r, q, tau=self.settings.tau,
                                      ignore_index=self.ignore_index, backend=self.backend)

    def _loss(self, out: Outputs, labels: Tensor, weights: Tensor | None) -> Tensor:
        if O.DETAIL_BOX in out and O.FEATURES_DETAIL in out:
            return self.contrast_multires(out, labels, weights)
        return self.contrast(out[O.FEATURES], labels, weights)

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        if self.settings.weight == 0:
            return {}
        return {"src.contrast": 0.5 * self.settings.weight * self._loss(out, label, None)}

    def mixed_losses(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                     it: int) -> Losses:
        if self.settings.weight == 0:
            return {}
        loss = self._loss(out, mixed_label, mixed_weight)
        return {"mix.contrast": 0.5 * self.settings.weight * loss}


def multires_pair_contrast(feats: Tensor, labels: Tensor, a: Tensor, r: Tensor,
                           q: Tensor | None = None, *, tau: float, ignore_index: int = 255,
                           backend: str = "auto") -> Tensor:
    """``pixel_contrast`` with pair weights w_ip = q_i q_p a_i a_p when r_i = r_p and
    w_ip = q_i q_p (1 - a_i a_p) when r_i != r_p (r in {+1, -1} per pixel; q = 1 if None):
    W = (q r a)(q r a)^T + 1/2 q q^T - 1/2 (q r)(q r)^T, three exact calls (the loss is linear in
    the pair weights; anchors and positive counts do not depend on them)."""
    def call(u: Tensor | None) -> Tensor:
        return ops.pixel_contrast(feats, labels, tau=tau, pair_weights=u,
                                  ignore_index=ignore_index, backend=backend)

    qa = a * r if q is None else q * r * a
    qr = r if q is None else q * r
    return call(qa) + 0.5 * call(q) - 0.5 * call(qr)


__all__ = ["CLUDA", "multires_pair_contrast", "to_grid"]
