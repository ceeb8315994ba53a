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
pseudo-labels kept only where the confidence reaches the class's threshold, capped at 0.9.

The thresholds (``spcl.threshold_scope``): the release takes, per class, the median confidence
``x[round(0.5 n)]`` of the sorted confidences of all pixels predicted as that class over the
whole target set, offline with the warm-up model (BinhuiXie/SPCL core/utils/pseudo_label.py#L34-L44,
pseudo_label.py#L91, #L155). Inside the loop, ``"stream"`` (default) keeps a per-class histogram
of the teacher's confidences over every target batch so far (``threshold_bins`` bins on [0, 1],
checkpointed) and takes the same rank in it: the threshold is the lower edge of the bin holding
``x[round(0.5 n)]``, so it is below the exact one by less than one bin width. ``"batch"`` is
fastuda's earlier rule: the lower median of the current batch.

Prototype initialisation (``spcl.prototype_init``): the release computes them offline before
its contrast stage, per class the mean over the whole source set of the per-batch means of the
L2-normalised features of the correctly predicted pixels, with the warm-up model
(BinhuiXie/SPCL semantic_prototype.py#L80-L98, loaded by train_ours.py#L122-L125), and its first
contrast step already moves them by the EMA. Inside the loop, ``"mean"`` (default) takes the same
mean of per-batch class means over the ``prototype_init_batches`` source batches just before
``start_iter`` (the loop's iterations before the contrast are its warm-up), with the student of
those steps, and sets the prototypes to it at ``start_iter``; the EMA then runs from there (no
update before). A class unseen in the window takes its first batch mean later; without a window
(``start_iter`` 0) every class does, which is ``"first_batch"``, fastuda's earlier rule (there the
EMA runs from iteration 0).

The prototypes come from the student's own source pass (SPCL has no second network), updated
before the loss of the same step, and are checkpointed. The per-class thresholds shape only the
contrast's target labels; the loop's mixed cross-entropy keeps its pseudo-labels.

The loop's source CE is taken on logits / ``spcl.source_logit_scale`` (1.8 released,
train_ours.py#L155) through the method hook ``source_logit_scale()``; the correct-pixel mask
reads the raw logits (the argmax is the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..config import Config, ConfigError, _check
from ..engine.context import MethodContext
from ..models import outputs as O
from .base import Losses, Method, Outputs

FEATURES = ("backbone", "embeddings")
SCOPES = ("stream", "batch")
INITS = ("mean", "first_batch")


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
    # "stream": the released median over the target set, as a running histogram; "batch": the
    # current batch's lower median (fastuda's earlier rule)
    threshold_scope: str = "stream"
    threshold_bins: int = 1000
    # "mean": the release's mean of per-batch class means, over the prototype_init_batches source
    # batches before start_iter; "first_batch": a class takes its first batch mean (earlier rule)
    prototype_init: str = "mean"
    prototype_init_batches: int = 0

    def __post_init__(self) -> None:
        _check(self.feature in FEATURES, "spcl.feature", self.feature, f"one of {FEATURES}")
        _check(self.threshold_scope in SCOPES, "spcl.threshold_scope", self.threshold_scope,
               f"one of {SCOPES}")
        _check(self.threshold_bins >= 2, "spcl.threshold_bins", self.threshold_bins, ">= 2")
        _check(self.prototype_init in INITS, "spcl.prototype_init", self.prototype_init,
               f"one of {INITS}")
        _check(self.prototype_init_batches >= 0, "spcl.prototype_init_batches",
               self.prototype_init_batches, ">= 0")
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


@torch.no_grad()
def confidence_histogram(conf: Tensor, label: Tensor, num_classes: int, bins: int,
                         valid: Tensor | None = None) -> Tensor:
    """hist [C, bins] (float64): per class, the count of its pixels with confidence in
    [i / bins, (i + 1) / bins) (confidence 1 in the last bin)."""
    if valid is None:
        valid = torch.ones_like(label, dtype=torch.bool)
    valid = valid & (label >= 0) & (label < num_classes)
    y = label[valid].long()
    b = (conf[valid].double() * bins).floor().long().clamp(0, bins - 1)
    hist = torch.bincount(y * bins + b, minlength=num_classes * bins)
    return hist.view(num_classes, bins).double()


@torch.no_grad()
def histogram_thresholds(hist: Tensor, cap: float) -> Tensor:
    """thr [C] from per-class confidence histograms: the lower edge of the bin holding the
    released rank ``round(0.5 n)`` (numpy's round, half to even; at most n - 1) of the class's
    sorted confidences, capped at ``cap``; 0 for a class without pixels, as the release."""
    bins = hist.shape[1]
    n = hist.sum(1)
    k = torch.minimum(torch.round(0.5 * n), (n - 1).clamp_min(0))
    # the bin where the cumulative count first exceeds k (0-based rank k)
    idx = (hist.cumsum(1) <= k[:, None]).sum(1).clamp(max=bins - 1)
    thr = torch.where(n > 0, idx.double() / bins, torch.zeros_like(n))
    return thr.clamp(max=cap).float()


class SPCL(Method):
    name = "spcl"
    Settings = SPCLSettings
    needs_self_training = True

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
        # the initialisation window's sums of per-batch class means and their batch counts
        self._init_sum: Tensor | None = None
        self._init_batches: Tensor | None = None
        # the teacher's target confidences so far, per class ("stream" thresholds)
        self.register_buffer("confidence_hist", torch.zeros(
            ctx.num_classes, settings.threshold_bins if settings.threshold_scope == "stream"
            else 0, dtype=torch.float64, device=ctx.device))

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

    # -- state: the prototypes and the initialisation's sums are part of every checkpoint -------
    def get_extra_state(self) -> dict[str, Tensor]:
        state = {} if self.prototypes is None else self.prototypes.state_dict()
        if self._init_sum is not None:
            state.update(init_sum=self._init_sum.clone(), init_batches=self._init_batches.clone())
        return state

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        if "init_sum" in state:
            self._init_sum, self._init_batches = state.pop("init_sum"), state.pop("init_batches")
        if not state:  # saved before the first batch made the prototypes
            return
        if self.prototypes is None:
            self._make_prototypes(int(state["mean"].shape[1]))
        self.prototypes.load_state_dict(state)

    # -- prototype initialisation -------------------------------------------------------------
    def init_window(self) -> tuple[int, int]:
        """[first, end) iterations whose source batches estimate the initial prototypes."""
        s = self.settings
        if s.prototype_init != "mean":
            return 0, 0
        return max(0, s.start_iter - s.prototype_init_batches), s.start_iter

    @torch.no_grad()
    def _accumulate_init(self, emb: Tensor, correct: Tensor) -> None:
        """Add this batch's per-class means (classes present) to the window's sums."""
        batch = ops.all_reduce_stats(ops.class_stats(
            emb.detach(), correct, self.num_classes, ignore_index=self.ignore_index,
            backend=self.backend))
        count, mean = batch.count.double(), batch.mean.double()
        if self._init_sum is None:
            self._init_sum = torch.zeros_like(mean)
            self._init_batches = torch.zeros_like(count)
        present = count > 0
        self._init_sum += torch.where(present[:, None], mean, torch.zeros_like(mean))
        self._init_batches += present.double()

    @torch.no_grad()
    def _initialise(self, protos: ops.ClassStatistics) -> None:
        """Set the prototypes to the window's mean of batch means (once, at start_iter)."""
        if self._init_sum is None:
            return
        seen = self._init_batches > 0
        mean = self._init_sum / self._init_batches.clamp_min(1)[:, None]
        # fresh prototypes: a class present here takes this mean as is (its first merge)
        protos.merge(ops.ClassStats(seen.double(), mean,
                                    torch.zeros_like(mean)))
        self._init_sum = self._init_batches = None

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
        first, end = self.init_window()
        if self.settings.prototype_init == "mean" and it < end:
            if it >= first:
                self._accumulate_init(emb, correct)
            return {}  # the EMA starts from the initial prototypes at start_iter
        self._initialise(protos)
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
        if self.settings.threshold_scope == "batch":
            thr = class_median_thresholds(conf, label, self.num_classes,
                                          self.settings.threshold_cap, valid)
        else:
            batch = confidence_histogram(conf, label, self.num_classes,
                                         self.settings.threshold_bins, valid)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(batch)  # every rank thresholds on the same stream
            self.confidence_hist += batch.to(self.confidence_hist.device)
            thr = histogram_thresholds(self.confidence_hist, self.settings.threshold_cap)
            thr = thr.to(conf.device)
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


__all__ = ["SPCL", "class_median_thresholds", "confidence_histogram", "histogram_thresholds"]
