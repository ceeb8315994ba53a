"""The self-training loop (DAFormer/DACS lineage): EMA teacher, pseudo-labels, ClassMix, strong
augmentation, and the methods plugged into it (docs/architecture.md).

One step is an ordered list of passes; each is a student forward, its losses and one backward
(only one graph is alive at a time):
    teacher(source)           -> methods.update_state (statistics, banks)          [no grad]
    teacher(target)           -> pseudo-label, quality weight, refine_pseudo_labels [no grad]
                                 (before the first pass that needs them, or before "src" when a
                                 method asks for pseudo_labels_first)
    "src"   student(source)        -> CE + methods' source losses
    "tgt"   student(aug target)    -> methods' target losses       (when a method wants it)
    "mix"   student(aug ClassMix)  -> weighted CE + methods' mixed losses
    the methods' own passes, e.g. "mic.masked": student(masked aug target) -> weighted CE
    optimiser step -> teacher EMA
HRDA (``hrda.enabled``) changes one line of the step: the network is the multi-resolution
wrapper (fastuda/models/hrda.py), whose training forward draws the detail box from the step's
generator, or chooses it by the pass's ``box_rule`` when the methods set one (CLUDA's
maximum-entropy box on the mixed pass: the forward's one extra argument), and whose eval-mode
forward (the teacher) is the multi-resolution inference; the segmentation loss adds the detail
CE when the outputs carry a detail box. The teacher module stays in eval mode (HRDA's
inference, dropout and drop-path off); with ``self_training.teacher_norm = "batch"`` (the
release) only its BatchNorm layers run in train mode (``set_teacher_mode``).

Under DDP the gradients are all-reduced once per step: every pass but the last of the list runs
under ``no_sync()``, and the last one's all-reduce carries the gradients all of them accumulated.
A non-finite loss (decided alike on every rank) skips the rest of the step and its update.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, OptimConfig
from ..data import class_balanced_crop
from ..data.classes import IGNORE_INDEX
from ..methods.base import MethodStack
from ..models import outputs as O
from ..models.base import frozen_norm_layers
from .context import Losses, MethodContext, Outputs, Pass, StepView
from .distributed import all_ranks_true, average_grads
from .guard import guarded_step
from .losses import segmentation_losses, weighted_ce
from .profiling import StageTimer


# ----------------------------------------------------------------------------------------------
# Building blocks (pure functions: easy to test, easy to read)
# ----------------------------------------------------------------------------------------------
def ema_alpha(it: int, alpha: float) -> float:
    """a = min(1 - 1/(t+1), alpha): the teacher starts as a copy and slowly hardens."""
    return min(1.0 - 1.0 / (it + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, *,
               buffers: bool = True) -> None:
    """teacher <- a * teacher + (1 - a) * student, for the parameters and, with ``buffers``,
    the floating buffers (integer ones are copied).

    ``buffers=False`` is the release's update (parameters only, SePiCo sepico.py#L135-L144):
    a teacher whose BatchNorm normalises with batch statistics keeps the running statistics its
    own forwards accumulate."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, alpha)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - alpha)
    if not buffers:
        return
    for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
        if tb.dtype.is_floating_point:
            tb.mul_(alpha).add_(sb, alpha=1.0 - alpha)
        else:
            tb.copy_(sb)


def set_teacher_mode(teacher: nn.Module, norm: str) -> nn.Module:
    """The teacher's modes: eval (dropout and drop-path off; HRDA's eval-mode forward is its
    multi-resolution inference), and with ``norm == "batch"`` its BatchNorm layers (SyncBatchNorm
    too) in train mode, so they normalise with the statistics of the batch they see.

    That is the released teacher (SePiCo sepico.py#L244-L248, DAFormer dacs.py#L264-L268: the EMA
    model stays in train mode and only ``_DropoutNd`` and ``DropPath`` are switched off): BatchNorm
    is the only other layer kind whose train and eval modes differ. ``"running"``: all of it in
    eval mode (the EMA-averaged running statistics). The layers ``model.freeze_bn`` freezes in
    the student stay in eval mode here too: the teacher normalises as the student does."""
    teacher.eval()
    if norm == "batch":
        frozen = {id(m) for m in frozen_norm_layers(teacher)}
        for m in teacher.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in frozen:
                m.train()
    return teacher


@torch.no_grad()
def pseudo_label(logits: Tensor, threshold: float, ignore_top: int = 0, ignore_bottom: int = 0,
                 quality: str = "batch") -> tuple[Tensor, Tensor]:
    """Teacher logits [B, C, H, W] -> (label [B, H, W], weight [B, H, W]).

    ``quality == "batch"`` (the release): the weight is one scalar for the whole batch, the
    fraction of all its pixels (every row of every image) whose max probability reaches the
    threshold; the ignored top/bottom rows are zeroed afterwards (SePiCo sepico.py#L254-L256,
    #L283-L292; DAFormer dacs.py#L274-L286; HRDA dacs.py#L345-L362). ``"image"`` (fastuda before
    issue 13): one scalar per image, counting only the confident pixels outside the ignored
    rows."""
    return pseudo_label_from_probs(torch.softmax(logits.float(), dim=1), threshold, ignore_top,
                                   ignore_bottom, quality)


def pseudo_label_from_probs(prob: Tensor, threshold: float, ignore_top: int = 0,
                            ignore_bottom: int = 0, quality: str = "batch"
                            ) -> tuple[Tensor, Tensor]:
    """:func:`pseudo_label` from class scores [B, C, H, W] (the softmax, or a map a method
    fused from it: label = argmax, confidence = max)."""
    conf, label = prob.max(dim=1)
    confident = (conf >= threshold).float()
    if quality == "batch":
        q = confident.mean().expand(conf.shape[0])  # [B], the same value for every image
    else:
        if ignore_top:
            confident[:, :ignore_top] = 0
        if ignore_bottom:
            confident[:, -ignore_bottom:] = 0
        q = confident.flatten(1).mean(1)  # [B]
    weight = q[:, None, None].expand_as(conf).clone()
    if ignore_top:
        weight[:, :ignore_top] = 0
    if ignore_bottom:
        weight[:, -ignore_bottom:] = 0
    return label, weight


@torch.no_grad()
def classmix_masks(source_label: Tensor, generator: torch.Generator) -> Tensor:
    """Per image, half of the classes present in the source label (rounded up), as a [B, H, W]
    bool mask of the source pixels to paste."""
    masks = []
    for lbl in source_label:
        classes = torch.unique(lbl)
        classes = classes[classes != IGNORE_INDEX]
        n = classes.numel()
        chosen = classes[torch.randperm(n, generator=generator)[: (n + 1) // 2].to(lbl.device)]
        masks.append(torch.isin(lbl, chosen))
    return torch.stack(masks)


def pseudo_margin_mask(metas: list[dict], margins: list[int], crop_hw: tuple[int, int],
                       reference_hw: tuple[int, int] | None = None) -> Tensor:
    """HRDA's pseudo-label margins: [B, H, W] float, 0 where a crop pixel lies within
    (top, bottom, left, right) ``margins`` of its image's border, 1 elsewhere (and in padding).

    The margins are pixels of the image at ``reference_hw`` (the configured resize; None: the
    size the loader scaled it to); a crop of an image scaled otherwise gets them scaled alike.
    The crop comes from each sample's meta (scaled_size, crop_box, flip), as the label's does;
    the release builds this mask beside the label before the crop (CityscapesDataset with
    crop_pseudo_margins), so only crops at the image's periphery lose pixels."""
    top, bottom, left, right = margins
    out = torch.ones(len(metas), *crop_hw)
    for b, meta in enumerate(metas):
        sh, sw = meta["scaled_size"]
        ry, rx = (1.0, 1.0) if reference_hw is None else (sh / reference_hw[0],
                                                          sw / reference_hw[1])
        full = torch.ones(sh, sw)
        full[:round(top * ry)] = 0
        full[sh - round(bottom * ry):] = 0
        full[:, :round(left * rx)] = 0
        full[:, sw - round(right * rx):] = 0
        y, x, vh, vw = meta["crop_box"]
        window = full[y:y + vh, x:x + vw]
        out[b, :vh, :vw] = window.flip(-1) if meta["flip"] else window
    return out


def build_optimizer(o: OptimConfig, groups: list[dict], device: torch.device
                    ) -> torch.optim.Optimizer:
    """``optim.name``'s optimiser over ``groups`` (each with its own lr and weight decay).
    SGD is PyTorch's with momentum, dampening 0 and no Nesterov, as the DeepLab-V2 releases
    build it (SPCL train_ours.py#L75-L80, DASS trainer/damnet_trainer.py#L182-L187, CorDA
    trainUDA_gta.py#L344-L350)."""
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum,
                               weight_decay=o.weight_decay)
    if o.name == "adamw":
        fused = o.fused and (device.type == "cuda" or device.type == "cpu")
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas),
                                 weight_decay=o.weight_decay, fused=fused)
    raise ValueError(f"unknown optim.name {o.name!r}; expected 'adamw' or 'sgd'")


def lr_factor(it: int, max_iters: int, warmup_iters: int, power: float) -> float:
    """Poly decay with a linear warm-up (warm-up starts at 1e-6 of the poly value)."""
    poly = (1.0 - it / max_iters) ** power
    if it < warmup_iters:
        return poly * (1.0 - (1.0 - 1e-6) * (1.0 - it / warmup_iters))
    return poly


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    losses: dict[str, float]
    finite: bool


class SelfTraining:
    """Owns student, teacher, the methods, optimiser and scaler; ``step`` runs one iteration.
    The step's generator is the methods' context's (``methods.ctx.generator``)."""

    def __init__(self, cfg: Config, model: nn.Module, methods: MethodStack,
                 device: torch.device, *, ddp_model: nn.Module | None = None) -> None:
        self.cfg, self.device, self.methods = cfg, device, methods
        self.ctx: MethodContext = methods.ctx
        wrapped = methods.wrap_model(model)  # heads that change the predictions (CorDA)
        if wrapped is not model:
            if ddp_model is not None:
                raise ValueError(f"methods {methods.names} wrap the model; under DDP the wrapper "
                                 "must be built before DDP: pass methods.wrap_model(model) both "
                                 "as the model and inside the DDP module")
            model = wrapped.to(device)
        self.student = model  # the bare module (EMA, checkpoints)
        self.forward_student = ddp_model or model  # what computes gradients (DDP wrapper or not)
        self.distributed = ddp_model is not None
        self.teacher = set_teacher_mode(copy.deepcopy(model), cfg.self_training.teacher_norm)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        o = cfg.optim
        groups = model.param_groups(o.lr, o.head_lr_mult, o.weight_decay)
        # the methods' loss-only heads (CLUDA's pair-weight head in HRDA mode): outside DDP's
        # module, so their gradients are averaged over the ranks in step()
        extra = [p for p in methods.parameters() if p.requires_grad]
        self.method_params = extra
        if extra:
            groups.append({"params": extra, "lr": o.lr * o.head_lr_mult,
                           "weight_decay": o.weight_decay})
        for g in groups:
            g["initial_lr"] = g["lr"]
        self.optimizer = build_optimizer(o, groups, device)
        prec = cfg.train.precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
        self.scaler = torch.amp.GradScaler(device.type, enabled=prec == "fp16")
        self.generator = self.ctx.generator
        # HRDA's detail boxes come from this generator too (checkpointed with it; per rank)
        bind = getattr(self.student, "use_generator", None)
        if callable(bind):
            bind(self.generator)
        self.timer = StageTimer()  # enabled by fastuda.profile

    # -- helpers ------------------------------------------------------------------------------
    def autocast(self):  # noqa: ANN201
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _augment(self, images: Tensor) -> Tensor:
        with self.timer("augment"):
            return self.ctx.augment(images)

    def _seg_losses(self, prefix: str, out: Outputs, label: Tensor,
                    weight: Tensor | None = None) -> Losses:
        with self.timer("losses"):
            return self.ctx.segmentation_loss(prefix, out, label, weight)

    def _backward(self, losses: Losses, log: dict[str, float], *, out: Outputs,
                  synced: bool) -> bool:
        """Sum, check, backward; returns False (and does not backward) on a non-finite loss.
        ``log["loss"]`` accumulates the total of every loss of the step.

        Under DDP every rank takes the same decision (the finite flags are all-reduced), so all
        ranks run the same backward passes; and the ``synced`` (last) pass backpropagates even
        without a loss (zero times the logits): its backward is the step's one all-reduce."""
        total = sum(losses.values()) if losses else None
        if losses:
            values = {k: float(v.detach()) for k, v in losses.items()}
            log.update(values)
            log["loss"] = log.get("loss", 0.0) + sum(values.values())
        finite = total is None or math.isfinite(float(total.detach()))
        if self.distributed:
            finite = all_ranks_true(finite, self.device)
        if not finite:
            return False
        if total is None:
            if not (synced and self.distributed):
                return True
            total = 0.0 * out[O.LOGITS].float().sum()
        with self.timer("backward"):
            self.scaler.scale(total).backward()
        return True

    def _teacher_pseudo_labels(self, images: Tensor, view: StepView,
                               boxes: list[tuple[int, int]] | None = None
                               ) -> tuple[Tensor, Tensor, Outputs]:
        """(label, weight, teacher outputs with the logits upsampled to the image size). The
        label comes from the output the methods name (``pseudo_label_logits``: the logits, or
        CorDA's initial head early on), upsampled alike; the methods fuse its softmax first
        (``fuse_pseudo_probs``: SePiCo's Dark Zurich day/night fusion)."""
        st = self.cfg.self_training
        with torch.no_grad(), self.autocast():
            out = dict(self.teacher(images))
        key = self.methods.pseudo_label_logits(view.it)
        for k in dict.fromkeys((O.LOGITS, key)):
            out[k] = F.interpolate(out[k].float(), size=images.shape[-2:], mode="bilinear",
                                   align_corners=False)
        prob = torch.softmax(out[key], dim=1)
        with torch.no_grad():
            prob = self.methods.fuse_pseudo_probs(prob, view, boxes, self._teacher_probs)
        label, weight = pseudo_label_from_probs(prob, st.pseudo_threshold, st.ignore_top,
                                                st.ignore_bottom, st.quality_weight)
        return label, weight, out

    def _teacher_probs(self, images: Tensor) -> Tensor:
        """The teacher's softmax on ``images``, at their size (no grad)."""
        with torch.no_grad(), self.autocast():
            logits = self.teacher(images)[O.LOGITS]
        logits = F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear",
                               align_corners=False)
        return torch.softmax(logits, dim=1)

    def _make_pseudo_labels(self, view: StepView, log: dict[str, float]) -> None:
        """The step's target image, pseudo-label and pseudo-weight, refined by the methods."""
        st = self.cfg.self_training
        tgt_img = view.target["image"].to(self.device, non_blocking=True)
        with self.timer("pseudo_labels"):
            valid = None
            if st.pseudo_margins:
                resize = self.cfg.data.target.resize
                valid = pseudo_margin_mask(view.target["meta"], st.pseudo_margins,
                                           tuple(tgt_img.shape[-2:]),
                                           (resize[1], resize[0]) if resize else None)
                valid = valid.to(self.device)
            crop_logits, boxes = None, None
            if st.class_balanced_crop:
                tgt_img, valid, crop_logits, boxes = self._class_balanced_crop(tgt_img, view,
                                                                               valid)
            if crop_logits is None:
                plabel, pweight, teacher_out = self._teacher_pseudo_labels(tgt_img, view, boxes)
            else:  # class_balanced_crop_regen = false: the whole image's logits, cropped
                teacher_out = {O.LOGITS: crop_logits}
                plabel, pweight = pseudo_label(crop_logits, st.pseudo_threshold, st.ignore_top,
                                               st.ignore_bottom)
            if valid is not None:
                pweight = pweight * valid
            with torch.no_grad():
                plabel, pweight = self.methods.refine_pseudo_labels(teacher_out, plabel, pweight,
                                                                    view.it)
        view.target_image, view.pseudo_label, view.pseudo_weight = tgt_img, plabel, pweight
        log["pseudo.weight"] = float(pweight.mean())

    def _class_balanced_crop(self, images: Tensor, view: StepView, valid: Tensor | None = None
                             ) -> tuple[Tensor, Tensor | None, Tensor | None,
                                        list[tuple[int, int]]]:
        """SePiCo's target crop: score random windows of the whole image's pseudo-label map,
        keep the best per image; ``valid`` (the pseudo-label margins' mask) is cropped alike.
        Returns (crops, cropped mask, cropped teacher logits, the (top, left) of each crop):
        the logits are None with ``class_balanced_crop_regen`` (pseudo-labels are made again on
        the crop, as released). The windows are scored on the pseudo-labels of the methods'
        fused map (``fuse_pseudo_probs``: SePiCo's Dark Zurich crop is chosen on the day/night
        labels, sepico_dark.py#L332-L344)."""
        ch, cw = self.cfg.data.crop_size
        if images.shape[-2] < ch or images.shape[-1] < cw:
            raise ValueError(f"class-balanced crop {ch}x{cw} does not fit the target images "
                             f"{tuple(images.shape[-2:])}")
        label, _, out = self._teacher_pseudo_labels(images, view, None)
        key = self.methods.pseudo_label_logits(view.it)
        keep_logits = not self.cfg.self_training.class_balanced_crop_regen
        crops, masks, logits, boxes = [], [], [], []
        for b, (img, lbl) in enumerate(zip(images, label, strict=True)):
            top, left = class_balanced_crop(lbl.cpu(), (ch, cw), generator=self.generator)
            boxes.append((top, left))
            crops.append(img[:, top:top + ch, left:left + cw])
            if valid is not None:
                masks.append(valid[b, top:top + ch, left:left + cw])
            if keep_logits:
                logits.append(out[key][b, :, top:top + ch, left:left + cw])
        return (torch.stack(crops), (torch.stack(masks) if valid is not None else None),
                torch.stack(logits) if keep_logits else None, boxes)

    # -- the passes -------------------------------------------------------------------------
    def _source_images(self, view: StepView) -> Tensor:
        if self.methods.augment_source:
            return self._augment(view.source_image)
        return view.source_image

    def _source_losses(self, out: Outputs, view: StepView) -> Losses:
        scale = self.methods.source_logit_scale()
        ce_out = out
        if scale != 1.0:  # SPCL's released CE on logits / 1.8; the methods see the raw logits
            ce_out = {**out, **{k: out[k] / scale for k in (O.LOGITS, O.LOGITS_DETAIL)
                                if k in out}}
        losses = self._seg_losses("src", ce_out, view.source_label)
        with self.timer("method_losses"):
            losses.update(self.methods.source_losses(out, view.source_label, view.it))
        return losses

    def _target_images(self, view: StepView) -> Tensor:
        return self._augment(view.target_image)

    def _target_losses(self, out: Outputs, view: StepView) -> Losses:
        with self.timer("method_losses"):
            return self.methods.target_losses(out, view.pseudo_label, view.pseudo_weight,
                                              view.it)

    def _mixed_images(self, view: StepView) -> Tensor:
        with self.timer("mixing"):
            mask = classmix_masks(view.source_label, self.generator)
            m4 = mask[:, None].to(view.source_image.dtype)
            mixed = m4 * view.source_image + (1 - m4) * view.target_image
            view.mix_mask = mask
            view.mixed_label = torch.where(mask, view.source_label, view.pseudo_label)
            view.mixed_weight = torch.where(mask, torch.ones_like(view.pseudo_weight),
                                            view.pseudo_weight)
            self.methods.on_mix(mask, view.it)
        return self._augment(mixed)

    def _mixed_losses(self, out: Outputs, view: StepView) -> Losses:
        with torch.no_grad():  # weights from the student's mixed outputs (CorDA's depth weight)
            view.mixed_weight = self.methods.reweight_mixed(out, view.mixed_label,
                                                            view.mixed_weight, view.it)
        losses = self._seg_losses("mix", out, view.mixed_label, view.mixed_weight)
        with self.timer("method_losses"):
            losses.update(self.methods.mixed_losses(out, view.mixed_label, view.mixed_weight,
                                                    view.it))
        return losses

    def passes(self, it: int) -> list[Pass]:
        """This step's passes, in order; the last one all-reduces under DDP."""
        st = self.cfg.self_training
        plan = [Pass("src", self._source_images, self._source_losses, needs_pseudo_labels=False)]
        if not st.enabled:
            return plan
        if self.methods.wants_student_target(it):
            plan.append(Pass("tgt", self._target_images, self._target_losses))
        if st.mix == "classmix":
            rule = self.methods.mixed_box_rule(it) if self.cfg.hrda.enabled else None
            plan.append(Pass("mix", self._mixed_images, self._mixed_losses, box_rule=rule))
        return plan + self.methods.extra_passes(it)

    def _sync(self, last: bool):  # noqa: ANN202
        """DDP's ``no_sync()`` for every pass but the last (the forward decides whether its
        backward all-reduces, so the context covers forward and backward)."""
        if last or not self.distributed:
            return nullcontext()
        return self.forward_student.no_sync()

    def set_lr(self, it: int) -> float:
        o = self.cfg.optim
        # the poly horizon: optim.poly_iters, or the run's length
        f = lr_factor(it, o.poly_iters or self.cfg.train.max_iters, o.warmup_iters, o.poly_power)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    # -- one iteration ------------------------------------------------------------------------
    def _teacher_source(self, view: StepView, log: dict[str, float]) -> bool:
        """The teacher's source outputs into the methods' state; False if they are not finite
        (they would enter the running statistics for good: the step is skipped before)."""
        with self.timer("teacher_forward"), torch.no_grad(), self.autocast():
            teacher_src = self.teacher(view.source_image)
        checks = [torch.isfinite(v).all() for v in teacher_src.values()
                  if isinstance(v, Tensor) and v.is_floating_point()]
        finite = not checks or bool(torch.stack(checks).all())  # one host sync
        if self.distributed:
            finite = all_ranks_true(finite, self.device)
        if not finite:
            log["teacher.source"] = math.nan
            return False
        with self.timer("statistics"):
            self.methods.update_state(teacher_src, view.source_label, view.it)
        return True

    def step(self, source: dict, target: dict, it: int) -> StepResult:
        cfg, dev = self.cfg, self.device
        log: dict[str, float] = {"lr": self.set_lr(it)}
        self.student.train()
        # every step: an evaluation may have put the teacher's modules in another mode
        set_teacher_mode(self.teacher, cfg.self_training.teacher_norm)
        self.optimizer.zero_grad(set_to_none=True)
        view = StepView(it, source, target,
                        source_image=source["image"].to(dev, non_blocking=True),
                        source_label=source["label"].to(dev, non_blocking=True).long())
        self.methods.start_step(view)
        if self.methods.wants_teacher_source(it) and not self._teacher_source(view, log):
            return StepResult(log, finite=False)
        plan = self.passes(it)
        if cfg.self_training.enabled and self.methods.pseudo_labels_first:
            self._make_pseudo_labels(view, log)

        ok = True
        for i, p in enumerate(plan):
            if p.needs_pseudo_labels and view.pseudo_label is None:
                self._make_pseudo_labels(view, log)
            last = i == len(plan) - 1
            images = p.images(view)
            with self._sync(last):
                with self.timer("student_forward"), self.autocast():
                    if p.box_rule is None:
                        out = self.forward_student(images)
                    else:  # HRDA's box rule (CLUDA's maximum-entropy box on the mixed pass)
                        out = self.forward_student(images, box_rule=p.box_rule)
                losses = p.losses(out, view)
                ok = self._backward(losses, log, out=out, synced=last)
            del out, losses, images
            if not ok:
                break

        if not ok:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(log, finite=False)
        if self.method_params and self.forward_student is not self.student:
            average_grads(self.method_params)  # DDP averaged the student's
        with self.timer("optimizer"):
            # skipped on non-finite gradients; raises if the step made a parameter non-finite
            if not guarded_step(self.optimizer, self.scaler,
                                [*self.student.parameters(), *self.method_params],
                                cfg.optim.grad_clip):
                log["grad_norm"] = math.nan
                return StepResult(log, finite=False)
        if cfg.self_training.enabled:
            with self.timer("ema"):
                # the release updates at the start of iteration it + 1 with alpha(it + 1)
                t = it + 1 if cfg.self_training.ema_alpha_step == "next" else it
                ema_update(self.teacher, self.student, ema_alpha(t, cfg.self_training.ema_alpha),
                           buffers=cfg.self_training.teacher_norm == "running")
        return StepResult(log, finite=True)

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "methods": self.methods.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.methods.load_state_dict(state["methods"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])


__all__ = ["SelfTraining", "StepResult", "build_optimizer", "classmix_masks", "ema_alpha",
           "ema_update", "lr_factor", "pseudo_label", "pseudo_label_from_probs",
           "segmentation_losses", "set_teacher_mode",
           "weighted_ce"]
