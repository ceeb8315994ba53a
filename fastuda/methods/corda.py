"""CorDA: self-supervised depth estimation as an auxiliary task of domain adaptation.

Two formulations (``[corda] formulation``):

``"released"`` (default) is what qinenergy/corda (2904cc6) trains. The network (``CorDAModel``,
wrapping any fastuda model) reads the shared feature (``"features"``: DeepLab-V2 layer 4, 2048
channels). Per task (segmentation S, depth D) two residual Bottleneck blocks 2048 -> 256 (the
first with a 1x1-conv+BN shortcut) make the task features (model/deeplabv2_gta.py#L327-L364,
BottleneckPad #L128-L167). Initial predictions: S is the wrapped model's own classifier on the
shared feature (DeepLab-V2: ASPP on 2048 channels, Classifier_Module2048 #L169-L184, #L346; the
SYNTHIA release instead has a 1x1 conv on the segmentation task feature,
model/deeplabv2_synthia.py#L330, #L343: ``initial_seg_head = "task"``), D and D_src 1x1 convs on
the depth feature (#L348-L351). Cross-task exchange f_S += SA(f_D),
f_D += SA(f_S), SA(x) = conv(x) * sigmoid(conv'(x)), bias-free 3x3 convs (#L367-L388,
model/layers.py#L24-L35). Final predictions: ASPP heads on 256 channels for S, D and D_src
(#L111-L126, #L212-L215, #L264-L269). All are supervised (trainUDA_gta.py):
- source: CE(S) + CE(initial S) + 0.01 [BerHu(initial D_src) + BerHu(D_src)] (#L411-L416);
- mixed: CE(S) + CE(initial S) with the pixel weights + 0.001 [BerHu(D_mix) + BerHu(initial
  D_mix)], D_mix the ClassMix of the D_src head (pasted source pixels) and the D head (target
  pixels) against the ClassMix of the two depth maps (#L489-L509, #L528-L533);
- the pixel weights of the mixed CE (#L511-L523): the ClassMixed pseudo weights (1 on pasted
  pixels, q elsewhere) times w / mean(w), w = clip(relu(1 - |D_src - D| / d_mix) + 1e-3
  + [d_mix invalid], 0, 1) from the student's final D_src and D heads on the mixed image and the
  ground-truth mixed depth d_mix (invalid: the release's value 1, NaN here). The release
  multiplies the [B, H, W] pseudo weights by the [B, 1, H, W] depth weight, which broadcasts to
  [B, B, H, W]: every image's pixel gets the batch's mean depth weight at that position
  (#L523, #L529-L530, utils/loss.py#L40-L43); fastuda gives each image its own
  (``depth_weight_images = "batch_mean"`` restores the release);
- pseudo-labels from the teacher's initial S for the first 25 001 iterations, then from S
  (#L435-L439; ``initial_pseudo_iters``; trainUDA_synthia.py#L435 always uses S: 0).
The released ASPP returns inside its loop, so it sums only the dilation 6 and 12 branches
(#L122-L126, #L180-L184); fastuda sums all four (``aspp_dilations``; ``[6, 12]`` restores the
release: docs/recipes.md section 11).

``"fastuda"`` is fastuda's formulation before issue 13: task features by one 3x3 conv-BN-ReLU, SA
convs with bias, no initial predictions; an ASPP classifier on f_S and two 3x3 conv-BN-ReLU + 1x1
depth heads on f_D; BerHu of the D_src head on the source (0.01) and of the D head on the mixed
image against the mixed depth (0.001); pseudo-labels weighted by the teacher's two depth heads on
the target image, w = clip(relu(1 - |D_src - D| / d) + 1e-3, 0, 1) / mean (d:
``discrepancy_scale``, or |D| when 0).

BerHu(e) = e for e <= c, (e^2 + c^2) / (2c) above, c = 0.2 max e over the batch's valid pixels
(utils/loss.py#L168-L194). The depth maps come in the batches (``batch["depth"]``: the loaders
read them in their workers, cropped with the very geometry of the label, fastuda/data/depth.py);
CorDA asks for them with ``batch_keys``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, ConfigError, _check
from ..engine.context import MethodContext, StepView
from ..models import outputs as O
from ..models.base import SegModel
from ..models.heads import ASPPClassifier, ConvBNReLU
from .base import Losses, Method, Outputs


@dataclass
class CorDASettings:
    """``[corda]``: the network, depth losses and depth-aware weights; defaults are the
    release's (qinenergy/corda) with its ASPP and depth-weight broadcast fixed."""

    formulation: Literal["released", "fastuda"] = "released"
    channels: int = 256  # task features (released: 2048 -> 256)
    # "released": the initial S head: "model", the wrapped model's classifier on the shared
    # feature (GTA release); "task", a 1x1 conv on the segmentation task feature (SYNTHIA's)
    initial_seg_head: Literal["model", "task"] = "model"
    # dilations of every CorDA ASPP (the release computes [6, 12]: an early
    # return, see the module docstring)
    aspp_dilations: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    source_depth_weight: float = 0.01  # trainUDA_gta.py#L416
    mix_depth_weight: float = 0.001  # trainUDA_gta.py#L533
    berhu_ratio: float = 0.2  # c = ratio * max |error| (utils/loss.py#L182)
    depth_weighting: bool = True
    # "released": whose depth weight a mixed image's pixels get: "own" (the fix) or "batch_mean",
    # the mean over the batch's images at that pixel (the release's [B, B, H, W] broadcast)
    depth_weight_images: Literal["own", "batch_mean"] = "own"
    # "released": the teacher's pseudo-labels come from the initial S head while it < this
    # (trainUDA_gta.py#L435: i_iter < 25001); 0: always from S. Unused by "fastuda" (no initial
    # heads)
    initial_pseudo_iters: int = 25001
    # "fastuda" only: d of w = relu(1 - |D_src - D_tgt| / d); 0 means relative to |D_tgt|
    discrepancy_scale: float = 0.0

    def __post_init__(self) -> None:
        _check(self.channels >= 1, "corda.channels", self.channels, ">= 1")
        _check(len(self.aspp_dilations) >= 1 and all(d >= 1 for d in self.aspp_dilations)
               and len(set(self.aspp_dilations)) == len(self.aspp_dilations),
               "corda.aspp_dilations", self.aspp_dilations,
               "distinct dilations >= 1, e.g. [6, 12, 18, 24]; the release's [6, 12]")
        for key in ("source_depth_weight", "mix_depth_weight"):
            _check(getattr(self, key) >= 0, f"corda.{key}", getattr(self, key), ">= 0")
        _check(0 < self.berhu_ratio <= 1, "corda.berhu_ratio", self.berhu_ratio, "in (0, 1]")
        _check(self.formulation == "fastuda" or self.channels % 4 == 0, "corda.channels",
               self.channels, "a multiple of 4 with corda.formulation = 'released' (bottleneck "
               "blocks of channels / 4)")
        _check(self.initial_pseudo_iters >= 0, "corda.initial_pseudo_iters",
               self.initial_pseudo_iters, ">= 0")
        _check(self.discrepancy_scale >= 0, "corda.discrepancy_scale", self.discrepancy_scale,
               ">= 0 (0: relative to the target depth)")
        _check(self.formulation == "fastuda" or self.discrepancy_scale == 0,
               "corda.discrepancy_scale", self.discrepancy_scale,
               "0 with corda.formulation = 'released': the release divides by the ground-truth "
               "mixed depth")


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """SA(x) = conv(x) * sigmoid(conv'(x)): a gated 3x3 projection of the other task's feature
    (released: bias-free convs, model/layers.py#L28-L30)."""

    def __init__(self, channels: int, bias: bool = True) -> None:
        super().__init__()
        self.value = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.gate = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


class TaskBottleneck(nn.Module):
    """The release's BottleneckPad (model/deeplabv2_gta.py#L128-L167): 1x1 -> 3x3 -> 1x1 convs
    (bias-free, each with a trainable BatchNorm) to 4 x ``planes`` channels, plus the input or,
    with ``shortcut``, a 1x1 conv + BN of it (#L338-L340), then ReLU."""

    def __init__(self, in_channels: int, planes: int, shortcut: bool) -> None:
        super().__init__()
        out = 4 * planes
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = (nn.Sequential(nn.Conv2d(in_channels, out, 1, bias=False),
                                         nn.BatchNorm2d(out)) if shortcut else None)
        if not shortcut and in_channels != out:
            raise ValueError(f"an identity shortcut needs in_channels == 4 x planes, got "
                             f"{in_channels} and {out}")

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def task_block(in_channels: int, channels: int) -> nn.Sequential:
    """The release's task feature: two bottlenecks in_channels -> channels; the first has the
    1x1 conv + BN shortcut when the widths differ, an identity when they agree (#L338-L344)."""
    planes = channels // 4
    return nn.Sequential(TaskBottleneck(in_channels, planes, shortcut=in_channels != channels),
                         TaskBottleneck(channels, planes, shortcut=False))


def aspp_with_dilations(head: ASPPClassifier, dilations: list[int]) -> ASPPClassifier:
    """``head`` with the given dilations: the branches it has keep their weights, new ones are
    initialised as DeepLab-V2's (N(0, 0.01), zero bias)."""
    if list(head.dilations) == list(dilations):
        return head
    new = ASPPClassifier(head.in_channels, head.convs[0].out_channels, tuple(dilations))
    old = dict(zip(head.dilations, head.convs, strict=True))
    for d, conv in zip(new.dilations, new.convs, strict=True):
        if d in old:
            conv.load_state_dict(old[d].state_dict())
    return new.to(head.convs[0].weight.device)


class DepthHead(nn.Sequential):
    """fastuda formulation: 3x3 conv-BN-ReLU then a 1x1 conv to one channel of inverse depth."""

    def __init__(self, channels: int) -> None:
        super().__init__(ConvBNReLU(channels, channels, 3), nn.Conv2d(channels, 1, 1))


class CorDAModel(SegModel):
    """A fastuda model with CorDA's task features, cross-task exchange and heads
    (``formulation``: see the module docstring)."""

    def __init__(self, net: SegModel, num_classes: int, channels: int = 256,
                 formulation: str = "released",
                 aspp_dilations: tuple[int, ...] | list[int] = (6, 12, 18, 24),
                 initial_seg_head: str = "model") -> None:
        super().__init__(getattr(net, "channels_last", False))
        if formulation not in ("released", "fastuda"):
            raise ValueError(f"unknown CorDA formulation {formulation!r}")
        self.formulation = formulation
        dilations = list(aspp_dilations)
        released = formulation == "released"
        # the initial S of the release is the model's own classifier on the shared feature;
        # its ASPP gets the same dilations as CorDA's (Classifier_Module2048 has the same bug)
        if released and initial_seg_head == "model" \
                and isinstance(getattr(net, "decode_head", None), ASPPClassifier):
            net.decode_head = aspp_with_dilations(net.decode_head, dilations)
        self.net = net
        width = net.feature_channels
        if released:
            self.seg_task = task_block(width, channels)
            self.depth_task = task_block(width, channels)
            self.initial_seg = (nn.Conv2d(channels, num_classes, 1)
                                if initial_seg_head == "task" else None)
            self.initial_depth_source = nn.Conv2d(channels, 1, 1)
            self.initial_depth_target = nn.Conv2d(channels, 1, 1)
            self.depth_to_seg = SelfAttention(channels, bias=False)
            self.seg_to_depth = SelfAttention(channels, bias=False)
            self.depth_source = ASPPClassifier(channels, 1, tuple(dilations))
            self.depth_target = ASPPClassifier(channels, 1, tuple(dilations))
        else:
            self.seg_task = ConvBNReLU(width, channels, 3)
            self.depth_task = ConvBNReLU(width, channels, 3)
            self.depth_to_seg = SelfAttention(channels)
            self.seg_to_depth = SelfAttention(channels)
            # this order of construction keeps the draws of its initialisation as before
            self.classifier = ASPPClassifier(channels, num_classes, tuple(dilations))
            self.depth_source = DepthHead(channels)
            self.depth_target = DepthHead(channels)
        if released:
            self.classifier = ASPPClassifier(channels, num_classes, tuple(dilations))
        if released:  # the release's init of every conv, BN weight 1, bias 0 (#L218-L224)
            for name, m in self.named_modules():
                if name.startswith("net"):
                    continue
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0.0, 0.01)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        self.output_stride = net.output_stride
        self.embed_dim = getattr(net, "embed_dim", 0)
        self.num_classes = num_classes
        self.feature_channels = channels

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = dict(self.net(images))
        shared = out[O.FEATURES]
        f_seg, f_depth = self.seg_task(shared), self.depth_task(shared)
        if self.formulation == "released":
            out[O.LOGITS_INITIAL] = (out[O.LOGITS] if self.initial_seg is None
                                     else self.initial_seg(f_seg))
            out[O.DEPTH_SOURCE_INITIAL] = self.initial_depth_source(f_depth)[:, 0]
            out[O.DEPTH_TARGET_INITIAL] = self.initial_depth_target(f_depth)[:, 0]
        f_seg, f_depth = f_seg + self.depth_to_seg(f_depth), f_depth + self.seg_to_depth(f_seg)
        out[O.LOGITS] = self.classifier(f_seg)
        out[O.FEATURES] = f_seg
        out[O.DEPTH_SOURCE] = self.depth_source(f_depth)[:, 0]
        out[O.DEPTH_TARGET] = self.depth_target(f_depth)[:, 0]
        return out

    def backbone_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"net.{n}", p) for n, p in self.net.backbone_parameters()]

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
        """The wrapped model's groups, plus CorDA's heads at the head learning rate."""
        groups = self.net.param_groups(lr, head_lr_mult, weight_decay)
        heads = [p for n, p in self.named_parameters()
                 if not n.startswith("net.") and p.requires_grad]
        # optim.no_decay (fastuda/models/base.py): "mmseg" decays every head parameter (CorDA's
        # release decays all its SGD groups), "1d" exempts the 1-D ones
        one_d = self.net.no_decay == "1d"
        for no_decay in (False, True):
            params = [p for p in heads if (one_d and p.ndim <= 1) == no_decay]
            if params:
                groups.append({"params": params, "lr": lr * head_lr_mult,
                               "lr_mult": head_lr_mult,
                               "weight_decay": 0.0 if no_decay else weight_decay,
                               "name": "corda" + ("_no_decay" if no_decay else "")})
        return groups


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def berhu_loss(pred: Tensor, target: Tensor, ratio: float = 0.2) -> Tensor:
    """Mean reverse Huber over the pixels with a finite target (NaN marks invalid ones):
    e for e <= c, (e^2 + c^2) / (2c) above, c = ratio * max e (a constant of the step)."""
    pred = pred.float()
    if pred.shape[-2:] != target.shape[-2:]:
        pred = F.interpolate(pred[:, None], size=target.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
    valid = torch.isfinite(target)
    err = (pred - torch.where(valid, target, pred.detach())).abs()  # 0 where invalid
    if not bool(valid.any()):
        return pred.sum() * 0.0
    c = ratio * err.detach().max()
    if float(c) == 0.0:
        return err.sum() / valid.sum()
    loss = torch.where(err <= c, err, (err * err + c * c) / (2 * c))
    return (loss * valid).sum() / valid.sum()


@torch.no_grad()
def depth_weight(depth_source: Tensor, depth_target: Tensor, scale: float = 0.0,
                 eps: float = 1e-6) -> Tensor:
    """fastuda formulation: w = clip(relu(1 - |D_src - D_tgt| / d) + 1e-3, 0, 1), d = scale or
    |D_tgt| when 0, divided by its mean over the batch."""
    diff = (depth_source.float() - depth_target.float()).abs()
    d = depth_target.float().abs().clamp_min(eps) if scale == 0 else scale
    w = (torch.relu(1 - diff / d) + 1e-3).clamp(0, 1)
    return w / w.mean()


@torch.no_grad()
def released_depth_weight(depth_source: Tensor, depth_target: Tensor, depth: Tensor) -> Tensor:
    """The release's depth-aware weight (trainUDA_gta.py#L513-L516, #L523), before the pseudo
    weights: w = clip(relu(1 - |D_src - D_tgt| / depth) + 1e-3 + [depth invalid], 0, 1),
    divided by its mean over the batch. ``depth_source``/``depth_target`` are the student's two
    heads on the mixed image, ``depth`` the ground-truth mixed depth, all [B, H, W]; invalid
    depth (NaN here, the value 1 in the release) gives w = 1. Depth 0 (the synthetic pair's sky,
    infinitely far; the release's depths are >= 1) counts as an unbounded discrepancy."""
    diff = (depth_source.float() - depth_target.float()).abs()
    valid = torch.isfinite(depth)
    ratio = torch.where(valid & (depth > 0), diff / torch.where(depth > 0, depth, 1.0),
                        torch.full_like(diff, float("inf")))
    score = torch.relu(1.0 - ratio) + 1e-3
    w = (score + (~valid).float()).clamp(0.0, 1.0)
    return w / w.mean()


def _up(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """[B, h, w] -> [B, H, W] bilinear (the release upsamples every prediction to the crop)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.float()
    return F.interpolate(x.float()[:, None], size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


class CorDA(Method):
    name = "corda"
    Settings = CorDASettings
    needs_self_training = True
    batch_keys = ("depth",)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.self_training.class_balanced_crop:
            raise ConfigError("methods = [..., 'corda'] reads depth crops made by the loader: "
                              "set self_training.class_balanced_crop = false")
        if cfg.hrda.enabled:
            raise ConfigError("invalid value for hrda.enabled: True (expected false with "
                              "methods = [..., 'corda']: CorDA wraps the model with its own "
                              "heads)")

    def __init__(self, settings: CorDASettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.num_classes = ctx.num_classes
        self.released = settings.formulation == "released"
        self._depth: dict[str, Tensor] = {}  # this step's depth maps: source, target, mixed
        self._mask: Tensor | None = None  # this step's ClassMix mask

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if isinstance(model, CorDAModel):
            return model
        s = self.settings
        return CorDAModel(model, self.num_classes, s.channels, s.formulation, s.aspp_dilations,
                          s.initial_seg_head)

    def start_step(self, view: StepView) -> None:
        for key, batch in (("source", view.source), ("target", view.target)):
            if "depth" not in batch:
                raise RuntimeError(f"CorDA: the {key} batch has no depth maps; the loaders add "
                                   "them when built with depth=True (fastuda.train does for "
                                   "methods whose batch_keys name 'depth')")
        self._depth = {"source": view.source["depth"], "target": view.target["depth"]}
        self._mask = None

    def _map(self, key: str, like: Tensor) -> Tensor:
        """This step's ``key`` depth map on the device of ``like`` (moved there once)."""
        if key not in self._depth:
            raise RuntimeError(f"CorDA: no {key} depth for this step (start_step takes it from "
                               "the batch)")
        if self._depth[key].device != like.device:
            self._depth[key] = self._depth[key].to(like.device, non_blocking=True)
        return self._depth[key]

    def _berhu(self, pred: Tensor, target: Tensor) -> Tensor:
        return berhu_loss(pred, target, self.settings.berhu_ratio)

    def pseudo_label_logits(self, it: int) -> str | None:
        # trainUDA_gta.py#L435-L439: the initial head's pseudo-labels while i_iter < 25001
        if self.released and it < self.settings.initial_pseudo_iters:
            return O.LOGITS_INITIAL
        return None

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        s = self.settings
        losses: Losses = {}
        if self.released:  # trainUDA_gta.py#L411-L416: the loop's CE(S) + CE(initial S) + ...
            ce = self.ctx.segmentation_loss("src", {O.LOGITS: out[O.LOGITS_INITIAL]}, label)
            losses["src.ce_initial"] = ce["src.ce"]
        if s.source_depth_weight == 0:
            return losses
        target = self._map("source", out[O.DEPTH_SOURCE])
        losses["src.depth"] = s.source_depth_weight * self._berhu(out[O.DEPTH_SOURCE], target)
        if self.released:
            losses["src.depth_initial"] = s.source_depth_weight * self._berhu(
                out[O.DEPTH_SOURCE_INITIAL], target)
        return losses

    def refine_pseudo_labels(self, teacher_target: Outputs, label: Tensor, weight: Tensor,
                             it: int) -> tuple[Tensor, Tensor]:
        if self.released or not self.settings.depth_weighting:
            return label, weight  # the released weight reads the student's mixed outputs
        w = depth_weight(teacher_target[O.DEPTH_SOURCE], teacher_target[O.DEPTH_TARGET],
                         self.settings.discrepancy_scale)
        w = F.interpolate(w[:, None], size=label.shape[-2:], mode="bilinear",
                          align_corners=False)[:, 0]
        return label, weight * w

    def on_mix(self, mask: Tensor, it: int) -> None:
        src, tgt = self._map("source", mask), self._map("target", mask)
        self._depth["mixed"] = torch.where(mask, src, tgt)
        self._mask = mask

    def reweight_mixed(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                       it: int) -> Tensor:
        if not (self.released and self.settings.depth_weighting):
            return mixed_weight
        depth = self._map("mixed", mixed_weight)
        size = depth.shape[-2:]
        w = released_depth_weight(_up(out[O.DEPTH_SOURCE], size), _up(out[O.DEPTH_TARGET], size),
                                  depth)
        if self.settings.depth_weight_images == "batch_mean":
            # mean_ij(ce_j pw_j w_i) = mean_j(ce_j pw_j mean_i(w_i)): the release's broadcast
            w = w.mean(0, keepdim=True).expand_as(w)
        return mixed_weight * w

    def _mixed_depth(self, out: Outputs, source_key: str, target_key: str, size: torch.Size
                     ) -> Tensor:
        """The ClassMix of the source head (pasted pixels) and the target head (the rest)."""
        if self._mask is None:
            raise RuntimeError("CorDA: no ClassMix mask for this step (on_mix sets it)")
        return torch.where(self._mask, _up(out[source_key], size), _up(out[target_key], size))

    def mixed_losses(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                     it: int) -> Losses:
        s = self.settings
        losses: Losses = {}
        if self.released:  # trainUDA_gta.py#L529-L530: the same labels and pixel weights
            ce = self.ctx.segmentation_loss("mix", {O.LOGITS: out[O.LOGITS_INITIAL]},
                                            mixed_label, mixed_weight)
            losses["mix.ce_initial"] = ce["mix.ce"]
        if s.mix_depth_weight == 0:
            return losses
        target = self._map("mixed", out[O.DEPTH_TARGET])
        if not self.released:
            losses["mix.depth"] = s.mix_depth_weight * self._berhu(out[O.DEPTH_TARGET], target)
            return losses
        size = target.shape[-2:]  # trainUDA_gta.py#L495-L509, #L531-L533
        final = self._mixed_depth(out, O.DEPTH_SOURCE, O.DEPTH_TARGET, size)
        initial = self._mixed_depth(out, O.DEPTH_SOURCE_INITIAL, O.DEPTH_TARGET_INITIAL, size)
        losses["mix.depth"] = s.mix_depth_weight * self._berhu(final, target)
        losses["mix.depth_initial"] = s.mix_depth_weight * self._berhu(initial, target)
        return losses


__all__ = ["CorDA", "CorDAModel", "CorDASettings", "DepthHead", "SelfAttention", "TaskBottleneck",
           "aspp_with_dilations", "berhu_loss", "depth_weight", "released_depth_weight",
           "task_block"]
