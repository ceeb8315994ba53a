"""BiPCL: bi-directional pixel-prototype contrast with dynamic pseudo-labels.

For each (source image b, target image b) pair of the step, class prototypes are the per-image
class means of unit-norm projected features, normalised (source classes from the ground truth,
target classes from the pseudo-labels). The student's target pixels are contrasted against the
source prototypes of their pair and the student's source pixels against the target prototypes
(``ops.proto_contrast`` on cosine / tau, tau = 0.1; only classes present in both images of the
pair take part, as positives or negatives; weight 0.1 per direction).

Dynamic pseudo-labels (non-parametric label transfer): a target pixel's label is the class of its
most similar calibrated source prototype of the pair; ``bipcl_label_transfer`` = "agree" keeps
the teacher's label only where the two agree (ignore elsewhere), "replace" uses the transferred
label, "off" keeps the teacher's. Prototype calibration: a per-class running estimate of the
target-minus-source prototype offset (EMA over the pairs where the class is in both images),
added to the source prototypes before matching. (The paper describes both; its released code
omits them.)

Prototypes come from the EMA teacher's features of the un-augmented images (the source ones in
``update_state``, the target ones when the pseudo-labels are made), so label transfer compares
target and source features of the same network; the loop makes the target pseudo-labels before
the student's source pass (``pseudo_labels_first``) because the source loss needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..config import Config, ConfigError, _check
from ..engine.context import MethodContext
from ..models import outputs as O
from .base import Losses, Method, Outputs


@dataclass
class BiPCLSettings:
    """``[bipcl]``: per-image-pair prototypes, contrast in both directions."""

    tau: float = 0.1
    weight: float = 0.1  # per direction
    label_transfer: Literal["off", "agree", "replace"] = "agree"
    calibration: bool = True
    calibration_momentum: float = 0.99
    start_iter: int = 0

    def __post_init__(self) -> None:
        _check(self.tau > 0, "bipcl.tau", self.tau, "> 0")
        _check(self.weight >= 0, "bipcl.weight", self.weight, ">= 0")
        _check(self.start_iter >= 0, "bipcl.start_iter", self.start_iter, ">= 0")
        _check(0 <= self.calibration_momentum < 1, "bipcl.calibration_momentum",
               self.calibration_momentum, "in [0, 1)")


@torch.no_grad()
def image_prototypes(emb: Tensor, labels: Tensor, num_classes: int, *, ignore_index: int = 255,
                     backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-image class prototypes: (normalised means [B, C, D], present [B, C] bool).

    One ``class_stats`` call: image b's class c is class b*C + c."""
    B, D = emb.shape[:2]
    lbl = labels.long()
    valid = (lbl != ignore_index) & (lbl >= 0) & (lbl < num_classes)
    offset = torch.arange(B, device=lbl.device).view(B, 1, 1) * num_classes
    none = B * num_classes  # outside the keyed classes: that call's ignore value
    keyed = torch.where(valid, lbl + offset, torch.full_like(lbl, none))
    stats = ops.class_stats(emb.float(), keyed, B * num_classes, ignore_index=none,
                            backend=backend)
    means = stats.mean.view(B, num_classes, D)
    return F.normalize(means, dim=-1), stats.count.view(B, num_classes) > 0


def pair_contrast(emb: Tensor, labels: Tensor, prototypes: Tensor, usable: Tensor, *,
                  tau: float, ignore_index: int = 255, backend: str = "auto") -> Tensor:
    """Mean over the valid pixels of all images of -log softmax over image b's usable classes
    of (f . p_c / tau). Pixels whose class is not usable in their pair are left out.

    emb [B, D, h, w], labels [B, h, w], prototypes [B, C, D], usable [B, C] bool."""
    B, C = usable.shape
    total = emb.sum() * 0.0  # connected to the graph even when no pixel counts
    count = 0
    for b in range(B):
        classes = usable[b].nonzero()[:, 0]
        if classes.numel() == 0:
            continue
        lut = torch.full((C + 1,), ignore_index, dtype=torch.long, device=emb.device)
        lut[classes] = torch.arange(classes.numel(), device=emb.device)
        lbl = labels[b:b + 1].long()
        lbl = lut[torch.where(lbl == ignore_index, torch.full_like(lbl, C), lbl)]
        n = int((lbl != ignore_index).sum())
        if n == 0:
            continue
        loss = ops.proto_contrast(emb[b:b + 1], lbl, prototypes[b, classes].to(emb.dtype),
                                  tau=tau, ignore_index=ignore_index, reduction="sum",
                                  backend=backend)
        total, count = total + loss, count + n
    return total / max(count, 1)


class BiPCL(Method):
    name = "bipcl"
    Settings = BiPCLSettings
    pseudo_labels_first = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if not cfg.model.projection:
            raise ConfigError("methods = [..., 'bipcl'] needs the projection head "
                              "(embeddings): set model.projection = true")
        if not cfg.self_training.enabled:
            raise ConfigError("methods = [..., 'bipcl'] adapts with the self-training loop: "
                              "set self_training.enabled = true")

    def __init__(self, settings: BiPCLSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.num_classes, self.backend = ctx.num_classes, ctx.backend
        self.ignore_index = ctx.ignore_index
        # calibration: running target-minus-source prototype offset per class
        self.register_buffer("offset", torch.zeros(ctx.num_classes, ctx.embed_dim,
                                                   device=ctx.device))
        self.register_buffer("offset_seen", torch.zeros(ctx.num_classes, dtype=torch.bool,
                                                        device=ctx.device))
        self._source: tuple[Tensor, Tensor] | None = None  # this step's prototypes, present
        self._target: tuple[Tensor, Tensor] | None = None

    def wants_teacher_source(self, it: int) -> bool:
        return True

    def wants_student_target(self, it: int) -> bool:
        return it >= self.settings.start_iter

    def _labels_at(self, labels: Tensor, emb: Tensor) -> Tensor:
        return self.ctx.labels_at(labels, emb)

    def _prototypes(self, emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return image_prototypes(emb, labels, self.num_classes, ignore_index=self.ignore_index,
                                backend=self.backend)

    # -- prototypes, label transfer, calibration (teacher features, no grad) ----------------
    @torch.no_grad()
    def update_state(self, teacher_source: Outputs, source_label: Tensor, it: int) -> None:
        emb = teacher_source[O.EMBEDDINGS].float()
        self._source = self._prototypes(emb, self._labels_at(source_label, emb))

    @torch.no_grad()
    def transfer_labels(self, emb: Tensor) -> Tensor:
        """Per pixel of ``emb`` [B, D, h, w] the class of the most similar calibrated source
        prototype of its pair (among the classes of the source image); ignore where the source
        image has no class."""
        if self._source is None:
            raise RuntimeError("BiPCL: source prototypes are made in update_state first")
        protos, present = self._source
        if self.settings.calibration:
            protos = F.normalize(protos + self.offset.to(protos.dtype), dim=-1)
        scores = torch.einsum("bdhw,bcd->bchw", F.normalize(emb.float(), dim=1), protos)
        scores = scores.masked_fill(~present[:, :, None, None], float("-inf"))
        best = scores.argmax(1)
        none = ~present.any(1)
        return torch.where(none[:, None, None], torch.full_like(best, self.ignore_index), best)

    @torch.no_grad()
    def calibrate(self, source: tuple[Tensor, Tensor], target: tuple[Tensor, Tensor]) -> None:
        """offset_c <- m offset_c + (1 - m) mean over pairs with c in both of (t_c - s_c);
        under torch.distributed the mean runs over the pairs of every rank (same offset)."""
        (ps, ns), (pt, nt) = source, target
        both = (ns & nt).to(ps.dtype)  # [B, C]
        n = both.sum(0)
        total = ((pt - ps) * both[..., None]).sum(0)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            dist.all_reduce(total)
        diff = total / n.clamp_min(1)[:, None]
        present = n > 0
        m = self.settings.calibration_momentum
        first = present & ~self.offset_seen
        updated = torch.where(first[:, None], diff, m * self.offset + (1 - m) * diff)
        self.offset.copy_(torch.where(present[:, None], updated, self.offset))
        self.offset_seen |= present

    def refine_pseudo_labels(self, teacher_target: Outputs, label: Tensor, weight: Tensor,
                             it: int) -> tuple[Tensor, Tensor]:
        emb = teacher_target[O.EMBEDDINGS].float()
        mode = self.settings.label_transfer
        if mode != "off":
            factor = label.shape[-1] // emb.shape[-1]
            moved = self.transfer_labels(emb)
            moved = moved.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
            moved = moved[:, :label.shape[-2], :label.shape[-1]].to(label.dtype)
            if mode == "agree":
                ignore = torch.full_like(label, self.ignore_index)
                label = torch.where(moved == label, label, ignore)
            else:
                label = moved
        valid_label = torch.where(weight > 0, label, torch.full_like(label, self.ignore_index))
        self._target = self._prototypes(emb, self._labels_at(valid_label, emb))
        if self.settings.calibration and self._source is not None:
            self.calibrate(self._source, self._target)
        return label, weight

    # -- the two directions -------------------------------------------------------------------
    def _contrast(self, emb: Tensor, labels: Tensor, prototypes: Tensor, usable: Tensor
                  ) -> Tensor:
        return pair_contrast(emb.float(), self._labels_at(labels, emb), prototypes, usable,
                             tau=self.settings.tau, ignore_index=self.ignore_index,
                             backend=self.backend)

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        """Source pixels against the target prototypes of their pair."""
        if it < self.settings.start_iter or self.settings.weight == 0 or self._target is None:
            return {}
        (_, ns), (pt, nt) = self._source, self._target
        loss = self._contrast(out[O.EMBEDDINGS], label, pt, ns & nt)
        return {"src.contrast": self.settings.weight * loss}

    def target_losses(self, out: Outputs, pseudo_label: Tensor, pseudo_weight: Tensor,
                      it: int) -> Losses:
        """Target pixels against the source prototypes of their pair."""
        if it < self.settings.start_iter or self.settings.weight == 0 or self._target is None:
            return {}
        (ps, ns), (_, nt) = self._source, self._target
        label = torch.where(pseudo_weight > 0, pseudo_label,
                            torch.full_like(pseudo_label, self.ignore_index))
        loss = self._contrast(out[O.EMBEDDINGS], label, ps, ns & nt)
        return {"tgt.contrast": self.settings.weight * loss}


__all__ = ["BiPCL", "image_prototypes", "pair_contrast"]
