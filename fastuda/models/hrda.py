"""HRDA (Hoyer et al., ECCV 2022): multi-resolution training and inference around any SegModel.

Follows the release (github.com/lhoyer/HRDA, same files in github.com/lhoyer/MIC, seg/):
mmseg/models/segmentors/hrda_encoder_decoder.py (scales [1, 0.5], the detail crop's corner on
multiples of crop_coord_divisible = 8 with get_crop_bbox's draw, the overlapping slide inference
of the detail view at stride crop / 2), mmseg/models/decode_heads/hrda_head.py (class-wise
sigmoid scale attention on the context view, masked to the detail box on the context grid, the
fusion att * detail + up((1 - att) * context), the fused CE weighted 1 - hr_loss_weight and the
detail CE hr_loss_weight = 0.1 on the labels cropped to the box), experiments.py
('hrda1-512-0.1': detail crop 512, hr_loss_weight 0.1, attention_classwise True).

The scale attention is, as released (lhoyer/HRDA c370b5b mmseg/models/decode_heads/hrda_head.py
#L40, #L47-L66, #L76-L80, #L139-L141, #L151, #L166), a second decode head of the main head's type
reading what the main head reads (the context view's backbone features, after the neck), with
``num_classes`` outputs (``attention_classwise``; 1 otherwise) and a sigmoid:
- DAFormer head: a DAFormerHead with ``attention_channels`` (released attention_embed_dim 256)
  as its embedding and fusion width, the separable ASPP fusion replaced by one 1x1 conv-BN-ReLU,
  the main head's dropout (0.1, configs/_base_/models/daformer_conv1_mitb5.py#L22), a 1x1
  classifier;
- DeepLab-V2 head: a second ASPP classifier with the same dilations (DLV2Head keeps them,
  hrda_head.py#L62-L66; dlv2_head.py: no dropout, no norm);
- the ViT heads (no released HRDA ViT; the same rule): a second VFM-UDA head, or a DAFormer
  head with the 1x1 fusion on the ViT's pyramid, sampled at the output grid like the logits.
``attention_channels`` is used by the DAFormer-type attention only.

Sizes: an input of H x W full-resolution pixels, the model's output stride s, the context scale
c (1/c an integer, published 0.5) and ``align`` = s / c, the stride of the context predictions in
full-resolution pixels. Every output below named "full grid" is [.., H/s, W/s]: the detail
resolution, where HRDA fuses.

Training (``self.training`` or an explicit ``box``), on a full-resolution crop (H, W multiples of
``align``):
- context view: the crop resized by c (bilinear), through the model: logits, features at
  [H c/s, W c/s];
- detail view: a full-resolution sub-crop ``box`` = (y1, y2, x1, x2) of ``detail_crop`` pixels
  whose corner is a multiple of ``crop_divisible`` (8), chosen by the forward's ``box_rule``:
  - ``"random"`` (HRDA): one box for the batch, drawn as the release's get_crop_bbox
    (offset = randint((H - dh + 1) // divisible) * divisible) from the generator the training
    loop binds with ``use_generator`` (its state is in the loop's checkpoint, so a resumed run
    draws the same boxes);
  - ``"max_entropy"`` (CLUDA's mixed pass, user0407/CLUDA bad6ed0
    mmseg/models/segmentors/hrda_encoder_decoder.py#L181-L213, #L310-L329): one box per image,
    the first of the slide-inference windows (``windows``: the detail crop at ``slide_stride``,
    the release's max_entropy_crop grid) with the largest mean entropy of the context
    prediction, upsampled (nearest) to the crop's pixels (``max_entropy_boxes``); the
    prediction is a second forward of the decode head on the detached context head input, in
    the module's mode, as the release's forward_test_mix (dropout draws anew, BatchNorm sees the
    batch again); nothing is drawn from the generator;
  - ``"max_entropy_overwrite"``: the same with the release's aliasing bug (the running
    maximum's entropy written over the first window, ``max_entropy_boxes(overwrite=True)``);
  an explicit ``box`` (one tuple, or a list of one per image) is used as given;
- scale attention: the attention head (above) on the context view's backbone features, a in
  [0, 1] on the context grid, one channel per class (``attention_classwise``), set to 0 outside
  the box's cells of the context grid (the cells int(y / align) .. int(y2 / align));
- fusion (the release's order): logits = up(a) * detail + up((1 - a) * logits_context) on the
  full grid, ``detail`` the box's detail logits placed in zeros.

Inference (eval mode: the teacher's pseudo-labels, ``fastuda.evaluate``), on any image size (padded
with zeros at the bottom/right to a multiple of ``align``, the outputs cropped back to
ceil(H/s) x ceil(W/s)): the context view of the whole image, detail logits from ``detail_crop``
windows slid over the full-resolution image (stride ``slide_stride``, multiples of s; overlaps
averaged), fused with the (unmasked) attention everywhere: up(a) * detail + up((1 - a) *
logits_context).

Outputs (a dict, like every SegModel): the context view's own outputs ("features", "embeddings",
"backbone") and
- ``logits``            fused, full grid
- ``logits_context``    context view, context grid
- ``logits_detail``     training: the box's detail logits [B, C, dh/s, dw/s]; eval: the stitched
                        detail logits on the full grid
- ``attention``         up(a) of the fusion, full grid [B, A, H/s, W/s] (A = num_classes or 1;
                        training: masked to the box before the upsampling)
- ``attention_context`` the head's output on the context grid (never masked)
- training only: ``attention_detail`` (``attention`` inside the box, [B, A, dh/s, dw/s]),
  ``features_detail`` (the detail view's features), ``detail_box`` (int64 [4]: y1, y2,
  x1, x2 in input pixels, one box for the batch; [B, 4] with one box per image; labels are
  cropped alike, ``crop_to_box``), ``context_head_input`` (the decode head's
  input of the context view, what the attention head reads: CLUDA's pair-weight head reads it
  too, as released).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import HRDAConfig
from . import outputs as O
from .base import SegModel
from .heads import ASPPClassifier, DAFormerHead, resize
from .vit import VFMUDAHead

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2), input pixels
BOX_RULES = ("random", "max_entropy", "max_entropy_overwrite")


def check_box_rule(box_rule: str) -> None:
    if box_rule not in BOX_RULES:
        raise ValueError(f"HRDAModel: unknown box_rule {box_rule!r}; expected one of "
                         f"{', '.join(BOX_RULES)}")


def box_rows(detail_box: Tensor, batch: int) -> list[Box]:
    """Each image's box from an output's ``detail_box``: [4] (one box for the batch) or [B, 4]."""
    rows = detail_box.tolist()
    if detail_box.dim() == 1:
        return [tuple(rows)] * batch  # type: ignore[list-item]
    if len(rows) != batch:
        raise ValueError(f"detail_box holds {len(rows)} boxes for a batch of {batch}")
    return [tuple(r) for r in rows]  # type: ignore[misc]


def crop_to_box(x: Tensor, detail_box: Tensor) -> Tensor:
    """``x`` [B, ..., H, W] cropped to the detail box of each image (``box_rows``)."""
    if detail_box.dim() == 1:
        y1, y2, x1, x2 = (int(v) for v in detail_box)
        return x[..., y1:y2, x1:x2]
    return torch.stack([x[b, ..., y1:y2, x1:x2]
                        for b, (y1, y2, x1, x2) in enumerate(box_rows(detail_box, len(x)))])


def entropy_map(logits: Tensor) -> Tensor:
    """-sum_c p log p of softmax(``logits`` [B, C, h, w]) per pixel, [B, h, w] float32. A zero
    probability counts as 1e-8, as the release's get_entropy (hrda_encoder_decoder.py#L13-L28);
    its division by 19 log 19 scales every window's mean alike, so it is left out."""
    p = torch.softmax(logits.float(), dim=1)
    p = torch.where(p == 0, torch.full_like(p, 1e-8), p)
    return -(p * torch.log(p)).sum(1)


def max_entropy_boxes(entropy: Tensor, windows: list[Box], *, overwrite: bool = False
                      ) -> list[Box]:
    """For each image of ``entropy`` [B, H, W]: the first of ``windows`` (in order) whose mean
    entropy is the largest (a later window must be strictly larger), as the release's
    max_entropy_crop (hrda_encoder_decoder.py#L181-L213).

    ``overwrite``: the release's aliasing bug: its running maximum ``e_max`` is a view of the
    first window of the map, so each new maximum's values are written over the first window's
    pixels and the later windows overlapping it are scored on those; emulated with a clean copy
    (the release's in-place copy between overlapping windows is PyTorch's CPU order here; on a
    GPU it is not ordered)."""
    if not overwrite:
        means = torch.stack([entropy[:, y1:y2, x1:x2].mean((1, 2))
                             for y1, y2, x1, x2 in windows], 1).tolist()  # one host sync
        picks = []
        for row in means:
            best = 0
            for k, v in enumerate(row):
                if v > row[best]:
                    best = k
            picks.append(windows[best])
        return picks
    picks = []
    fy1, fy2, fx1, fx2 = windows[0]
    for e in entropy:
        e = e.clone()
        best = windows[0]
        for y1, y2, x1, x2 in windows[1:]:
            window = e[y1:y2, x1:x2]
            if float(window.mean()) > float(e[fy1:fy2, fx1:fx2].mean()):
                e[fy1:fy2, fx1:fx2] = window.clone()
                best = (y1, y2, x1, x2)
        picks.append(best)
    return picks


def scale_attention_head(head: nn.Module, out_channels: int, channels: int) -> nn.Module:
    """HRDA's scale-attention head for a model whose decode head is ``head``: a head of the same
    type on the same inputs with ``out_channels`` outputs (logits, before the sigmoid); a
    DAFormer head gets ``channels`` wide embeddings and the 1x1 fusion (module docstring)."""
    if isinstance(head, DAFormerHead):
        return DAFormerHead(head.in_channels, out_channels, channels=channels,
                            dropout=head.dropout_p, fusion="conv")
    if isinstance(head, ASPPClassifier):
        return ASPPClassifier(head.in_channels, out_channels, head.dilations)
    if isinstance(head, VFMUDAHead):
        return VFMUDAHead(head.embed_dim, out_channels)
    raise ValueError(f"HRDAModel: no scale attention for a decode head of type "
                     f"{type(head).__name__}; expected DAFormerHead, ASPPClassifier or VFMUDAHead")


class HRDAModel(nn.Module):
    """HRDA around ``model``; see the module docstring for sizes, fusion and outputs."""

    def __init__(self, model: SegModel, cfg: HRDAConfig,
                 attention_head: nn.Module | None = None) -> None:
        """``attention_head``: the scale-attention logits from the decode head's input, for a
        model whose decode head is none of the known types (default: scale_attention_head)."""
        super().__init__()
        if isinstance(model, HRDAModel):
            raise ValueError("HRDAModel: the model is already an HRDAModel")
        self.model = model
        decode_head = getattr(model, "decode_head", None)
        if not isinstance(decode_head, nn.Module):
            raise ValueError(f"HRDAModel: {type(model).__name__} has no decode_head whose input "
                             f"the scale attention reads")
        self.attention_head = attention_head if attention_head is not None else \
            scale_attention_head(decode_head, model.num_classes if cfg.attention_classwise else 1,
                                 cfg.attention_channels)
        self.crop_divisible = int(cfg.crop_divisible)
        self.context_scale = float(cfg.context_scale)
        self.output_stride = int(model.output_stride)
        self.align = round(self.output_stride / self.context_scale)
        self.detail_crop = (int(cfg.detail_crop[0]), int(cfg.detail_crop[1]))
        self.slide_stride = (int(cfg.stride[0]), int(cfg.stride[1]))
        self.num_classes = model.num_classes
        self.embed_dim = model.embed_dim
        self.feature_channels = model.feature_channels
        self.pretrained_report = getattr(model, "pretrained_report", None)
        self.generator: torch.Generator | None = None

    def use_generator(self, generator: torch.Generator) -> None:
        """The generator the training detail boxes are drawn from (owned by the loop, which binds
        it on the student only, after copying the teacher: the teacher never draws)."""
        self.generator = generator

    # -- optimiser groups: the wrapped model's, plus the attention head at the head lr ---------
    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
        groups = self.model.param_groups(lr, head_lr_mult, weight_decay)
        params = [p for p in self.attention_head.parameters() if p.requires_grad]
        # the released names (decode_head.scale_attention.*) contain "head": decayed under the
        # mmseg rule (optim.no_decay, fastuda/models/base.py); "1d" exempts the 1-D ones
        one_d = self.model.no_decay == "1d"
        for no_decay in (False, True):
            ps = [p for p in params if (one_d and p.ndim <= 1) == no_decay]
            if ps:
                groups.append({"params": ps, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult,
                               "weight_decay": 0.0 if no_decay else weight_decay,
                               "name": "attention" + ("_no_decay" if no_decay else "")})
        return groups

    # -- pieces ---------------------------------------------------------------------------------
    def context_view(self, images: Tensor) -> Tensor:
        H, W = images.shape[-2:]
        size = (round(H * self.context_scale), round(W * self.context_scale))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def _context(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor | list]:
        """The context view's outputs, its scale attention (sigmoid, on the logits' grid) and the
        decode head's input (what the attention head read)."""
        ctx = self.context_view(images)
        inputs: list = []
        # the attention reads the main head's own input (backbone features after the neck): a
        # pre-hook takes it from the one forward instead of running the backbone twice
        handle = self.model.decode_head.register_forward_pre_hook(
            lambda _module, args: inputs.append(args[0]))
        try:
            out = dict(self.model(ctx))
        finally:
            handle.remove()
        att = self._on_logit_grid(self.attention_head(inputs[0]), tuple(ctx.shape[-2:]),
                                  tuple(out[O.LOGITS].shape[-2:]))
        return out, torch.sigmoid(att), inputs[0]

    def _on_logit_grid(self, x: Tensor | tuple, view_hw: tuple[int, int],
                       logits_hw: tuple[int, int]) -> Tensor:
        """A head's output on the context view (of ``view_hw`` pixels) brought to the grid of
        the context logits (``logits_hw``), as the model's forward brings its logits."""
        x = x[0] if isinstance(x, tuple) else x  # the heads returning (logits, features)
        to_grid = getattr(self.model, "to_output_grid", None)
        if to_grid is not None:  # a ViT samples its head's grid at the output grid
            return to_grid(x, view_hw)
        if tuple(x.shape[-2:]) != logits_hw:
            return resize(x, logits_hw)
        return x

    def entropy_logits(self, head_input: Tensor | list, view_hw: tuple[int, int],
                       logits_hw: tuple[int, int]) -> Tensor:
        """The context logits the maximum-entropy box is chosen on: the decode head run again on
        its detached input (no grad), in the module's mode, as the release's forward_test_mix
        (hrda_encoder_decoder.py#L316-L320; hrda_head.py#L302-L303: ``self.head(lr_feats)``)."""
        if isinstance(head_input, (list, tuple)):
            detached: Tensor | list = [t.detach() for t in head_input]
        else:
            detached = head_input.detach()
        with torch.no_grad():
            return self._on_logit_grid(self.model.decode_head(detached), view_hw, logits_hw)

    def draw_box(self, height: int, width: int, generator: torch.Generator | None = None
                 ) -> tuple[int, int, int, int]:
        """A ``detail_crop`` box (y1, y2, x1, x2) inside height x width whose corner is a
        multiple of ``crop_divisible``: offset = randint((margin + 1) // d) * d per side, as the
        release's get_crop_bbox (the box at the far border is drawn only when the margin is a
        multiple of d minus 1)."""
        g = generator if generator is not None else self.generator
        if g is None:
            raise RuntimeError("HRDAModel: training draws detail boxes from a generator; bind "
                               "one with use_generator() (the training loop does) or pass box=")
        self._check_fits(height, width)
        dh, dw = self.detail_crop
        d = self.crop_divisible
        if (dh, dw) == (height, width):
            return 0, height, 0, width
        ny, nx = max((height - dh + 1) // d, 1), max((width - dw + 1) // d, 1)
        y1 = int(torch.randint(ny, (1,), generator=g)) * d
        x1 = int(torch.randint(nx, (1,), generator=g)) * d
        return y1, y1 + dh, x1, x1 + dw

    def _check_fits(self, height: int, width: int) -> None:
        dh, dw = self.detail_crop
        if dh > height or dw > width:
            raise ValueError(f"HRDAModel: detail crop {dh}x{dw} does not fit the input "
                             f"{height}x{width}")

    # -- forward --------------------------------------------------------------------------------
    def forward(self, images: Tensor, box: Box | list[Box] | None = None,
                box_rule: str = "random") -> dict[str, Tensor]:
        """Training (or an explicit ``box``): ``forward_train``; eval mode: ``infer``."""
        check_box_rule(box_rule)
        if self.training or box is not None:
            return self.forward_train(images, box, box_rule)
        return self.infer(images)

    def forward_train(self, images: Tensor, box: Box | list[Box] | None = None,
                      box_rule: str = "random") -> dict[str, Tensor]:
        """The training forward on the detail ``box`` (one for the batch, or a list of one per
        image); None: chosen by ``box_rule`` (module docstring)."""
        check_box_rule(box_rule)
        H, W = images.shape[-2:]
        B = images.shape[0]
        s, al = self.output_stride, self.align
        if H % al or W % al:
            raise ValueError(f"HRDAModel: training crops must be multiples of output stride / "
                             f"context_scale = {al} pixels, got {H}x{W}")
        windows: list[Box] = []
        if box is None and box_rule == "random":
            box = self.draw_box(H, W)
        elif box is None:
            self._check_fits(H, W)
            windows = self.windows(H, W)
            self._boxes(windows, len(windows), H, W)  # misaligned windows fail before the work
        boxes = [] if box is None else self._boxes(box, B, H, W)
        out, att_c, head_input = self._context(images)
        if box is None:
            view_hw = (round(H * self.context_scale), round(W * self.context_scale))
            logits = self.entropy_logits(head_input, view_hw, tuple(out[O.LOGITS].shape[-2:]))
            ent = F.interpolate(entropy_map(logits)[:, None], size=(H, W), mode="nearest")
            box = max_entropy_boxes(ent[:, 0], windows,
                                    overwrite=box_rule == "max_entropy_overwrite")
            boxes = box
        shared = len(set(boxes)) == 1
        if shared:  # one crop of the batch (HRDA's box)
            y1, y2, x1, x2 = boxes[0]
            crops = images[:, :, y1:y2, x1:x2]
        else:
            crops = torch.stack([img[:, y1:y2, x1:x2]
                                 for img, (y1, y2, x1, x2) in zip(images, boxes, strict=True)])
        detail = self.model(crops)
        grid = (H // s, W // s)
        logits_d = detail[O.LOGITS]
        dh, dw = boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2]
        if tuple(logits_d.shape[-2:]) != (dh // s, dw // s):
            raise ValueError(f"HRDAModel: the detail logits {tuple(logits_d.shape[-2:])} are not "
                             f"the box {boxes[0]} over the output stride {s}")
        # the attention keeps each image's box cells of the context grid (truncated as the
        # release; hrda_head.py#L213-L221, per image with a list of boxes)
        mask = att_c.new_zeros((1 if shared else B, 1, *att_c.shape[-2:]))
        for m, (y1, y2, x1, x2) in zip(mask, boxes, strict=False):
            m[:, y1 // al:y2 // al, x1 // al:x2 // al] = 1
        att_m = att_c * mask
        att = resize(att_m, grid)
        cells = torch.tensor(boxes[0] if shared else boxes, dtype=torch.int64) // s

        def placed(logits: Tensor, cy1: int, cy2: int, cx1: int, cx2: int) -> Tensor:
            return F.pad(logits, (cx1, grid[1] - cx2, cy1, grid[0] - cy2))

        if shared:
            detail_full = placed(logits_d, *cells.tolist())
        else:
            detail_full = torch.stack([placed(lg, *c) for lg, c in zip(logits_d, cells.tolist(),
                                                                       strict=True)])
        fused = att * detail_full + resize((1 - att_m) * out[O.LOGITS], grid)
        out.update({O.LOGITS: fused, O.LOGITS_CONTEXT: out[O.LOGITS], O.LOGITS_DETAIL: logits_d,
                    O.ATTENTION: att, O.ATTENTION_CONTEXT: att_c,
                    O.ATTENTION_DETAIL: crop_to_box(att, cells),
                    O.FEATURES_DETAIL: detail[O.FEATURES], O.CONTEXT_HEAD_INPUT: head_input,
                    O.DETAIL_BOX: torch.tensor(boxes if isinstance(box, list) else boxes[0],
                                               dtype=torch.int64)})
        return out

    def _boxes(self, box: Box | list[Box], batch: int, height: int, width: int) -> list[Box]:
        """Each image's box (one ``box`` for the batch, or a list of ``batch``), checked: inside
        height x width, the corner on multiples of the output stride, the sides of the
        context stride ``align``, all of one size."""
        s, al = self.output_stride, self.align
        boxes = [tuple(int(v) for v in b) for b in box] if isinstance(box, list) else \
            [tuple(int(v) for v in box)] * batch
        if len(boxes) != batch:
            raise ValueError(f"HRDAModel: {len(boxes)} detail boxes for a batch of {batch}")
        for y1, y2, x1, x2 in boxes:
            if y1 % s or x1 % s or (y2 - y1) % al or (x2 - x1) % al or y1 < 0 or x1 < 0 \
                    or y2 > height or x2 > width or y2 <= y1 or x2 <= x1:
                raise ValueError(f"HRDAModel: detail box {(y1, y2, x1, x2)} must lie inside "
                                 f"{height}x{width} with its corner on multiples of {s} and "
                                 f"its sides of {al} pixels")
        if len({(y2 - y1, x2 - x1) for y1, y2, x1, x2 in boxes}) > 1:
            raise ValueError(f"HRDAModel: the detail boxes {boxes} differ in size")
        return boxes  # type: ignore[return-value]

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The sliding detail windows (y1, y2, x1, x2) over a height x width image (both
        multiples of ``align``); the last row/column is moved back to end at the border."""
        dh, dw = min(self.detail_crop[0], height), min(self.detail_crop[1], width)
        sh, sw = self.slide_stride
        rows = max(height - dh + sh - 1, 0) // sh + 1
        cols = max(width - dw + sw - 1, 0) // sw + 1
        out = []
        for r in range(rows):
            for c in range(cols):
                y1, x1 = min(r * sh, height - dh), min(c * sw, width - dw)
                out.append((y1, y1 + dh, x1, x1 + dw))
        return out

    def infer(self, images: Tensor) -> dict[str, Tensor]:
        H, W = images.shape[-2:]
        s, al = self.output_stride, self.align
        Hp, Wp = math.ceil(H / al) * al, math.ceil(W / al) * al
        x = F.pad(images, (0, Wp - W, 0, Hp - H)) if (Hp, Wp) != (H, W) else images
        out, att_c, _ = self._context(x)
        grid = (Hp // s, Wp // s)
        B = images.shape[0]
        acc = images.new_zeros((B, self.num_classes, *grid), dtype=torch.float32)
        hits = images.new_zeros((1, 1, *grid), dtype=torch.float32)
        for y1, y2, x1, x2 in self.windows(Hp, Wp):
            d = self.model(x[:, :, y1:y2, x1:x2])[O.LOGITS].float()
            acc[:, :, y1 // s:y2 // s, x1 // s:x2 // s] += d
            hits[:, :, y1 // s:y2 // s, x1 // s:x2 // s] += 1
        detail = acc / hits
        att = resize(att_c.float(), grid)
        fused = att * detail + resize((1 - att_c.float()) * out[O.LOGITS].float(), grid)
        oh, ow = math.ceil(H / s), math.ceil(W / s)
        out.update({O.LOGITS: fused[..., :oh, :ow], O.LOGITS_CONTEXT: out[O.LOGITS],
                    O.LOGITS_DETAIL: detail[..., :oh, :ow], O.ATTENTION: att[..., :oh, :ow],
                    O.ATTENTION_CONTEXT: att_c})
        return out


__all__ = ["BOX_RULES", "Box", "HRDAModel", "box_rows", "crop_to_box", "entropy_map",
           "max_entropy_boxes"]
