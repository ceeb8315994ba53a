"""The shared self-training step (DAFormer/DACS lineage): EMA teacher, pseudo-labels, ClassMix,
strong augmentation, and the hooks where a method adds its losses.

One step, as data flows (methods.md):
    teacher(source)           -> method.update_state (statistics, banks)      [no grad]
    student(source)           -> CE + method.source_losses                    -> backward
    teacher(target)           -> pseudo-label, quality weight, method.refine_pseudo_labels
                                 (before the source pass for methods that ask) [no grad]
    student(aug target)       -> method.target_losses                         -> backward
    ClassMix(source, target)  -> student(aug mixed) -> weighted CE + method.mixed_losses -> backward
    optimiser step -> teacher EMA
HRDA (``hrda.enabled``) changes no line of the step: the model is the multi-resolution wrapper
(fastuda/models/hrda.py), whose training forward draws the detail box from the loop's generator
and whose eval-mode forward (the teacher) is the multi-resolution inference; ``segmentation_losses``
adds the detail CE when the outputs carry a detail box.
Each forward is followed by its own backward, so only one graph is alive at a time. Under DDP
the gradients are all-reduced once per step: every pass but the last runs under ``no_sync()``
and the last one's all-reduce carries the gradients accumulated by all of them.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..data import class_balanced_crop, strong_augment
from ..engine.distributed import all_ranks_true, average_grads
from ..engine.guard import guarded_step
from ..engine.profiling import StageTimer
from .base import Method

IGNORE = 255


# ----------------------------------------------------------------------------------------------
# Building blocks (pure functions: easy to test, easy to read)
# ----------------------------------------------------------------------------------------------
def ema_alpha(it: int, alpha: float) -> float:
    """a = min(1 - 1/(t+1), alpha): the teacher starts as a copy and slowly hardens."""
    return min(1.0 - 1.0 / (it + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """teacher <- a * teacher + (1 - a) * student, for parameters and floating buffers."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, alpha)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - alpha)
    for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
        if tb.dtype.is_floating_point:
            tb.mul_(alpha).add_(sb, alpha=1.0 - alpha)
        else:
            tb.copy_(sb)


@torch.no_grad()
def pseudo_label(logits: Tensor, threshold: float, ignore_top: int = 0, ignore_bottom: int = 0
                 ) -> tuple[Tensor, Tensor]:
    """Teacher logits [B, C, H, W] -> (label [B, H, W], weight [B, H, W]).

    The weight is one scalar per image, the fraction of pixels whose max probability reaches the
    threshold, zeroed in the ignored top/bottom rows."""
    prob = torch.softmax(logits.float(), dim=1)
    conf, label = prob.max(dim=1)
    confident = (conf >= threshold).float()
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
        classes = classes[classes != IGNORE]
        n = classes.numel()
        chosen = classes[torch.randperm(n, generator=generator)[: (n + 1) // 2].to(lbl.device)]
        masks.append(torch.isin(lbl, chosen))
    return torch.stack(masks)


def weighted_ce(logits: Tensor, label: Tensor, weight: Tensor | None = None) -> Tensor:
    """Pixel-wise CE (ignore 255) times the pixel weight, averaged over all pixels (DACS)."""
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear",
                           align_corners=False)
    if weight is None:
        return F.cross_entropy(logits, label.long(), ignore_index=IGNORE)
    ce = F.cross_entropy(logits, label.long(), ignore_index=IGNORE, reduction="none")
    return (ce * weight).mean()


def segmentation_losses(prefix: str, out: dict[str, Tensor], label: Tensor,
                        weight: Tensor | None = None, *, detail_weight: float = 0.0
                        ) -> dict[str, Tensor]:
    """``{prefix}.ce``: weighted CE of ``out["logits"]``; with HRDA outputs (a ``detail_box``) also
    ``{prefix}.ce_detail``: detail_weight x weighted CE of ``out["logits_detail"]`` on the label
    (and weight) cropped to the box, averaged over the box's pixels."""
    losses = {f"{prefix}.ce": weighted_ce(out["logits"], label, weight)}
    if "detail_box" in out and detail_weight > 0:
        y1, y2, x1, x2 = (int(v) for v in out["detail_box"])
        w = None if weight is None else weight[:, y1:y2, x1:x2]
        losses[f"{prefix}.ce_detail"] = detail_weight * weighted_ce(
            out["logits_detail"], label[:, y1:y2, x1:x2], w)
    return losses


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
    """Owns student, teacher, method, optimiser and scaler; ``step`` runs one iteration."""

    def __init__(self, cfg: Config, model: nn.Module, method: Method, device: torch.device,
                 *, ddp_model: nn.Module | None = None) -> None:
        self.cfg, self.device, self.method = cfg, device, method
        wrapped = method.wrap_model(model)  # heads that change the predictions (CorDA)
        if wrapped is not model:
            if ddp_model is not None:
                raise ValueError(f"method {method.name!r} wraps the model; under DDP the wrapper "
                                 "must be built before DDP: pass method.wrap_model(model) both "
                                 "as the model and inside the DDP module")
            model = wrapped.to(device)
        self.student = model  # the bare module (EMA, checkpoints)
        self.forward_student = ddp_model or model  # what computes gradients (DDP wrapper or not)
        self.distributed = ddp_model is not None
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        o = cfg.optim
        groups = model.param_groups(o.lr, o.head_lr_mult, o.weight_decay)
        # a method's loss-only heads (CLUDA's pair-weight head in HRDA mode): outside DDP's
        # module, so their gradients are averaged over the ranks in step()
        extra = [p for p in method.parameters() if p.requires_grad]
        self.method_params = extra
        if extra:
            groups.append({"params": extra, "lr": o.lr * o.head_lr_mult,
                           "weight_decay": o.weight_decay})
        for g in groups:
            g["initial_lr"] = g["lr"]
        fused = o.fused and (device.type == "cuda" or device.type == "cpu")
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay, fused=fused)
        prec = cfg.train.precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
        self.scaler = torch.amp.GradScaler(device.type, enabled=prec == "fp16")
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        # HRDA's detail boxes come from this generator too (checkpointed with it; per rank)
        bind = getattr(self.student, "use_generator", None)
        if callable(bind):
            bind(self.generator)
        self.data_mean, self.data_std = cfg.data.mean, cfg.data.std
        self.timer = StageTimer()  # enabled by fastuda.profile

    # -- helpers ------------------------------------------------------------------------------
    def autocast(self):  # noqa: ANN201
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _augment(self, images: Tensor) -> Tensor:
        st = self.cfg.self_training
        return strong_augment(images, mean=self.data_mean, std=self.data_std,
                              generator=self.generator, jitter_strength=st.color_jitter_strength,
                              jitter_prob=st.color_jitter_prob, blur_prob=st.blur_prob,
                              blur_sigma=tuple(st.blur_sigma))

    def _seg_losses(self, prefix: str, out: dict[str, Tensor], label: Tensor,
                    weight: Tensor | None = None) -> dict[str, Tensor]:
        return segmentation_losses(prefix, out, label, weight,
                                   detail_weight=self.cfg.hrda.detail_loss_weight)

    def _backward(self, losses: dict[str, Tensor], log: dict[str, float], *,
                  out: dict[str, Tensor] | None = None, synced: bool = False) -> bool:
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
            if not (synced and self.distributed and out is not None):
                return True
            total = 0.0 * out["logits"].float().sum()
        with self.timer("backward"):
            self.scaler.scale(total).backward()
        return True

    def _pseudo_label(self, images: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(label, weight, teacher outputs with "logits" upsampled to the image size)."""
        st = self.cfg.self_training
        with torch.no_grad(), self.autocast():
            out = dict(self.teacher(images))
        out["logits"] = F.interpolate(out["logits"].float(), size=images.shape[-2:],
                                      mode="bilinear", align_corners=False)
        label, weight = pseudo_label(out["logits"], st.pseudo_threshold, st.ignore_top,
                                     st.ignore_bottom)
        return label, weight, out

    def _target_pseudo_labels(self, target: dict, it: int, log: dict[str, float]
                              ) -> tuple[Tensor, Tensor, Tensor]:
        """(target image, pseudo-label, pseudo-weight) of this step, refined by the method."""
        tgt_img = target["image"].to(self.device, non_blocking=True)
        with self.timer("pseudo_labels"):
            if self.cfg.self_training.class_balanced_crop:
                tgt_img = self._class_balanced_crop(tgt_img)
            plabel, pweight, teacher_out = self._pseudo_label(tgt_img)
            with torch.no_grad():
                plabel, pweight = self.method.refine_pseudo_labels(teacher_out, plabel, pweight,
                                                                   it)
        log["pseudo.weight"] = float(pweight.mean())
        return tgt_img, plabel, pweight

    def _class_balanced_crop(self, images: Tensor) -> Tensor:
        """SePiCo's target crop: score random windows of the whole image's pseudo-label map,
        keep the best per image (pseudo-labels are then made again on the crop)."""
        ch, cw = self.cfg.data.crop_size
        if images.shape[-2] < ch or images.shape[-1] < cw:
            raise ValueError(f"class-balanced crop {ch}x{cw} does not fit the target images "
                             f"{tuple(images.shape[-2:])}")
        label, _, _ = self._pseudo_label(images)
        crops = []
        for img, lbl in zip(images, label, strict=True):
            top, left = class_balanced_crop(lbl.cpu(), (ch, cw), generator=self.generator)
            crops.append(img[:, top:top + ch, left:left + cw])
        return torch.stack(crops)

    def _last_pass(self, it: int) -> str:
        """The last student pass of this step ("source", "target" or "mix"): the one whose
        backward all-reduces the gradients under DDP."""
        st = self.cfg.self_training
        if st.enabled and st.mix == "classmix":
            return "mix"
        if st.enabled and self.method.wants_student_target(it):
            return "target"
        return "source"

    def _sync(self, name: str, last: str):  # noqa: ANN202
        """DDP's ``no_sync()`` for every pass but the last (the forward decides whether its
        backward all-reduces, so the context covers forward and backward)."""
        if name == last or not self.distributed:
            return nullcontext()
        return self.forward_student.no_sync()

    def set_lr(self, it: int) -> float:
        o = self.cfg.optim
        f = lr_factor(it, self.cfg.train.max_iters, o.warmup_iters, o.poly_power)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    # -- one iteration ------------------------------------------------------------------------
    def step(self, source: dict, target: dict, it: int) -> StepResult:
        cfg, st, method = self.cfg, self.cfg.self_training, self.method
        dev = self.device
        log: dict[str, float] = {"lr": self.set_lr(it)}
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        src_img = source["image"].to(dev, non_blocking=True)
        src_lbl = source["label"].to(dev, non_blocking=True).long()
        ok = True
        method.start_step(source, target, it)
        last = self._last_pass(it)

        if method.wants_teacher_source(it):
            with self.timer("teacher_forward"), torch.no_grad(), self.autocast():
                teacher_src = self.teacher(src_img)
            # a non-finite teacher output would enter the running statistics for good: skip
            # the step before they see it (on every rank alike)
            checks = [torch.isfinite(v).all() for v in teacher_src.values()
                      if isinstance(v, Tensor) and v.is_floating_point()]
            finite = not checks or bool(torch.stack(checks).all())  # one host sync
            if self.distributed:
                finite = all_ranks_true(finite, self.device)
            if not finite:
                log["teacher.source"] = math.nan
                return StepResult(log, finite=False)
            with self.timer("statistics"):
                method.update_state(teacher_src, src_lbl, it)

        tgt_img = plabel = pweight = None
        if st.enabled and method.pseudo_labels_first:
            tgt_img, plabel, pweight = self._target_pseudo_labels(target, it, log)

        # source: supervised CE + the method's source losses
        with self.timer("augment"):
            student_src = self._augment(src_img) if method.augment_source else src_img
        with self._sync("source", last):
            with self.timer("student_forward"), self.autocast():
                out = self.forward_student(student_src)
            with self.timer("losses"):
                losses = self._seg_losses("src", out, src_lbl)
            with self.timer("method_losses"):
                losses.update(method.source_losses(out, src_lbl, it))
            ok &= self._backward(losses, log, out=out, synced=last == "source")
        del out, losses

        if st.enabled and ok:
            if plabel is None:
                tgt_img, plabel, pweight = self._target_pseudo_labels(target, it, log)

            if method.wants_student_target(it):
                with self.timer("augment"):
                    aug_tgt = self._augment(tgt_img)
                with self._sync("target", last):
                    with self.timer("student_forward"), self.autocast():
                        out = self.forward_student(aug_tgt)
                    with self.timer("method_losses"):
                        losses = method.target_losses(out, plabel, pweight, it)
                    ok &= self._backward(losses, log, out=out, synced=last == "target")
                del out, losses

            if st.mix == "classmix" and ok:
                with self.timer("mixing"):
                    mask = classmix_masks(src_lbl, self.generator)
                    m4 = mask[:, None].to(src_img.dtype)
                    mixed_img = self._augment(m4 * src_img + (1 - m4) * tgt_img)
                    mixed_lbl = torch.where(mask, src_lbl, plabel)
                    mixed_w = torch.where(mask, torch.ones_like(pweight), pweight)
                    method.on_mix(mask, it)
                with self.timer("student_forward"), self.autocast():
                    out = self.forward_student(mixed_img)
                with self.timer("losses"):
                    losses = self._seg_losses("mix", out, mixed_lbl, mixed_w)
                with self.timer("method_losses"):
                    losses.update(method.mixed_losses(out, mixed_lbl, mixed_w, it))
                ok &= self._backward(losses, log, out=out, synced=True)
                del out, losses

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
        if st.enabled:
            with self.timer("ema"):
                ema_update(self.teacher, self.student, ema_alpha(it, st.ema_alpha))
        return StepResult(log, finite=True)

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
