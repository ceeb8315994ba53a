"""What the self-training loop hands its methods (docs/architecture.md, "The method contract"):
the context of the run, a step's view of its data, and a pass.

- ``MethodContext``: built once per run, before the methods; it holds what a method would
  otherwise re-derive from the config (number of classes, ignore index, ops backend, the
  feature sizes of the network) and the loop's own tools: the step's random generator (so a
  resumed run draws the same random numbers), the strong augmentation, the label downscaling
  and the segmentation loss.
- ``StepView``: what a step knows so far (images, labels, pseudo-labels, the ClassMix mask);
  filled by the loop in step order and read by passes.
- ``Pass``: one student forward with its losses and one backward. A step is an ordered list of
  passes; under DDP the last one of the list all-reduces the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config import Config, DataConfig, ModelConfig, SelfTrainingConfig
from ..data.augment import strong_augment
from ..data.classes import IGNORE_INDEX
from .losses import segmentation_losses

Outputs = dict[str, Tensor]
Losses = dict[str, Tensor]


def _default_generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@dataclass
class MethodContext:
    """``from_config`` builds a run's; the defaults make a context for a method used alone."""

    num_classes: int
    backend: str = "auto"  # ops backend ("auto", "cpu", "cuda", "triton", "torch")
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # the step's random stream; the loop checkpoints it
    generator: torch.Generator = field(default_factory=_default_generator)
    embed_dim: int = 0  # channels of the network's "embeddings" (0: no projection head)
    feature_channels: int = 0  # channels of the network's "features"
    multi_resolution: bool = False  # HRDA's network (outputs carry a detail box in training)
    context_scale: float = 1.0  # HRDA's context view scale (hrda.context_scale); 1 without HRDA
    downscale_min_ratio: float = 0.75  # label downscaling (self_training.downscale_min_ratio)
    detail_loss_weight: float = 0.0  # HRDA's detail CE weight (hrda.detail_loss_weight)
    # augmentation strengths and image normalisation (self_training.*, data.mean/std)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    mean: list[float] = field(default_factory=lambda: list(DataConfig().mean))
    std: list[float] = field(default_factory=lambda: list(DataConfig().std))
    ignore_index: int = IGNORE_INDEX
    # the run's model section: a method that needs another network of the same kind builds it
    # from this (fdist's frozen ImageNet model, from the same model.pretrained file)
    model: ModelConfig | None = None
    # the network's decode head (HRDA: the wrapped model's): CLUDA's released pair-weight head is
    # a head of the same type (fastuda/models/hrda.py scale_attention_head)
    decode_head: Any = None
    # per-class factors of every pass's segmentation CE; None: unweighted. Set by a method
    # whose release weights the decode head's loss (SePiCo's Dark Zurich variant, "daynight")
    ce_class_weight: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: Config, network: Any, device: torch.device) -> MethodContext:
        """The context of a run of ``cfg`` training ``network`` (before any method wraps it)."""
        return cls(num_classes=cfg.model.num_classes, backend=cfg.ops.backend, device=device,
                   generator=torch.Generator().manual_seed(cfg.train.seed),
                   embed_dim=int(getattr(network, "embed_dim", 0) or 0),
                   feature_channels=int(getattr(network, "feature_channels", 0) or 0),
                   multi_resolution=cfg.hrda.enabled,
                   context_scale=cfg.hrda.context_scale if cfg.hrda.enabled else 1.0,
                   downscale_min_ratio=cfg.self_training.downscale_min_ratio,
                   detail_loss_weight=cfg.hrda.detail_loss_weight,
                   self_training=cfg.self_training, mean=list(cfg.data.mean),
                   std=list(cfg.data.std), model=cfg.model,
                   decode_head=getattr(getattr(network, "model", network), "decode_head", None))

    def augment(self, images: Tensor) -> Tensor:
        """The strong augmentation (colour jitter, blur) of normalised images, drawn from the
        step's generator."""
        st = self.self_training
        return strong_augment(images, mean=self.mean, std=self.std, generator=self.generator,
                              jitter_strength=st.color_jitter_strength,
                              jitter_prob=st.color_jitter_prob, blur_prob=st.blur_prob,
                              blur_sigma=tuple(st.blur_sigma))

    def labels_at(self, labels: Tensor, feats: Tensor) -> Tensor:
        """Labels [B, H, W] brought to the grid of ``feats`` [B, D, h, w] by majority vote
        (``ops.downscale_labels``); H and W must be the same multiple of h and w."""
        from .. import ops  # the kernels load on first use

        factor = labels.shape[-1] // feats.shape[-1]
        if factor < 1 or labels.shape[-2] != feats.shape[-2] * factor \
                or labels.shape[-1] != feats.shape[-1] * factor:
            raise ValueError(f"label size {tuple(labels.shape[-2:])} is not a multiple of the "
                             f"feature size {tuple(feats.shape[-2:])}")
        if factor == 1:
            return labels
        return ops.downscale_labels(labels, factor, num_classes=self.num_classes,
                                    min_ratio=self.downscale_min_ratio,
                                    ignore_index=self.ignore_index, backend=self.backend)

    def segmentation_loss(self, prefix: str, out: Outputs, label: Tensor,
                          weight: Tensor | None = None) -> Losses:
        """The loop's segmentation loss of a pass (``{prefix}.ce``, with HRDA also
        ``{prefix}.ce_detail``)."""
        return segmentation_losses(prefix, out, label, weight,
                                   detail_weight=self.detail_loss_weight,
                                   average=self.self_training.source_ce_average,
                                   class_weight=self.ce_class_weight)


@dataclass
class StepView:
    """One step's data as the loop has made it so far (device tensors)."""

    it: int
    source: dict[str, Any]  # the raw source batch (image, label, meta, and e.g. "depth")
    target: dict[str, Any]  # the raw target batch
    source_image: Tensor
    source_label: Tensor
    target_image: Tensor | None = None  # after the class-balanced crop, when that is on
    pseudo_label: Tensor | None = None  # [B, H, W], refined by the methods
    pseudo_weight: Tensor | None = None  # [B, H, W]
    mix_mask: Tensor | None = None  # [B, H, W] bool, True: source pixel (ClassMix)
    mixed_label: Tensor | None = None
    mixed_weight: Tensor | None = None


@dataclass(frozen=True)
class Pass:
    """One student pass: ``images(view)`` is its input, ``losses(outputs, view)`` its losses
    (named ``pass.loss``; the loop prefixes a method's losses with the method's name)."""

    name: str
    images: Callable[[StepView], Tensor]
    losses: Callable[[Outputs, StepView], Losses]
    needs_pseudo_labels: bool = True  # the loop makes them before this pass
    # HRDA's rule for the student's detail box (fastuda/models/hrda.py BOX_RULES); None: the
    # network's default (HRDA's random box), and the forward gets no box_rule
    box_rule: str | None = None


__all__ = ["Losses", "MethodContext", "Outputs", "Pass", "StepView"]
