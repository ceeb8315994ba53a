"""What a method is: a small module that adds heads, losses and state to the shared loop.

The self-training loop (fastuda/methods/self_training.py) calls these hooks at fixed points of a
step; a method touches the model only through its dict of named outputs. Extra heads are submodules
(trained with the student at the head learning rate); statistics, banks and prototypes are part of
``state_dict`` so checkpoints capture them.
"""

from __future__ import annotations

from torch import Tensor, nn

Outputs = dict[str, Tensor]
Losses = dict[str, Tensor]


class Method(nn.Module):
    name = "none"
    augment_source = False  # strong augmentation on the student's source image too

    def wants_teacher_source(self, it: int) -> bool:
        """Does this step need the teacher's outputs on the un-augmented source?"""
        return False

    def wants_student_target(self, it: int) -> bool:
        """Does this step need a student forward on the augmented target image?"""
        return False

    def update_state(self, teacher_source: Outputs, source_label: Tensor, it: int) -> None:
        """Update statistics/banks/prototypes from the teacher's source outputs (no grad)."""

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        return {}

    def target_losses(self, out: Outputs, pseudo_label: Tensor, pseudo_weight: Tensor,
                      it: int) -> Losses:
        return {}

    def mixed_losses(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                     it: int) -> Losses:
        return {}
