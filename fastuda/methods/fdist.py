"""DAFormer's ImageNet feature distance (Hoyer et al., CVPR 2022), as a plug-in of the loop.

At the source pass ("src"), the student's last backbone stage (``"backbone"``) is pulled towards
the same stage of a frozen copy of the ImageNet-initialised model on the same image:

    loss = weight * mean_{p in M} || f_student(p) - f_imnet(p) ||_2

where the L2 norm runs over the channels and M is the set of feature-grid cells whose source
label, brought to the grid by majority vote (``downscale_label_ratio``: ignore as a candidate of
its own, a cell keeps its majority class only when it holds at least ``scale_min_ratio`` of the
cell, else ignore), is one of ``classes`` (DAFormer's thing classes). ``classes = []`` takes
every cell (the release's ``imnet_feature_dist_classes=None``). It is on at every iteration:
the release has no schedule for it.

Released code (github.com/lhoyer/DAFormer at e6f6e04):
- configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py#L26-L28
  (lambda 0.005, classes [6, 7, 11, ..., 18], scale_min_ratio 0.75);
- mmseg/models/uda/dacs.py#L82-L85 (the ImageNet model: the student's model config, so the same
  pretrained file), #L153-L162 (``masked_feat_dist``: norm over dim 1, mean over the mask),
  #L164-L189 (``calc_feat_dist``: the ImageNet model in eval mode under no_grad, the last stage
  ``lay = -1``, the label downscale factor ``gt.shape[-1] // feat.shape[-1]``), #L232-L251 (on
  the clean source image and its features, backward right after the source CE);
- mmseg/utils/utils.py (``downscale_label_ratio``).
HRDA (github.com/lhoyer/HRDA at c370b5b): configs/hrda/gtaHR2csHR_hrda.py#L39
(``feature_scale=0.5``) makes both the student's features (the context view's backbone) and the
ImageNet model's (``extract_feat``: the crop resized by 0.5, mmseg/models/segmentors/
hrda_encoder_decoder.py#L145-L162) those of the context view; the labels are the whole crop's
(mmseg/models/uda/dacs.py#L214-L233). MIC (lhoyer/MIC) keeps the same code.

Deliberate differences:
- no thing-class pixel in the batch: the release's mean over an empty set is NaN (with a zero
  gradient, HRDA's mmseg/models/uda/dacs.py#L168-L172); here the loss is 0 (the same zero
  gradient), so fastuda's non-finite-loss guard does not skip the step;
- the frozen model is not part of the checkpoints: it is rebuilt from ``model.pretrained`` (the
  file the student started from) when the run starts or resumes; the method's state holds a
  fingerprint of its weights, so resuming with another file is an error, not a silent change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import Config, ConfigError, _check
from ..engine.context import MethodContext, StepView
from ..models import outputs as O
from .base import Losses, Method, Outputs

# DAFormer's thing classes (Cityscapes train ids: pole, light, sign, person, rider, car, truck,
# bus, train, motorcycle, bicycle); released config #L27
THING_CLASSES = [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]


@dataclass
class FDistSettings:
    """``[fdist]``; defaults are the released values (DAFormer config #L26-L28)."""

    weight: float = 0.005  # imnet_feature_dist_lambda
    classes: list[int] = field(default_factory=lambda: list(THING_CLASSES))  # [] = every cell
    scale_min_ratio: float = 0.75  # imnet_feature_dist_scale_min_ratio

    def __post_init__(self) -> None:
        _check(self.weight > 0, "fdist.weight", self.weight,
               "> 0 (leave 'fdist' out of methods to switch it off)")
        _check(0 < self.scale_min_ratio <= 1, "fdist.scale_min_ratio", self.scale_min_ratio,
               "in (0, 1]")
        _check(len(set(self.classes)) == len(self.classes) and all(c >= 0 for c in self.classes),
               "fdist.classes", self.classes, "distinct class ids >= 0")


def feature_distance_mask(labels: Tensor, grid: tuple[int, int], classes: list[int], *,
                          num_classes: int, min_ratio: float, ignore_index: int,
                          backend: str = "auto") -> Tensor:
    """[B, h, w] bool: the grid cells whose downscaled label is one of ``classes``.

    The factor is ``W // w`` as in the release (an image that is not an exact multiple loses its
    last rows/columns, as avg_pool2d's floor does there)."""
    h, w = grid
    f = labels.shape[-1] // w
    if f < 1 or labels.shape[-2] < h * f:
        raise ValueError(f"fdist: labels {tuple(labels.shape[-2:])} are smaller than the feature "
                         f"grid {grid}")
    lbl = labels[:, :h * f, :w * f]
    small = lbl if f == 1 else ops.downscale_labels(lbl, f, num_classes=num_classes,
                                                    min_ratio=min_ratio,
                                                    ignore_index=ignore_index, backend=backend)
    if not classes:
        return small != ignore_index
    return torch.isin(small, torch.tensor(classes, device=small.device))


def masked_feature_distance(student: Tensor, imnet: Tensor, mask: Tensor) -> Tensor:
    """Mean over the cells of ``mask`` [B, h, w] of the channel-wise L2 distance of two
    [B, C, h, w] maps (fp32); 0 (with a zero gradient) when the mask is empty."""
    dist = torch.linalg.vector_norm(student.float() - imnet.float(), dim=1)  # [B, h, w]
    if not bool(mask.any()):
        return 0.0 * student.float().sum()
    return dist[mask].mean()


class FDist(Method):
    name = "fdist"
    Settings = FDistSettings

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        # model.pretrained may stay '' in a preset (the user names the local file); the
        # method's constructor refuses to build without it
        s = cfg.settings("fdist")
        bad = [c for c in s.classes if c >= cfg.model.num_classes]
        _check(not bad, "fdist.classes", s.classes,
               f"class ids < model.num_classes = {cfg.model.num_classes}")
        from . import METHODS  # the registry (this module is one of its entries)

        aug = [m for m in cfg.methods if METHODS[m].augment_source]
        if aug:
            raise ConfigError(f"methods = {cfg.methods}: 'fdist' compares the student's source "
                              f"features with the ImageNet model's on the clean source image "
                              f"(as released), but {aug} strong-augment the student's source "
                              "image; no released setting combines them")

    def __init__(self, settings: FDistSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        if ctx.model is None or not ctx.model.pretrained:
            raise ValueError("invalid value for model.pretrained: '' (expected the local "
                             "ImageNet checkpoint file: methods = [..., 'fdist'] compares the "
                             "student with a frozen copy of the model loaded from it)")
        from ..models import build_model  # models import the methods' registry lazily

        frozen = build_model(ctx.model).to(ctx.device).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        # kept outside the module tree: not in state_dict (checkpoints), not trained, not moved
        # to train mode by the loop; rebuilt from the file on resume
        self._imnet: list[nn.Module] = [frozen]
        self.register_buffer("fingerprint", fingerprint(frozen.backbone), persistent=True)
        self._source: Tensor | None = None

    @property
    def imnet_model(self) -> nn.Module:
        """The frozen ImageNet-initialised model (eval mode, no gradients)."""
        return self._imnet[0]

    def start_step(self, view: StepView) -> None:
        self._source = view.source_image  # the image of the "src" pass (never augmented here)

    @torch.no_grad()
    def imnet_features(self, images: Tensor) -> Tensor:
        """The frozen model's last backbone stage on ``images`` (HRDA: on the context view)."""
        model = self.imnet_model
        model.eval()
        if self.ctx.context_scale != 1.0:
            H, W = images.shape[-2:]
            size = (round(H * self.ctx.context_scale), round(W * self.ctx.context_scale))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return model.backbone_output(images)

    def source_losses(self, out: Outputs, label: Tensor, it: int) -> Losses:
        if self._source is None:
            raise RuntimeError("fdist: source_losses before start_step (no source image)")
        student = out[O.BACKBONE]
        imnet = self.imnet_features(self._source)
        if imnet.shape != student.shape:
            raise ValueError(f"fdist: the ImageNet model's features {tuple(imnet.shape)} do not "
                             f"match the student's {tuple(student.shape)}")
        mask = feature_distance_mask(label, tuple(student.shape[-2:]), self.settings.classes,
                                     num_classes=self.ctx.num_classes,
                                     min_ratio=self.settings.scale_min_ratio,
                                     ignore_index=self.ctx.ignore_index,
                                     backend=self.ctx.backend)
        self._source = None
        return {"src.feat_dist": self.settings.weight
                * masked_feature_distance(student, imnet, mask)}

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        key = prefix + "fingerprint"
        if key in state_dict and not torch.equal(state_dict[key].to(self.fingerprint.device),
                                                 self.fingerprint):
            raise ValueError("fdist: the frozen ImageNet model built from model.pretrained = "
                             f"{self.ctx.model.pretrained!r} is not the one this checkpoint "
                             "trained with (another file?)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@torch.no_grad()
def fingerprint(model: nn.Module) -> Tensor:
    """float64 [2]: the sum and the sum of squares of every floating parameter and buffer of
    ``model`` (the frozen backbone: what the file sets; tells two weight files apart without
    storing the weights)."""
    total = torch.zeros(2, dtype=torch.float64)
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            x = t.detach().double().cpu()
            total += torch.stack([x.sum(), (x * x).sum()])
    return total


__all__ = ["FDist", "FDistSettings", "THING_CLASSES", "feature_distance_mask", "fingerprint",
           "masked_feature_distance"]
