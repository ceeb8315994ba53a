"""BiPCL: bi-directional pixel-prototype contrast with dynamic pseudo-labels.

As released (cvlab-yonsei/DASS trainer/damnet_trainer.py#L39-L111, #L126-L147; the defaults):
for each (source image b, target image b) pair of the step, class prototypes are the class means
of the **student's** features of that image (source classes from the ground truth, target classes
from the pseudo-labels; labels brought to the feature grid by nearest sampling), with gradient.
The target pixels are classified by cosine / tau against the source prototypes of their pair and
the source pixels against the target prototypes; the softmax runs over every class (a class
absent from the prototype's image has cosine -1), the cosine maps are upsampled (nearest) to the
label size, and only the pixels whose class is in both images of the pair count. The loss of a
pair is the mean over its counted pixels, the step's loss the mean over the pairs (weight 0.1
per direction, tau 0.1). The released feature is DeepLab-V2's four ASPP branch outputs
concatenated (``feature = "aspp"``; ``"embeddings"``: the projection head). Both images run
through the student in one extra pass ("bipcl.pair", un-augmented as in the release), because
the prototypes of each direction need the other domain's graph.

``prototypes = "teacher"`` restores fastuda's earlier form: prototypes from the EMA teacher's
embeddings of the un-augmented images, without gradient (class means of unit-norm features,
labels by majority vote on the feature grid), contrasted with the student's source pass and a
student pass on the augmented target. ``negatives``, ``resolution`` and ``reduction`` restore
its loss (only shared classes in the softmax, feature-grid labels, mean over all pixels).

Dynamic pseudo-labels (non-parametric label transfer, the paper's; the release computes it but
never uses it, #L73-L91): a target pixel's label is the class of its most similar calibrated
source prototype of the pair; ``label_transfer`` = "agree" keeps the teacher's label only where
the two agree (ignore elsewhere), "replace" uses the transferred label, "off" (the release) keeps
the teacher's. Prototype calibration (the paper's; not in the release): a per-class running
estimate of the target-minus-source prototype offset (EMA over the pairs where the class is in
both images), added to the source prototypes before matching. Both read the teacher's features
(``update_state`` and the pseudo-label pass), of the kind ``feature`` names.
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
from ..engine.context import MethodContext, Pass, StepView
from ..models import outputs as O
from .base import Losses, Method, Outputs

ASPP_BRANCHES = 4  # DeepLab-V2's classifier: dilations 6, 12, 18, 24
_NO_CLASS = -1e9  # logit of a class left out of the softmax (finite: no NaN when all are)


@dataclass
class BiPCLSettings:
    """``[bipcl]``: per-image-pair prototypes, contrast in both directions."""

    tau: float = 0.1
    weight: float = 0.1  # per direction
    prototypes: Literal["student", "teacher"] = "student"
    feature: Literal["aspp", "embeddings"] = "aspp"
    negatives: Literal["all", "shared"] = "all"
    resolution: Literal["label", "feature"] = "label"
    reduction: Literal["pair", "pixel"] = "pair"
    # a pair without a shared class: "zero" adds 0; "nan" is the release's 0/0 (the loop then
    # skips the step as non-finite)
    empty_pair: Literal["zero", "nan"] = "zero"
    label_transfer: Literal["off", "agree", "replace"] = "off"
    calibration: bool = False
    calibration_momentum: float = 0.99
    start_iter: int = 0

    def __post_init__(self) -> None:
        _check(self.tau > 0, "bipcl.tau", self.tau, "> 0")
        _check(self.weight >= 0, "bipcl.weight", self.weight, ">= 0")
        _check(self.start_iter >= 0, "bipcl.start_iter", self.start_iter, ">= 0")
        _check(0 <= self.calibration_momentum < 1, "bipcl.calibration_momentum",
               self.calibration_momentum, "in [0, 1)")


def nearest_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Labels [B, H, W] sampled at ``size`` as ``F.interpolate``'s default (nearest) does, the
    way DASS brings them to the feature grid (damnet_trainer.py#L40-L44)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def class_means(feats: Tensor, labels: Tensor, num_classes: int, *, ignore_index: int = 255
                ) -> tuple[Tensor, Tensor]:
    """Per-image class means of the raw features, differentiable: (means [B, C, D], present
    [B, C] bool); an absent class's mean is zero. feats [B, D, h, w], labels [B, h, w]."""
    lbl = labels.long()
    valid = (lbl != ignore_index) & (lbl >= 0) & (lbl < num_classes)
    onehot = F.one_hot(torch.where(valid, lbl, 0), num_classes).to(feats.dtype)
    onehot = onehot * valid[..., None].to(feats.dtype)  # [B, h, w, C]
    sums = torch.einsum("bdhw,bhwc->bcd", feats, onehot)
    count = onehot.sum((1, 2))
    return sums / count.clamp_min(1)[..., None], count > 0


@torch.no_grad()
def image_prototypes(emb: Tensor, labels: Tensor, num_classes: int, *, ignore_index: int = 255,
                     backend: str = "auto") -> tuple[Tensor, Tensor]:
    """fastuda's earlier prototypes: (normalised means of the unit-norm features [B, C, D],
    present [B, C] bool). One ``class_stats`` call: image b's class c is class b*C + c."""
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


def direction_loss(feats: Tensor, labels: Tensor, prototypes: Tensor, present: Tensor,
                   shared: Tensor, *, tau: float, negatives: str = "all",
                   ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """Per image b: (sum over the counted pixels of -log softmax_c(cos(f, p_bc) / tau), number
    of counted pixels), both [B]. A pixel counts when its label is a ``shared`` class of b.

    feats [B, D, h, w]; labels [B, H, W] (H, W > h, w: the cosine map is upsampled, nearest);
    prototypes [B, C, D]; present, shared [B, C] bool. ``negatives`` "all": every class in the
    softmax, an absent one at cosine -1 (DASS #L62, #L102: its zero prototype's cosine is set to
    -1); "shared": only the shared classes."""
    cos = torch.einsum("bdhw,bcd->bchw", F.normalize(feats, dim=1),
                       F.normalize(prototypes, dim=-1))
    cos = torch.where(present[:, :, None, None], cos, torch.full_like(cos, -1.0))
    logits = cos / tau
    if negatives == "shared":
        logits = logits.masked_fill(~shared[:, :, None, None], _NO_CLASS)
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="nearest")
    lbl = labels.long()
    C = present.shape[1]
    valid = (lbl != ignore_index) & (lbl >= 0) & (lbl < C)
    safe = torch.where(valid, lbl, 0)
    counted = valid & shared.gather(1, safe.flatten(1)).view_as(safe)
    nll = F.cross_entropy(logits, safe, reduction="none")
    nll = torch.where(counted, nll, torch.zeros_like(nll))
    return nll.sum((1, 2)), counted.sum((1, 2))


def reduce_pairs(total: Tensor, count: Tensor, reduction: str, empty_pair: str = "zero"
                 ) -> Tensor:
    """"pair": mean over the pairs of each pair's mean (DASS #L143-L147); "pixel": one mean
    over all. Without counted pixels, "zero" gives 0 where the release's weighted CE divides
    0 by 0 (NaN; ``empty_pair = "nan"``)."""
    if empty_pair == "nan":
        count = count.to(total.dtype)
    else:
        count = count.clamp_min(1)
    if reduction == "pair":
        return (total / count).mean()
    return total.sum() / count.sum()


def pair_contrast(emb: Tensor, labels: Tensor, prototypes: Tensor, usable: Tensor, *,
                  tau: float, ignore_index: int = 255) -> Tensor:
    """fastuda's earlier loss: mean over the valid pixels of all images of -log softmax over
    image b's usable classes of (f . p_c / tau); pixels of other classes are left out."""
    total, count = direction_loss(emb, labels, prototypes, usable, usable, tau=tau,
                                  negatives="shared", ignore_index=ignore_index)
    return reduce_pairs(total, count, "pixel")


class BiPCL(Method):
    name = "bipcl"
    Settings = BiPCLSettings
    needs_self_training = True
    pseudo_labels_first = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        feature = cfg.settings("bipcl").feature
        if feature == "embeddings" and not cfg.model.projection:
            raise ConfigError("bipcl.feature = 'embeddings' needs the projection head: set "
                              "model.projection = true")
        if feature == "aspp" and cfg.model.name != "deeplabv2":
            raise ConfigError(f"bipcl.feature = 'aspp' needs model.name = 'deeplabv2' (got "
                              f"{cfg.model.name!r}): set bipcl.feature = 'embeddings'")

    def __init__(self, settings: BiPCLSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.num_classes, self.backend = ctx.num_classes, ctx.backend
        self.ignore_index = ctx.ignore_index
        self.key = O.ASPP_BRANCHES if settings.feature == "aspp" else O.EMBEDDINGS
        dim = ASPP_BRANCHES * ctx.num_classes if settings.feature == "aspp" else ctx.embed_dim
        # calibration: running target-minus-source prototype offset per class
        self.register_buffer("offset", torch.zeros(ctx.num_classes, dim, device=ctx.device))
        self.register_buffer("offset_seen", torch.zeros(ctx.num_classes, dtype=torch.bool,
                                                        device=ctx.device))
        self._source: tuple[Tensor, Tensor] | None = None  # teacher prototypes, present
        self._target: tuple[Tensor, Tensor] | None = None

    @property
    def _teacher_protos(self) -> bool:
        return self.settings.prototypes == "teacher"

    def _active(self, it: int) -> bool:
        return it >= self.settings.start_iter and self.settings.weight > 0

    def wants_teacher_source(self, it: int) -> bool:
        s = self.settings
        return self._teacher_protos or s.label_transfer != "off" or s.calibration

    def wants_student_target(self, it: int) -> bool:
        return self._teacher_protos and it >= self.settings.start_iter

    def _labels_at(self, labels: Tensor, feats: Tensor) -> Tensor:
        if self._teacher_protos:
            return self.ctx.labels_at(labels, feats)
        return nearest_labels(labels, tuple(feats.shape[-2:]))

    def _prototypes(self, feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self._teacher_protos:
            return image_prototypes(feats, labels, self.num_classes,
                                    ignore_index=self.ignore_index, backend=self.backend)
        with torch.no_grad():
            means, present = class_means(feats, labels, self.num_classes,
                                         ignore_index=self.ignore_index)
        return F.normalize(means, dim=-1), present

    # -- teacher prototypes: label transfer, calibration, the "teacher" contrast (no grad) ----
    @torch.no_grad()
    def update_state(self, teacher_source: Outputs, source_label: Tensor, it: int) -> None:
        feats = teacher_source[self.key].float()
        self._source = self._prototypes(feats, self._labels_at(source_label, feats))

    @torch.no_grad()
    def transfer_labels(self, feats: Tensor) -> Tensor:
        """Per pixel of ``feats`` [B, D, h, w] the class of the most similar calibrated source
        prototype of its pair (among the classes of the source image); ignore where the source
        image has no class."""
        if self._source is None:
            raise RuntimeError("BiPCL: source prototypes are made in update_state first")
        protos, present = self._source
        if self.settings.calibration:
            protos = F.normalize(protos + self.offset.to(protos.dtype), dim=-1)
        scores = torch.einsum("bdhw,bcd->bchw", F.normalize(feats.float(), dim=1), protos)
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
        s = self.settings
        if not self.wants_teacher_source(it):
            return label, weight
        feats = teacher_target[self.key].float()
        if s.label_transfer != "off":
            moved = self.transfer_labels(feats)
            moved = F.interpolate(moved[:, None].float(), size=label.shape[-2:],
                                  mode="nearest")[:, 0].to(label.dtype)
            if s.label_transfer == "agree":
                label = torch.where(moved == label, label, torch.full_like(label,
                                                                           self.ignore_index))
            else:
                label = moved
        valid_label = torch.where(weight > 0, label, torch.full_like(label, self.ignore_index))
        self._target = self._prototypes(feats, self._labels_at(valid_label, feats))
        if s.calibration and self._source is not None:
            self.calibrate(self._source, self._target)
        return label, weight

    # -- the contrast -------------------------------------------------------------------------
    def _direction(self, feats: Tensor, labels: Tensor, prototypes: Tensor, present: Tensor,
                   shared: Tensor) -> Tensor:
        s = self.settings
        if s.resolution == "feature":
            labels = self._labels_at(labels, feats)
        total, count = direction_loss(feats.float(), labels, prototypes, present, shared,
                                      tau=s.tau, negatives=s.negatives,
                                      ignore_index=self.ignore_index)
        return reduce_pairs(total, count, s.reduction, s.empty_pair)

    def _pseudo(self, label: Tensor, weight: Tensor) -> Tensor:
        return torch.where(weight > 0, label, torch.full_like(label, self.ignore_index))

    def pair_losses(self, source_feats: Tensor, source_label: Tensor, target_feats: Tensor,
                    target_label: Tensor) -> Losses:
        """Both directions with the student's prototypes (gradient through them): target
        pixels against the source prototypes of their pair, source pixels against the target
        ones; ``target_label`` has the ignore index where the pseudo-weight is 0."""
        src, tgt = source_feats.float(), target_feats.float()
        ps, ns = class_means(src, nearest_labels(source_label, tuple(src.shape[-2:])),
                             self.num_classes, ignore_index=self.ignore_index)
        pt, nt = class_means(tgt, nearest_labels(target_label, tuple(tgt.shape[-2:])),
                             self.num_classes, ignore_index=self.ignore_index)
        shared = ns & nt  # DASS #L49-L52: classes of both images at the feature grid
        w = self.settings.weight
        return {"tgt.contrast": w * self._direction(tgt, target_label, ps, ns, shared),
                "src.contrast": w * self._direction(src, source_label, pt, nt, shared)}

    def _pair_images(self, view: StepView) -> Tensor:
        # one batch: the release's two forwards differ from it only by the BN statistics,
        # which DASS freezes (config/damnet_config.yml#L7)
        return torch.cat([view.source_image, view.target_image])

    def _pair_pass_losses(self, out: Outputs, view: StepView) -> Losses:
        feats = out[self.key]
        B = view.source_image.shape[0]
        return self.pair_losses(feats[:B], view.source_label, feats[B:],
                                self._pseudo(view.pseudo_label, view.pseudo_weight))

    def extra_passes(self, it: int) -> list[Pass]:
        if self._teacher_protos or not self._active(it):
            return []
        return [Pass("pair", self._pair_images, self._pair_pass_losses)]

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        """"teacher" prototypes: source pixels against the target prototypes of their pair."""
        if not self._teacher_protos or not self._active(it) or self._target is None:
            return {}
        (_, ns), (pt, nt) = self._source, self._target
        return {"src.contrast": self.settings.weight * self._direction(
            out[self.key], label, pt, nt, ns & nt)}

    def target_losses(self, out: Outputs, pseudo_label: Tensor, pseudo_weight: Tensor,
                      it: int) -> Losses:
        """"teacher" prototypes: target pixels against the source prototypes of their pair."""
        if not self._teacher_protos or not self._active(it) or self._target is None:
            return {}
        (ps, ns), (_, nt) = self._source, self._target
        return {"tgt.contrast": self.settings.weight * self._direction(
            out[self.key], self._pseudo(pseudo_label, pseudo_weight), ps, ns, ns & nt)}


__all__ = ["BiPCL", "BiPCLSettings", "class_means", "direction_loss", "image_prototypes",
           "nearest_labels", "pair_contrast", "reduce_pairs"]
