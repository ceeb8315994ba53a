"""SePiCo: semantic-guided pixel contrast (ProtoCL, BankCL, DistCL).

Every step the teacher's projected features of the un-augmented source update dataset-level class
statistics (exact pooled mean/variance, or a bank of batch centroids). From ``start_iter`` on, the
student's projected features of the augmented source (ground truth) and target (pseudo-labels) are
contrasted against those class concepts, plus a regulariser on the mean feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .. import ops
from ..config import Config, ConfigError, _check
from ..engine.context import MethodContext
from ..models import outputs as O
from .base import Losses, Method, Outputs


@dataclass
class SePiCoSettings:
    """``[sepico]``; defaults are the published settings (configs/_base/sepico.toml)."""

    variant: Literal["proto", "bank", "dist"] = "dist"
    start_iter: int = 3000  # the contrast starts here (the statistics fill from iteration 0)
    contrast_weight: float = 1.0
    reg_weight: float = 1.0
    tau: float = 100.0
    lam: float = 1.0  # DistCL's variance weight
    bank_size: int = 200  # BankCL: centroids kept per class

    def __post_init__(self) -> None:
        _check(self.tau > 0, "sepico.tau", self.tau, "> 0")
        _check(self.bank_size >= 0, "sepico.bank_size", self.bank_size, ">= 0")
        _check(self.start_iter >= 0, "sepico.start_iter", self.start_iter, ">= 0")


class SePiCo(Method):
    name = "sepico"
    Settings = SePiCoSettings
    augment_source = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if not cfg.model.projection:
            raise ConfigError("methods = [..., 'sepico'] needs the projection head "
                              "(embeddings): set model.projection = true")

    def __init__(self, settings: SePiCoSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.num_classes, self.backend = ctx.num_classes, ctx.backend
        self.ignore_index = ctx.ignore_index
        self.stats = ops.ClassStatistics(
            ctx.num_classes, ctx.embed_dim, cov="diag",
            bank_size=settings.bank_size if settings.variant == "bank" else 0,
            ignore_index=ctx.ignore_index, device=ctx.device, backend=ctx.backend)

    # -- state: the statistics are part of every checkpoint ---------------------------------------
    def get_extra_state(self) -> dict[str, Tensor]:
        return self.stats.state_dict()

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.stats.load_state_dict(state)

    # -- hooks --------------------------------------------------------------------------------
    def wants_teacher_source(self, it: int) -> bool:
        return True

    def wants_student_target(self, it: int) -> bool:
        return it >= self.settings.start_iter

    def _labels_at(self, labels: Tensor, emb: Tensor) -> Tensor:
        """Labels [B, H, W] brought to the embedding grid by majority vote."""
        return self.ctx.labels_at(labels, emb)

    @torch.no_grad()
    def update_state(self, teacher_source: Outputs, source_label: Tensor, it: int) -> None:
        emb = teacher_source[O.EMBEDDINGS]
        self.stats.update(emb.float(), self._labels_at(source_label, emb))

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        if it < self.settings.start_iter:
            return {}
        return self._contrast(out[O.EMBEDDINGS], label, "src")

    def target_losses(self, out: Outputs, pseudo_label: Tensor, pseudo_weight: Tensor,
                      it: int) -> Losses:
        if it < self.settings.start_iter:
            return {}
        # no confidence threshold; only the rows whose weight was zeroed (top/bottom) are ignored
        label = torch.where(pseudo_weight > 0, pseudo_label,
                            torch.full_like(pseudo_label, self.ignore_index))
        return self._contrast(out[O.EMBEDDINGS], label, "tgt")

    # -- the losses ---------------------------------------------------------------------------
    def _contrast(self, emb: Tensor, labels: Tensor, tag: str) -> Losses:
        emb = emb.float()  # statistics and losses in fp32 under autocast
        lbl = self._labels_at(labels, emb)
        cfg, stats = self.settings, self.stats
        if cfg.variant == "proto":
            loss = ops.proto_contrast(emb, lbl, stats.mean, tau=cfg.tau,
                                      ignore_index=self.ignore_index, backend=self.backend)
        elif cfg.variant == "dist":
            loss = ops.dist_contrast(emb, lbl, stats.mean, stats.var, tau=cfg.tau, lam=cfg.lam,
                                     ignore_index=self.ignore_index, backend=self.backend)
        else:
            loss = ops.bank_contrast(emb, lbl, stats.bank, stats.bank_len, tau=cfg.tau,
                                     ignore_index=self.ignore_index, backend=self.backend)
        losses = {f"{tag}.contrast": cfg.contrast_weight * loss}
        if cfg.reg_weight > 0:
            losses[f"{tag}.reg"] = cfg.reg_weight * self._regulariser(emb, lbl)
        return losses

    def _regulariser(self, emb: Tensor, labels: Tensor) -> Tensor:
        """L_reg = sum_c log softmax_c(fbar . mu / tau) / (C ln C), fbar the mean valid feature."""
        valid = (labels != self.ignore_index).unsqueeze(1).to(emb.dtype)  # [B, 1, h, w]
        n = valid.sum()
        if n == 0:
            return emb.sum() * 0.0
        fbar = (emb * valid).sum(dim=(0, 2, 3)) / n
        # every variant, BankCL included, uses the running class means (the release passes
        # ProtoEstimator.Ave to bank_contrastive's proto_reg: contrastive_loss.py#L286-L288)
        logp = torch.log_softmax(fbar @ self.stats.mean.t() / self.settings.tau, dim=0)
        C = self.num_classes
        return logp.sum() / (C * math.log(C)) if C > 1 else logp.sum() * 0.0
