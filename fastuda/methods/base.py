"""What a method is: a plug-in of the self-training loop (docs/architecture.md, "The method
contract"). A method adds losses at the loop's passes, passes of its own, pseudo-label
refinement, heads and state; it reads the model only through its named outputs
(fastuda/models/outputs.py) and the run through its ``MethodContext``.

A method is one module: the class (a subclass of ``Method``), its ``Settings`` dataclass (the
``[name]`` section of a config, validated in its ``__post_init__``; unknown keys are errors) and
its registration in fastuda/methods/__init__.py. Extra heads that only feed a loss are
submodules of the method (trained with the student at the head learning rate); heads that change
what the network predicts (CorDA's depth exchange) wrap the model instead (``wrap_model``), so
the teacher, checkpoints and evaluation see them too. Statistics, banks and prototypes are part
of ``state_dict`` so checkpoints capture them.

Order of the hooks in one step (fastuda/engine/self_training.py):
    start_step(view)                                      the raw batches (e.g. "depth")
    update_state(teacher(source), source label)           if wants_teacher_source
    pseudo_label_logits(it)                               which teacher output (default logits)
    fuse_pseudo_probs(teacher softmax, view, boxes, teacher_probs)  -> the map pseudo-labels
        are taken from (for the class-balanced crop's choice too); SePiCo's Dark Zurich variant
    refine_pseudo_labels(teacher(target), label, weight)  -> the label/weight the loop uses
        (before the source pass when any method has pseudo_labels_first, else after it)
    pass "src":  source_losses(student(source), label)
    pass "tgt":  target_losses(student(aug target), label, weight)   if wants_student_target
    pass "mix":  on_mix(mask), reweight_mixed(student(aug mixed), label, weight) [no grad],
                 then the loop's CE and mixed_losses(..., label, reweighted weight); the
                 student's HRDA detail box follows mixed_box_rule(it) (CLUDA's max entropy)
    the methods' own passes (extra_passes), in the order of ``methods``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ..engine.context import Losses, MethodContext, Outputs, Pass, StepView
from ..models import outputs as O

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class NoSettings:
    """The settings of a method without knobs."""


class Method(nn.Module):
    name: ClassVar[str]
    Settings: ClassVar[type] = NoSettings
    augment_source: ClassVar[bool] = False  # strong augmentation on the student's source image
    # run the teacher on the target (and refine_pseudo_labels) before the student's source pass,
    # for methods whose source loss needs target information (BiPCL's target prototypes)
    pseudo_labels_first: ClassVar[bool] = False
    # the method adapts through the EMA teacher's pseudo-labels: self_training.enabled must be on
    needs_self_training: ClassVar[bool] = False
    # what the training batches must carry for this method (the loaders read it: "depth")
    batch_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: Any, ctx: MethodContext) -> None:
        super().__init__()
        self.settings, self.ctx = settings, ctx

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError when the rest of the config cannot host this method (called while
        the config loads, before any work)."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The network the loop trains; a method whose heads change the predictions returns a
        wrapper around ``model`` (must be idempotent: a wrapped model is returned as is)."""
        return model

    def start_step(self, view: StepView) -> None:
        """See the step's raw batches (``view.source``, ``view.target``)."""

    def wants_teacher_source(self, it: int) -> bool:
        """Does this step need the teacher's outputs on the un-augmented source?"""
        return False

    def wants_student_target(self, it: int) -> bool:
        """Does this step need a student pass on the augmented target image ("tgt")?"""
        return False

    def update_state(self, teacher_source: Outputs, source_label: Tensor, it: int) -> None:
        """Update statistics/banks/prototypes from the teacher's source outputs (no grad)."""

    def pseudo_label_logits(self, it: int) -> str | None:
        """The teacher output (a key of fastuda/models/outputs.py) this step's pseudo-labels
        are made from; None: ``"logits"`` (CorDA: its initial head for the first iterations)."""
        return None
    def fuse_pseudo_probs(self, prob: Tensor, view: StepView,
                          boxes: list[tuple[int, int]] | None,
                          teacher_probs: Callable[[Tensor], Tensor]) -> Tensor:
        """The teacher's softmax [B, C, H, W] on the step's target images, before the
        pseudo-labels (argmax), their confidence (max) and the class-balanced crop's choice are
        taken from it. ``boxes``: the (top, left) of each image's class-balanced crop in the
        whole target image, None for the whole image; ``teacher_probs(images)``: the teacher's
        softmax on other images of that size (no grad). Runs under no_grad."""
        return prob

    def refine_pseudo_labels(self, teacher_target: Outputs, label: Tensor, weight: Tensor,
                             it: int) -> tuple[Tensor, Tensor]:
        """Adjust the pseudo-labels [B, H, W] and weights [B, H, W] from the teacher's target
        outputs (``"logits"`` there are at image resolution). Runs under no_grad."""
        return label, weight

    def source_logit_scale(self) -> float:
        """The loop's source CE is taken on ``logits / scale`` (SPCL's released ``/ 1.8``);
        1.0: the plain CE. Only the loop's CE sees it, not the methods' own source losses."""
        return 1.0

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        return {}

    def target_losses(self, out: Outputs, pseudo_label: Tensor, pseudo_weight: Tensor,
                      it: int) -> Losses:
        return {}

    def on_mix(self, mask: Tensor, it: int) -> None:
        """The ClassMix mask [B, H, W] (True: source pixel) of this step, before mixed_losses."""

    def reweight_mixed(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                       it: int) -> Tensor:
        """The mixed CE's pixel weights [B, H, W] from the student's outputs on the mixed image
        (CorDA's released depth-aware weight); runs under no_grad before the loop's mixed CE,
        which (and ``mixed_losses``) then uses the returned weights."""
        return mixed_weight

    def mixed_losses(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                     it: int) -> Losses:
        return {}

    def mixed_box_rule(self, it: int) -> str | None:
        """How HRDA chooses the student's detail box on this step's mixed image: a box rule of
        fastuda/models/hrda.py (``BOX_RULES``: CLUDA's ``"max_entropy"``); None: HRDA's random
        box. Only asked with HRDA."""
        return None

    def extra_passes(self, it: int) -> list[Pass]:
        """Student passes of this method's own this step (MIC's masked target), run after the
        loop's passes."""
        return []


def prefixed(name: str, losses: Losses) -> Losses:
    """A method's losses under its name: ``sepico.src.contrast`` (methods may share names)."""
    return {f"{name}.{k}": v for k, v in losses.items()}


class MethodStack(nn.Module):
    """The methods of a run, in config order, asked together by the loop; ``stack["sepico"]``
    is one of them. Its state_dict holds every method's state under the method's name."""

    def __init__(self, methods: list[Method], ctx: MethodContext) -> None:
        super().__init__()
        self.methods = nn.ModuleDict({m.name: m for m in methods})
        self.ctx = ctx

    def __getitem__(self, name: str) -> Method:
        return self.methods[name]

    def __iter__(self):  # noqa: ANN204
        return iter(self.methods.values())

    def __len__(self) -> int:
        return len(self.methods)

    @property
    def names(self) -> list[str]:
        return list(self.methods)

    @property
    def augment_source(self) -> bool:
        return any(m.augment_source for m in self)

    @property
    def pseudo_labels_first(self) -> bool:
        return any(m.pseudo_labels_first for m in self)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        for m in self:
            model = m.wrap_model(model)
        return model

    def start_step(self, view: StepView) -> None:
        for m in self:
            m.start_step(view)

    def wants_teacher_source(self, it: int) -> bool:
        return any(m.wants_teacher_source(it) for m in self)

    def wants_student_target(self, it: int) -> bool:
        return any(m.wants_student_target(it) for m in self)

    def update_state(self, teacher_source: Outputs, source_label: Tensor, it: int) -> None:
        for m in self:
            if m.wants_teacher_source(it):
                m.update_state(teacher_source, source_label, it)

    def pseudo_label_logits(self, it: int) -> str:
        """The teacher output the pseudo-labels come from: ``"logits"`` unless a method names
        another; two methods naming different ones is an error."""
        keys = {k for m in self if (k := m.pseudo_label_logits(it)) is not None}
        if len(keys) > 1:
            raise ValueError(f"methods {self.names} ask for pseudo-labels from different "
                             f"teacher outputs: {sorted(keys)}")
        return keys.pop() if keys else O.LOGITS
    def fuse_pseudo_probs(self, prob: Tensor, view: StepView,
                          boxes: list[tuple[int, int]] | None,
                          teacher_probs: Callable[[Tensor], Tensor]) -> Tensor:
        for m in self:
            prob = m.fuse_pseudo_probs(prob, view, boxes, teacher_probs)
        return prob

    def refine_pseudo_labels(self, teacher_target: Outputs, label: Tensor, weight: Tensor,
                             it: int) -> tuple[Tensor, Tensor]:
        for m in self:
            label, weight = m.refine_pseudo_labels(teacher_target, label, weight, it)
        return label, weight

    def source_logit_scale(self) -> float:
        """The product of the methods' scales (1.0 when none asks for one)."""
        scale = 1.0
        for m in self:
            scale *= m.source_logit_scale()
        return scale

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        losses: Losses = {}
        for m in self:
            losses.update(prefixed(m.name, m.source_losses(out, label, it)))
        return losses

    def target_losses(self, out: Outputs, pseudo_label: Tensor, pseudo_weight: Tensor,
                      it: int) -> Losses:
        losses: Losses = {}
        for m in self:
            if m.wants_student_target(it):
                losses.update(prefixed(m.name, m.target_losses(out, pseudo_label,
                                                               pseudo_weight, it)))
        return losses

    def on_mix(self, mask: Tensor, it: int) -> None:
        for m in self:
            m.on_mix(mask, it)

    def reweight_mixed(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                       it: int) -> Tensor:
        for m in self:
            mixed_weight = m.reweight_mixed(out, mixed_label, mixed_weight, it)
        return mixed_weight

    def mixed_losses(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                     it: int) -> Losses:
        losses: Losses = {}
        for m in self:
            losses.update(prefixed(m.name, m.mixed_losses(out, mixed_label, mixed_weight, it)))
        return losses

    def mixed_box_rule(self, it: int) -> str | None:
        """The one box rule the methods ask for on the mixed pass (None: HRDA's random box);
        two methods asking for different ones is an error."""
        rules = {r for m in self if (r := m.mixed_box_rule(it)) is not None}
        if len(rules) > 1:
            raise ValueError(f"methods {self.names} ask for different detail boxes on the "
                             f"mixed pass: {sorted(rules)}")
        return rules.pop() if rules else None

    def extra_passes(self, it: int) -> list[Pass]:
        passes = []
        for m in self:
            for p in m.extra_passes(it):
                def losses(out: Outputs, view: StepView, p: Pass = p, name: str = m.name
                           ) -> Losses:
                    return prefixed(name, p.losses(out, view))
                passes.append(Pass(f"{m.name}.{p.name}", p.images, losses,
                                   p.needs_pseudo_labels, p.box_rule))
        return passes


__all__ = ["Losses", "Method", "MethodStack", "NoSettings", "Outputs", "prefixed"]
