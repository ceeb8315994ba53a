"""SPCL: semantic prototype-based contrast.

The contrasted feature (``spcl.feature``) is the released one by default: the backbone's last
stage (DeepLab-V2 layer 4, 2048 channels, ``outputs.BACKBONE``) L2-normalised along channels
(BinhuiXie/SPCL train_ours.py#L169-L173, core/utils/loss.py#L30-L38); ``"embeddings"`` is
fastuda's earlier choice, the projection head's unit-norm embeddings.

Prototypes are per-class means of those features of the source pixels the
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

FEATURES = ("backbone", "embeddings")


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
    # "backbone": the released L2-normalised layer-4 map; "embeddings": the projection head's
    feature: str = "backbone"

    def __post_init__(self) -> None:
        _check(self.feature in FEATURES, "spcl.feature", self.feature, f"one of {FEATURES}")
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
        feature = cfg.settings("spcl").feature
        if feature == "embeddings" and not cfg.model.projection:
            raise ConfigError("spcl.feature = 'embeddings' needs the projection head: set "
                              "model.projection = true")
        # the released feature is DeepLab-V2's layer 4, which is on the logits grid; other
        # backbones' last stage is not (DAFormer stride 32, ViT patch grid of the padded input)
        if feature == "backbone" and (cfg.model.name != "deeplabv2" or cfg.hrda.enabled):
            raise ConfigError(f"spcl.feature = 'backbone' (the released DeepLab-V2 layer 4) needs "
                              f"model.name = 'deeplabv2' without HRDA, got {cfg.model.name!r}: "
                              "use spcl.feature = 'embeddings'")
        if not cfg.self_training.enabled:
            raise ConfigError("methods = [..., 'spcl'] adapts with the self-training loop: set "
                              "self_training.enabled = true")

    def __init__(self, settings: SPCLSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.num_classes, self.backend = ctx.num_classes, ctx.backend
        self.ignore_index = ctx.ignore_index
        # the backbone's channel count is known at the first batch (the context has no field
        # for it); the embeddings' is the context's
        self.prototypes: ops.ClassStatistics | None = None
        if settings.feature == "embeddings":
            self._make_prototypes(ctx.embed_dim)
        self._target_label: Tensor | None = None  # this step's thresholded pseudo-labels

    def _make_prototypes(self, dim: int) -> ops.ClassStatistics:
        self.prototypes = ops.ClassStatistics(self.num_classes, dim, cov="diag",
                                              momentum=self.settings.momentum,
                                              ignore_index=self.ignore_index,
                                              device=self.ctx.device, backend=self.backend)
        return self.prototypes

    def feature(self, out: Outputs) -> Tensor:
        """The contrasted map [B, D, h, w], unit L2 norm along D (fp32)."""
        if self.settings.feature == "embeddings":
            return out[O.EMBEDDINGS].float()
        return F.normalize(out[O.BACKBONE].float(), p=2, dim=1)

    # -- state: the prototypes are part of every checkpoint -----------------------------------
    def get_extra_state(self) -> dict[str, Tensor]:
        return {} if self.prototypes is None else self.prototypes.state_dict()

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        if not state:  # saved before the first batch made the prototypes
            return
        if self.prototypes is None:
            self._make_prototypes(int(state["mean"].shape[1]))
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
        emb = self.feature(out)
        correct = self.correct_source_labels(emb, out[O.LOGITS], label)
        protos = self.prototypes or self._make_prototypes(emb.shape[1])
        protos.update(emb.detach(), correct)
        if it < self.settings.start_iter or self.settings.source_weight == 0:
            return {}
        loss = ops.proto_contrast(emb, correct, protos.mean, tau=self.settings.tau,
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
        if self.prototypes is None:
            raise RuntimeError("SPCL.target_losses needs the prototypes of a source pass")
        emb = self.feature(out)
        lbl = self._labels_at(self._target_label, emb)
        self._target_label = None
        loss = ops.proto_contrast(emb, lbl, self.prototypes.mean, tau=self.settings.tau,
                                  ignore_index=self.ignore_index, backend=self.backend)
        return {"tgt.contrast": self.settings.target_weight * loss}


__all__ = ["SPCL", "class_median_thresholds"]
