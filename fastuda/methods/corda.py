"""CorDA: self-supervised depth estimation as an auxiliary task of domain adaptation.

The network (``CorDAModel``, wrapping any fastuda model) splits the shared features (the map the
classifier reads, ``"features"``: DeepLab-V2 layer 4, 2048 channels) into a segmentation and a
depth task feature (3x3 conv-BN-ReLU each, -> 256 channels), exchanges information between them
(f_S += SA(f_D), f_D += SA(f_S), SA(x) = conv(x) * sigmoid(conv(x))) and predicts from them:
segmentation logits (an ASPP classifier on f_S; they replace the wrapped model's logits), and
inverse depth with two heads on f_D, one for each domain's kind of depth (``"depth_source"``,
``"depth_target"``).

Losses (``CorDA``): BerHu between the source depth head on the source image and the source depth
map (weight 0.01), and between the target depth head on the mixed image and the ClassMix of the
two depth maps (weight 0.001); BerHu(e) = e for e <= c, (e^2 + c^2) / (2c) above, c = 0.2 max e
over the batch's valid pixels. Pseudo-labels are weighted by the adaptation difficulty from depth:
w = clip(relu(1 - |D_src - D_tgt| / d) + 1e-3, 0, 1) per target pixel from the teacher's two depth
heads on the target image (d: ``corda_discrepancy_scale``, or |D_tgt| when 0: the relative
discrepancy), divided by its batch mean, multiplied into the pseudo-label weight.

The depth maps come in the batches (``batch["depth"]``: the loaders read them in their workers,
cropped with the very geometry of the label, fastuda/data/depth.py); CorDA asks for them with
``batch_keys``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """``[corda]``: depth decoders, cross-task exchange, BerHu depth losses, depth-aware
    pseudo-label weights; defaults are the published settings."""

    channels: int = 256  # task features (published: 2048 -> 256)
    source_depth_weight: float = 0.01
    mix_depth_weight: float = 0.001
    berhu_ratio: float = 0.2  # c = ratio * max |error|
    depth_weighting: bool = True
    # d of w = relu(1 - |D_src - D_tgt| / d): 0 means relative to the target decoder's |D_tgt|
    discrepancy_scale: float = 0.0

    def __post_init__(self) -> None:
        _check(self.channels >= 1, "corda.channels", self.channels, ">= 1")
        for key in ("source_depth_weight", "mix_depth_weight"):
            _check(getattr(self, key) >= 0, f"corda.{key}", getattr(self, key), ">= 0")
        _check(0 < self.berhu_ratio <= 1, "corda.berhu_ratio", self.berhu_ratio, "in (0, 1]")
        _check(self.discrepancy_scale >= 0, "corda.discrepancy_scale", self.discrepancy_scale,
               ">= 0 (0: relative to the target depth)")


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """SA(x) = conv(x) * sigmoid(conv'(x)): a gated 3x3 projection of the other task's feature."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.value = nn.Conv2d(channels, channels, 3, padding=1)
        self.gate = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


class DepthHead(nn.Sequential):
    """3x3 conv-BN-ReLU then a 1x1 conv to one channel of inverse depth."""

    def __init__(self, channels: int) -> None:
        super().__init__(ConvBNReLU(channels, channels, 3), nn.Conv2d(channels, 1, 1))


class CorDAModel(SegModel):
    """A fastuda model with CorDA's task features, cross-task exchange and three heads."""

    def __init__(self, net: SegModel, num_classes: int, channels: int = 256) -> None:
        super().__init__(getattr(net, "channels_last", False))
        self.net = net
        width = net.feature_channels
        self.seg_task = ConvBNReLU(width, channels, 3)
        self.depth_task = ConvBNReLU(width, channels, 3)
        self.depth_to_seg = SelfAttention(channels)
        self.seg_to_depth = SelfAttention(channels)
        self.classifier = ASPPClassifier(channels, num_classes)
        self.depth_source = DepthHead(channels)
        self.depth_target = DepthHead(channels)
        self.output_stride = net.output_stride
        self.embed_dim = getattr(net, "embed_dim", 0)
        self.num_classes = num_classes
        self.feature_channels = channels

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = dict(self.net(images))
        shared = out[O.FEATURES]
        f_seg, f_depth = self.seg_task(shared), self.depth_task(shared)
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
    """w = clip(relu(1 - |D_src - D_tgt| / d) + 1e-3, 0, 1), d = scale or |D_tgt| when 0,
    divided by its mean over the batch."""
    diff = (depth_source.float() - depth_target.float()).abs()
    d = depth_target.float().abs().clamp_min(eps) if scale == 0 else scale
    w = (torch.relu(1 - diff / d) + 1e-3).clamp(0, 1)
    return w / w.mean()


class CorDA(Method):
    name = "corda"
    Settings = CorDASettings
    batch_keys = ("depth",)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if not cfg.self_training.enabled:
            raise ConfigError("methods = [..., 'corda'] adapts with the self-training loop: set "
                              "self_training.enabled = true")
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
        self._depth: dict[str, Tensor] = {}  # this step's depth maps: source, target, mixed

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if isinstance(model, CorDAModel):
            return model
        return CorDAModel(model, self.num_classes, self.settings.channels)

    def start_step(self, view: StepView) -> None:
        for key, batch in (("source", view.source), ("target", view.target)):
            if "depth" not in batch:
                raise RuntimeError(f"CorDA: the {key} batch has no depth maps; the loaders add "
                                   "them when built with depth=True (fastuda.train does for "
                                   "methods whose batch_keys name 'depth')")
        self._depth = {"source": view.source["depth"], "target": view.target["depth"]}

    def _map(self, key: str, like: Tensor) -> Tensor:
        """This step's ``key`` depth map on the device of ``like`` (moved there once)."""
        if key not in self._depth:
            raise RuntimeError(f"CorDA: no {key} depth for this step (start_step takes it from "
                               "the batch)")
        if self._depth[key].device != like.device:
            self._depth[key] = self._depth[key].to(like.device, non_blocking=True)
        return self._depth[key]

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        if self.settings.source_depth_weight == 0:
            return {}
        target = self._map("source", out[O.DEPTH_SOURCE])
        loss = berhu_loss(out[O.DEPTH_SOURCE], target, self.settings.berhu_ratio)
        return {"src.depth": self.settings.source_depth_weight * loss}

    def refine_pseudo_labels(self, teacher_target: Outputs, label: Tensor, weight: Tensor,
                             it: int) -> tuple[Tensor, Tensor]:
        if not self.settings.depth_weighting:
            return label, weight
        w = depth_weight(teacher_target[O.DEPTH_SOURCE], teacher_target[O.DEPTH_TARGET],
                         self.settings.discrepancy_scale)
        w = F.interpolate(w[:, None], size=label.shape[-2:], mode="bilinear",
                          align_corners=False)[:, 0]
        return label, weight * w

    def on_mix(self, mask: Tensor, it: int) -> None:
        src, tgt = self._map("source", mask), self._map("target", mask)
        self._depth["mixed"] = torch.where(mask, src, tgt)

    def mixed_losses(self, out: Outputs, mixed_label: Tensor, mixed_weight: Tensor,
                     it: int) -> Losses:
        if self.settings.mix_depth_weight == 0:
            return {}
        target = self._map("mixed", out[O.DEPTH_TARGET])
        loss = berhu_loss(out[O.DEPTH_TARGET], target, self.settings.berhu_ratio)
        return {"mix.depth": self.settings.mix_depth_weight * loss}


__all__ = ["CorDA", "CorDAModel", "DepthHead", "SelfAttention", "berhu_loss", "depth_weight"]
