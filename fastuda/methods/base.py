"""What a method is: a small module that adds heads, losses and state to the shared loop.

The self-training loop (fastuda/methods/self_training.py) calls these hooks at fixed points of a
step; a method touches the model only through its dict of named outputs. Extra heads that only
feed a loss are submodules of the method (trained with the student at the head learning rate);
heads that change what the network predicts (CorDA's depth exchange) wrap the model instead
(``wrap_model``), so the teacher, checkpoints and evaluation see them too. Statistics, banks and
prototypes are part of ``state_dict`` so checkpoints capture them.

Order of the hooks in one step (see ``SelfTraining.step``):
    start_step(source, target)                            the raw batches (depth, meta)
    update_state(teacher(source), source label)           if wants_teacher_source
    refine_pseudo_labels(teacher(target), label, weight)  -> the label/weight the loop uses
        (before the source pass when pseudo_labels_first, else after it)
    source_losses(student(source), label)
    target_losses(student(aug target), label, weight)     if wants_student_target
    mixed_losses(student(aug mixed), label, weight)       after on_mix(mask)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

Outputs = dict[str, Tensor]
Losses = dict[str, Tensor]


class Method(nn.Module):
    name = "none"
    augment_source = False  # strong augmentation on the student's source image too
    # run the teacher on the target (and refine_pseudo_labels) before the student's source pass,
    # for methods whose source loss needs target information (BiPCL's target prototypes)
    pseudo_labels_first = False

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The network the loop trains; a method whose heads change the predictions returns a
        wrapper around ``model`` (must be idempotent: a wrapped model is returned as is)."""
        return model

    def start_step(self, source: dict[str, Any], target: dict[str, Any], it: int) -> None:
        """See the step's raw batches (e.g. to read depth maps named in their meta)."""

    def wants_teacher_source(self, it: int) -> bool:
        """Does this step need the teacher's outputs on the un-augmented source?"""
        return False

    def wants_student_target(self, it: int) -> bool:
        """Does this step need a student forward on the augmented target image?"""
        return False

    def update_state(self, teacher_source: Outputs, source_label: Tensor, it: int) -> None:
        """Update statistics/banks/prototypes from the teacher's source outputs (no grad)."""

    def refine_pseudo_labels(self, teacher_target: Outputs, label: Tensor, weight: Tensor,
                             it: int) -> tuple[Tensor, Tensor]:
        """Adjust the pseudo-labels [B, H, W] and weights [B, H, W] from the teacher's target
        outputs (``"logits"`` there are at image resolution). Runs under no_grad."""
        return label, weight

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        return {}

    def target_losses(self, out: Outputs, pseudo_label: Tensor, pseudo_weight: Tensor,
                      it: int) -> Losses:
        return {}

    def on_mix(self, mask: Tensor, it: int) -> None:
        """The ClassMix mask [B, H, W] (True: source pixel) of this step, before mixed_losses."""

    def mixed_losses(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                     it: int) -> Losses:
        return {}


def labels_at(labels: Tensor, feats: Tensor, *, num_classes: int, min_ratio: float,
              ignore_index: int = 255, backend: str = "auto") -> Tensor:
    """Labels [B, H, W] brought to the grid of ``feats`` [B, D, h, w] by majority vote
    (``ops.downscale_labels``); H and W must be the same multiple of h and w."""
    from .. import ops  # methods -> ops; imported here to keep this module light

    factor = labels.shape[-1] // feats.shape[-1]
    if factor < 1 or labels.shape[-2] != feats.shape[-2] * factor \
            or labels.shape[-1] != feats.shape[-1] * factor:
        raise ValueError(f"label size {tuple(labels.shape[-2:])} is not a multiple of the "
                         f"feature size {tuple(feats.shape[-2:])}")
    if factor == 1:
        return labels
    return ops.downscale_labels(labels, factor, num_classes=num_classes, min_ratio=min_ratio,
                                ignore_index=ignore_index, backend=backend)
