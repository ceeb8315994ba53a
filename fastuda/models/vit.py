"""DINOv2 vision transformers (Oquab et al., 2023) as segmentation backbones, built on timm.

``model.name = "vit"``, ``model.backbone`` one of :data:`VIT_SPECS` (patch 14). The transformer is
timm's ``VisionTransformer`` (the ``vit_*_patch14_dinov2`` definitions: LayerScale, SwiGLU MLP for
the giant size), made with random weights; pretrained weights come from a local file
(fastuda/models/pretrained.py: the official DINOv2 checkpoints or timm safetensors).

Input to the transformer, ``model.vit_input``:
- ``"pad"``: zeros at the bottom/right up to a multiple of 14;
- ``"resize"``: bilinear resize to ``floor(side * vit_resize_scale / 14) * 14`` (``ceil(side / 14)
  * 14`` when the scale is 1), as the VFM-UDA release feeds its ViT (1024 crop -> 1120, released
  file tue-mps/vfm-uda models/vit_variants/vit_lightweight_head_timm.py).

Heads, ``model.vit_head``:
- ``"vfm_uda"``: the released VFM-UDA head (tue-mps/vfm-uda
  models/vit_variants/vit_lightweight_head.py) on the last layer: two stride-2 transposed convs
  (C -> C/2 -> C/4, LayerNorm2d, GELU between), a 3x3 conv and LayerNorm2d, a bias-free 1x1
  classifier initialised N(0, 0.1). Its C/4-channel map is ``features``.
- ``"daformer"``: the DAFormer decoder (heads.DAFormerHead) on a four-level pyramid made from the
  layers at the quarters of the depth (ViT-B 2/5/8/11), each with the final LayerNorm (DINOv2's
  ``get_intermediate_layers(norm=True)``), resampled as in BEiT's segmentation neck: x4 (two
  transposed convs, BatchNorm and GELU between), x2 (one transposed conv), x1, x1/2 (max pool):
  strides 3.5, 7, 14, 28 on the transformer's input.

The optional projection head (``model.projection``, D = 256 unless ``model.embed_dim``): with the
DAFormer head SePiCo's multi-level projection over the pyramid, with the VFM-UDA head a two-layer
projection of the last layer (as DeepLab-V2's reads its last stage).

Outputs are those of every SegModel at output stride 4 of the caller's image: ``logits``,
``features`` and ``embeddings`` are sampled (bilinear) at the centres of the 4 x 4 cells of
``ceil(H/4) x ceil(W/4)``, the padding or the resize undone; ``backbone`` is the last layer's
token map [B, C, h/14, w/14] (of the transformer's input).

Layer-wise learning-rate decay (``model.layer_decay``, the release's ``layerwise_lr_decay``; its
``configure_optimizers`` in training/uda_vit/uda_vit_generic.py): block i of n at
``lr * decay ** (n - 1 - i)``, the stem (patch embedding, class token, position embedding) and the
final norm at ``lr * decay ** n``, heads at ``lr * head_lr_mult``.
``model.grad_checkpointing`` recomputes each block in the backward instead of keeping its
activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import SegModel
from .heads import DAFormerHead, MultiLevelProjectionHead, ProjectionHead, l2_normalize

PATCH_SIZE = 14
OUTPUT_STRIDE = 4
PUBLISHED_EMBED_DIM = 256


@dataclass(frozen=True)
class ViTSpec:
    timm_name: str  # timm's definition of the architecture (weights never downloaded)
    embed_dim: int
    depth: int
    num_heads: int


# sizes as released by DINOv2 (facebookresearch/dinov2 dinov2/hub/backbones.py)
VIT_SPECS: dict[str, ViTSpec] = {
    "dinov2_vits14": ViTSpec("vit_small_patch14_dinov2", 384, 12, 6),
    "dinov2_vitb14": ViTSpec("vit_base_patch14_dinov2", 768, 12, 12),
    "dinov2_vitl14": ViTSpec("vit_large_patch14_dinov2", 1024, 24, 16),
    "dinov2_vitg14": ViTSpec("vit_giant_patch14_dinov2", 1536, 40, 24),
}


def _timm() -> Any:
    try:
        import timm
    except ImportError as err:  # an optional dependency: the `vit` extra
        raise ImportError("model.name = 'vit' needs timm: pip install 'fastuda[vit]' "
                          "(or pip install timm)") from err
    return timm


def feature_layers(depth: int) -> list[int]:
    """The four blocks the pyramid reads: the last of each quarter of the depth."""
    if depth < 4 or depth % 4:
        raise ValueError(f"a ViT feature pyramid needs a depth divisible by 4, got {depth}")
    q = depth // 4
    return [q * (i + 1) - 1 for i in range(4)]


def vit_input_size(side: int, mode: str, scale: float) -> int:
    """The transformer's input side for an image side: padded or resized to a multiple of 14."""
    if mode == "pad" or scale == 1.0:
        return math.ceil(side / PATCH_SIZE) * PATCH_SIZE
    return max(PATCH_SIZE, int(side * scale // PATCH_SIZE) * PATCH_SIZE)


def sample_output_grid(x: Tensor, covered: tuple[int, int], out: tuple[int, int]) -> Tensor:
    """Bilinear samples of ``x`` (a map spanning ``covered`` = (height, width) image pixels from
    the top-left corner) at the centres of the ``out`` grid of 4 x 4-pixel cells.

    Cell j's centre is at pixel 4 j + 2, i.e. at normalised coordinate 2 (4 j + 2) / covered - 1
    of ``x`` (align_corners=False); positions past the covered span take the border value."""
    ch, cw = covered
    ys = (torch.arange(out[0], device=x.device, dtype=torch.float32) * 4 + 2) * (2 / ch) - 1
    xs = (torch.arange(out[1], device=x.device, dtype=torch.float32) * 4 + 2) * (2 / cw) - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [oh, ow, (x, y)]
    grid = grid.to(x.dtype).expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class DINOv2Backbone(nn.Module):
    """timm's DINOv2 ViT with the final norm applied to the layers the heads read.

    ``timm_kwargs`` go to ``timm.create_model`` (tests make tiny widths and depths with them)."""

    def __init__(self, name: str, drop_path: float = 0.0, grad_checkpointing: bool = False,
                 timm_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if name not in VIT_SPECS:
            raise ValueError(f"unknown DINOv2 ViT {name!r}; expected one of {sorted(VIT_SPECS)}")
        self.spec = VIT_SPECS[name]
        self.vit = _timm().create_model(self.spec.timm_name, pretrained=False, num_classes=0,
                                        dynamic_img_size=True, drop_path_rate=drop_path,
                                        **(timm_kwargs or {}))
        self.embed_dim = int(self.vit.embed_dim)
        self.depth = len(self.vit.blocks)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: Tensor, layers: list[int]) -> list[Tensor]:
        """Token maps [B, C, H/14, W/14] of the given blocks (final norm applied)."""
        B, _, H, W = x.shape
        h, w = H // PATCH_SIZE, W // PATCH_SIZE
        vit = self.vit
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))  # timm's own embedding path
        prefix = vit.num_prefix_tokens
        maps = []
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(vit.blocks[:max(layers) + 1]):
            t = checkpoint(block, t, use_reentrant=False) if recompute else block(t)
            if i in layers:
                y = vit.norm(t)[:, prefix:]
                maps.append(y.transpose(1, 2).reshape(B, self.embed_dim, h, w))
        return maps


class VFMUDAHead(nn.Module):
    """The released VFM-UDA head (see the module docstring); returns (logits, features), both at
    4x the token grid."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        from timm.layers import LayerNorm2d

        c2, c4 = embed_dim // 2, embed_dim // 4
        self.upscale = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, c2, kernel_size=2, stride=2, bias=False),
            LayerNorm2d(c2), nn.GELU(),
            nn.ConvTranspose2d(c2, c4, kernel_size=2, stride=2, bias=False),
            LayerNorm2d(c4),
            nn.Conv2d(c4, c4, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(c4))
        self.classifier = nn.Conv2d(c4, num_classes, kernel_size=1, bias=False)
        nn.init.normal_(self.classifier.weight, 0.0, 0.1)
        self.embed_dim, self.channels = embed_dim, c4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.upscale(x)
        return self.classifier(features), features


class FeaturePyramid(nn.Module):
    """Four same-width token maps -> strides x4, x2, x1, x1/2 of the token grid (BEiT's neck)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
            nn.BatchNorm2d(channels), nn.GELU(),
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
        self.up2 = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        a, b, c, d = maps
        return [self.up4(a), self.up2(b), c, self.down2(d)]


class ViTSegModel(SegModel):
    """A DINOv2 ViT with the VFM-UDA or the DAFormer head; see the module docstring."""

    def __init__(self, backbone: str = "dinov2_vitb14", num_classes: int = 19,
                 head: str = "vfm_uda", decoder_channels: int = 256, projection: bool = True,
                 embed_dim: int = 0, drop_path: float = 0.0, dropout: float = 0.1,
                 input_mode: str = "pad", resize_scale: float = 1.0,
                 grad_checkpointing: bool = False, layer_decay: float = 1.0,
                 channels_last: bool = False, timm_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(channels_last)
        if head not in ("vfm_uda", "daformer"):
            raise ValueError(f"unknown ViT head {head!r}; expected 'vfm_uda' or 'daformer'")
        if input_mode not in ("pad", "resize"):
            raise ValueError(f"unknown ViT input mode {input_mode!r}; expected 'pad' or 'resize'")
        self.backbone = DINOv2Backbone(backbone, drop_path, grad_checkpointing, timm_kwargs)
        c = self.backbone.embed_dim
        self.head_name, self.input_mode, self.resize_scale = head, input_mode, resize_scale
        self.layer_decay = layer_decay
        self.output_stride = OUTPUT_STRIDE
        self.num_classes = num_classes
        self.pyramid: FeaturePyramid | None = None
        self.decode_head: nn.Module
        if head == "vfm_uda":
            self.layers = [self.backbone.depth - 1]
            self.decode_head = VFMUDAHead(c, num_classes)
            self.feature_channels = self.decode_head.channels
        else:
            self.layers = feature_layers(self.backbone.depth)
            self.pyramid = FeaturePyramid(c)
            self.decode_head = DAFormerHead([c] * 4, num_classes, channels=decoder_channels,
                                            dropout=dropout)
            self.feature_channels = decoder_channels
        self.projection_head: nn.Module | None = None
        self.embed_dim = 0
        if projection:
            self.embed_dim = embed_dim or PUBLISHED_EMBED_DIM
            self.projection_head = (ProjectionHead(c, c, self.embed_dim) if head == "vfm_uda"
                                    else MultiLevelProjectionHead([c] * 4, self.embed_dim))

    def prepare_input(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(the transformer's input, the image pixels it spans: (height, width))."""
        H, W = images.shape[-2:]
        size = (vit_input_size(H, self.input_mode, self.resize_scale),
                vit_input_size(W, self.input_mode, self.resize_scale))
        if self.input_mode == "pad":
            # padded always (by 0 on a multiple of 14): no branch on the size, so an exported
            # graph (torch.export, ONNX) stays valid for every input size
            return F.pad(images, (0, (-W) % PATCH_SIZE, 0, (-H) % PATCH_SIZE)), size
        if size != (H, W):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return images, (H, W)

    def covered_size(self, height: int, width: int) -> tuple[int, int]:
        """The image pixels (height, width) the head's maps span for an image of that size: the
        padded size (``"pad"``), the image itself (``"resize"``)."""
        if self.input_mode == "pad":
            return (vit_input_size(height, "pad", 1.0), vit_input_size(width, "pad", 1.0))
        return (height, width)

    def to_output_grid(self, x: Tensor, image_size: tuple[int, int]) -> Tensor:
        """A map at the head's grid (4x the token grid) sampled at the model's output grid of an
        image of ``image_size``: what ``forward`` does to its logits (HRDA's scale attention, a
        second head on the same inputs, goes through it too)."""
        H, W = image_size
        grid = (math.ceil(H / OUTPUT_STRIDE), math.ceil(W / OUTPUT_STRIDE))
        return sample_output_grid(x, self.covered_size(H, W), grid)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        images = self._prepare(images)
        H, W = images.shape[-2:]
        x, covered = self.prepare_input(images)
        maps = self.backbone(x, self.layers)
        grid = (math.ceil(H / OUTPUT_STRIDE), math.ceil(W / OUTPUT_STRIDE))
        if self.pyramid is None:
            logits, features = self.decode_head(maps[-1])
            emb_in: Any = maps[-1]
        else:
            levels = self.pyramid(maps)
            logits, features = self.decode_head(levels)
            emb_in = levels
        out = {"logits": sample_output_grid(logits, covered, grid),
               "features": sample_output_grid(features, covered, grid),
               "backbone": maps[-1]}
        if self.projection_head is not None:
            # resampling blends unit vectors: normalise again on the output grid
            emb = sample_output_grid(self.projection_head(emb_in), covered, grid)
            out["embeddings"] = l2_normalize(emb)
        return out

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
        """Layer-wise decayed groups (module docstring); one-dimensional parameters get no weight
        decay, as in every fastuda model. Each group carries ``name`` and ``lr_mult``."""
        depth = self.backbone.depth
        buckets: dict[tuple[str, bool], tuple[float, list[nn.Parameter]]] = {}
        order: list[str] = []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if not name.startswith("backbone."):
                part, mult = "head", head_lr_mult
            elif name.startswith("backbone.vit.blocks."):
                i = int(name.split(".")[3])
                part, mult = f"backbone.block{i}", self.layer_decay ** (depth - 1 - i)
            else:  # patch embedding, class token, position embedding, final norm
                part, mult = "backbone.stem", self.layer_decay ** depth
            key = (part, p.ndim <= 1)
            if part not in order:
                order.append(part)
            buckets.setdefault(key, (mult, []))[1].append(p)
        # the last block (lr_mult 1) first: group 0's lr is the one the trainer logs
        blocks = sorted((p for p in order if p.startswith("backbone.block")),
                        key=lambda p: -int(p.removeprefix("backbone.block")))
        order = blocks + [p for p in order if not p.startswith("backbone.block")]
        groups = []
        for part in order:
            for no_decay in (False, True):
                if (part, no_decay) in buckets:
                    mult, params = buckets[(part, no_decay)]
                    groups.append({"params": params, "lr": lr * mult, "lr_mult": mult,
                                   "weight_decay": 0.0 if no_decay else weight_decay,
                                   "name": part + ("_no_decay" if no_decay else "")})
        return groups


__all__ = ["DINOv2Backbone", "FeaturePyramid", "PATCH_SIZE", "VFMUDAHead", "VIT_SPECS",
           "ViTSegModel", "ViTSpec", "feature_layers", "sample_output_grid", "vit_input_size"]
