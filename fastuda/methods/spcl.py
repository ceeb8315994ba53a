"""SPCL: semantic prototype-based contrast.

Prototypes are per-class means of the (unit-norm) projected features of the source pixels the
student predicts correctly, kept as an EMA (P <- m P + (1 - m) m_batch for the classes present in
the batch, m = 0.1 published; a class seen for the first time takes its batch mean). The contrast
``ops.proto_contrast`` (tau = 100 published) pulls each pixel to its class prototype against the
others: on the source's correctly predicted pixels, and on the target with the teacher's
pseudo-labels kept only where the confidence reaches the class's threshold, the median confidence
of the pixels predicted as that class in the batch, capped at 0.9.

The prototypes come from the student's own source pass (SPCL has no second network), updated
before the loss of the same step, and are checkpointed. The per-class thresholds shape only the
contrast's target labels; the loop's mixed cross-entropy keeps its pseudo-labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..config import Config, ConfigError, _check
from ..engine.context import MethodContext
from ..models import outputs as O
from .base import Losses, Method, Outputs


@dataclass
class SPCLSettings:
    """``[spcl]``; defaults are the published settings (configs/spcl/deeplabv2_gta2cs.toml)."""

    tau: float = 100.0
    momentum: float = 0.1  # P <- m P + (1 - m) m_batch
    threshold_cap: float = 0.9  # per-class median-confidence thresholds, capped here
    source_weight: float = 1.0
    target_weight: float = 1.0
    start_iter: int = 0
    # the loop's source CE on logits / 1.8 (BinhuiXie/SPCL train_ours.py#L155); 1.0: plain CE
    source_logit_scale: float = 1.8

    def __post_init__(self) -> None:
        _check(self.tau > 0, "spcl.tau", self.tau, "> 0")
        _check(self.source_logit_scale > 0, "spcl.source_logit_scale", self.source_logit_scale,
               "> 0")
        _check(0 <= self.momentum < 1, "spcl.momentum", self.momentum, "in [0, 1)")
        _check(0 < self.threshold_cap <= 1, "spcl.threshold_cap", self.threshold_cap,
               "in (0, 1]")
        for key in ("source_weight", "target_weight", "start_iter"):
            _check(getattr(self, key) >= 0, f"spcl.{key}", getattr(self, key), ">= 0")


@torch.no_grad()
def class_median_thresholds(conf: Tensor, label: Tensor, num_classes: int, cap: float,
                            valid: Tensor | None = None) -> Tensor:
    """thr [C]: per class the median confidence of its pixels (the lower middle value for an
    even count, as torch.median), capped at ``cap``; ``cap`` for a class without pixels.
    One sort by (class, confidence), no loop over classes."""
    if valid is None:
        valid = torch.ones_like(label, dtype=torch.bool)
    valid = valid & (label >= 0) & (label < num_classes)
    y, c = label[valid].long(), conf[valid].double()
    counts = torch.bincount(y, minlength=num_classes)
    keyed = torch.sort(y.double() * 2.0 + c).values  # conf in [0, 1]: classes stay apart
    starts = torch.cumsum(counts, 0) - counts
    idx = (starts + (counts - 1).clamp_min(0) // 2).clamp(max=max(keyed.numel() - 1, 0))
    classes = torch.arange(num_classes, device=conf.device, dtype=torch.float64)
    median = keyed[idx] - 2.0 * classes if keyed.numel() else torch.full_like(classes, cap)
    thr = torch.where(counts > 0, median.clamp(max=cap), torch.full_like(median, cap))
    return thr.to(conf.dtype)


class SPCL(Method):
    name = "spcl"
    Settings = SPCLSettings

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if not cfg.model.projection:
            raise ConfigError("methods = [..., 'spcl'] needs the projection head (embeddings): "
                              "set model.projection = true")
        if not cfg.self_training.enabled:
            raise ConfigError("methods = [..., 'spcl'] adapts with the self-training loop: set "
                              "self_training.enabled = true")

    def __init__(self, settings: SPCLSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.num_classes, self.backend = ctx.num_classes, ctx.backend
        self.ignore_index = ctx.ignore_index
        self.prototypes = ops.ClassStatistics(ctx.num_classes, ctx.embed_dim, cov="diag",
                                              momentum=settings.momentum,
                                              ignore_index=ctx.ignore_index, device=ctx.device,
                                              backend=ctx.backend)
        self._target_label: Tensor | None = None  # this step's thresholded pseudo-labels

    # -- state: the prototypes are part of every checkpoint -----------------------------------
    def get_extra_state(self) -> dict[str, Tensor]:
        return self.prototypes.state_dict()

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.prototypes.load_state_dict(state)

    # -- hooks --------------------------------------------------------------------------------
    def source_logit_scale(self) -> float:
        return self.settings.source_logit_scale

    def wants_student_target(self, it: int) -> bool:
        return it >= self.settings.start_iter

    def _labels_at(self, labels: Tensor, emb: Tensor) -> Tensor:
        return self.ctx.labels_at(labels, emb)

    def correct_source_labels(self, emb: Tensor, logits: Tensor, label: Tensor) -> Tensor:
        """Ground truth at the embedding grid where the student's prediction agrees, else
        ignore."""
        lbl = self._labels_at(label, emb)
        pred = F.interpolate(logits.detach().float(), size=emb.shape[-2:], mode="bilinear",
                             align_corners=False).argmax(1)
        return torch.where(pred == lbl, lbl, torch.full_like(lbl, self.ignore_index))

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        emb = out[O.EMBEDDINGS].float()
        correct = self.correct_source_labels(emb, out[O.LOGITS], label)
        self.prototypes.update(emb.detach(), correct)
        if it < self.settings.start_iter or self.settings.source_weight == 0:
            return {}
        loss = ops.proto_contrast(emb, correct, self.prototypes.mean, tau=self.settings.tau,
                                  ignore_index=self.ignore_index, backend=self.backend)
        return {"src.contrast": self.settings.source_weight * loss}

    def refine_pseudo_labels(self, teacher_target: Outputs, label: Tensor, weight: Tensor,
                             it: int) -> tuple[Tensor, Tensor]:
        conf = torch.softmax(teacher_target[O.LOGITS].float(), dim=1).amax(1)
        valid = weight > 0  # the loop's ignored rows stay out of the thresholds and the loss
        thr = class_median_thresholds(conf, label, self.num_classes,
                                      self.settings.threshold_cap, valid)
        keep = valid & (conf >= thr[label.long().clamp(0, self.num_classes - 1)])
        self._target_label = torch.where(keep, label, torch.full_like(label, self.ignore_index))
        return label, weight

    def target_losses(self, out: Outputs, pseudo_label: Tensor, pseudo_weight: Tensor,
                      it: int) -> Losses:
        if it < self.settings.start_iter or self.settings.target_weight == 0:
            return {}
        if self._target_label is None or self._target_label.shape != pseudo_label.shape:
            raise RuntimeError("SPCL.target_losses needs refine_pseudo_labels of the same step "
                               "(the thresholded pseudo-labels)")
        emb = out[O.EMBEDDINGS].float()
        lbl = self._labels_at(self._target_label, emb)
        self._target_label = None
        loss = ops.proto_contrast(emb, lbl, self.prototypes.mean, tau=self.settings.tau,
                                  ignore_index=self.ignore_index, backend=self.backend)
        return {"tgt.contrast": self.settings.target_weight * loss}


__all__ = ["SPCL", "class_median_thresholds"]
