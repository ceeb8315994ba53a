"""Decode and projection heads: DeepLab-V2 ASPP classifier, DAFormer decoder, SePiCo projections.

- ``ASPPClassifier`` (DeepLab-V2, Chen et al. 2017): four 3x3 convs straight to class scores with
  dilation 6/12/18/24, summed.
- ``DAFormerHead`` (Hoyer et al., CVPR 2022): per-level linear embedding to 256 channels, bilinear
  resize to the stride-4 grid, concatenation, then context-aware fusion: an ASPP of a 1x1 conv and
  three depth-wise separable 3x3 convs (dilation 6/12/18), each conv-BN-ReLU, concatenated and fused
  by a 3x3 conv-BN-ReLU; dropout and a 1x1 classifier follow. ``fusion="conv"`` replaces the ASPP
  and its 3x3 bottleneck by one 1x1 conv-BN-ReLU (SegFormer-style, DAFormer's "conv1" decoder):
  HRDA's scale-attention head is this variant (lhoyer/HRDA c370b5b
  mmseg/models/decode_heads/hrda_head.py#L49-L58).
- ``ProjectionHead`` / ``MultiLevelProjectionHead`` (SePiCo, Xie et al., TPAMI 2023): two 1x1
  conv-BN-ReLU layers and per-pixel L2 normalisation; the multi-level one reads the four encoder
  stages resized to the stride-4 grid and concatenated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize (align_corners=False, as DAFormer/SePiCo); identity when already there."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def l2_normalize(x: Tensor, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """Unit-norm along ``dim``. fp16/bf16 input is normalised in fp32 and cast back: a norm in
    fp16 overflows past 65504 and its reciprocal underflows."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.normalize(x.float(), dim=dim, eps=eps).to(x.dtype)
    return F.normalize(x, dim=dim, eps=eps)


class ConvBNReLU(nn.Sequential):
    """conv (no bias) -> BatchNorm -> ReLU, with mmcv ConvModule's kaiming fan-out init."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 dilation: int = 1, groups: int = 1) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                         padding=dilation * (kernel_size // 2), dilation=dilation, groups=groups,
                         bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SigmoidMapHead(nn.Module):
    """3x3 conv-BN-ReLU, then a 1x1 conv to ``out_channels`` and a sigmoid: per-pixel values in
    [0, 1], [B, out_channels, h, w] (CLUDA's pair weights, one channel)."""

    def __init__(self, in_channels: int, channels: int, out_channels: int = 1) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, feats: Tensor) -> Tensor:
        return torch.sigmoid(self.out(self.conv(feats)))


class DepthwiseSeparableConv(nn.Sequential):
    """Depth-wise 3x3 conv-BN-ReLU then point-wise 1x1 conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__()
        self.depthwise = ConvBNReLU(in_channels, in_channels, 3, dilation, groups=in_channels)
        self.pointwise = ConvBNReLU(in_channels, out_channels, 1)


class ASPPClassifier(nn.Module):
    """DeepLab-V2 classifier: sum of dilated 3x3 convs from features straight to class scores."""

    def __init__(self, in_channels: int, num_classes: int,
                 dilations: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.in_channels, self.dilations = in_channels, tuple(dilations)
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations)
        for conv in self.convs:  # DeepLab-V2 / DAFormer: N(0, 0.01), zero bias
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor, branches: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The class scores (the branches' sum); ``branches=True``: (scores, the branch outputs
        concatenated along channels), from one evaluation of each branch."""
        outs = [conv(x) for conv in self.convs]
        total = outs[0]
        for o in outs[1:]:
            total = total + o
        return (total, torch.cat(outs, 1)) if branches else total

    def branches(self, x: Tensor) -> Tensor:
        """The branch outputs concatenated along channels; ``forward`` is their sum."""
        return self(x, branches=True)[1]


class DAFormerHead(nn.Module):
    """DAFormer decoder. ``forward`` returns (logits, fused 256-channel feature), both stride 4."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 256,
                 dilations: tuple[int, ...] = (1, 6, 12, 18), dropout: float = 0.1,
                 fusion: str = "aspp") -> None:
        super().__init__()
        if fusion not in ("aspp", "conv"):
            raise ValueError(f"unknown DAFormer fusion {fusion!r}; expected 'aspp' or 'conv'")
        self.in_channels, self.dropout_p = list(in_channels), float(dropout)
        # a linear layer per level (DAFormer's "mlp" embedding: no norm, no activation)
        self.embed = nn.ModuleList(nn.Linear(c, channels) for c in in_channels)
        cat_channels = channels * len(in_channels)
        self.fusion: nn.ModuleList
        self.bottleneck: nn.Module
        if fusion == "conv":  # one 1x1 conv-BN-ReLU, no bottleneck (mmcv ConvModule, kernel 1)
            self.fusion = nn.ModuleList([ConvBNReLU(cat_channels, channels, 1)])
            self.bottleneck = nn.Identity()
        else:
            self.fusion = nn.ModuleList(
                ConvBNReLU(cat_channels, channels, 1) if d == 1
                else DepthwiseSeparableConv(cat_channels, channels, d) for d in dilations)
            self.bottleneck = ConvBNReLU(channels * len(dilations), channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)
        self.channels = channels

    def forward(self, stages: list[Tensor]) -> tuple[Tensor, Tensor]:
        size = stages[0].shape[-2:]
        levels = []
        for x, embed in zip(stages, self.embed, strict=True):
            # the linear embedding applied as a 1x1 conv (no token reshapes, any memory format);
            # resizing after it (as published) keeps the upsampled maps at 256 channels
            y = F.conv2d(x, embed.weight[:, :, None, None], embed.bias)
            levels.append(resize(y, size))
        x = torch.cat(levels, dim=1)
        fused = self.bottleneck(torch.cat([branch(x) for branch in self.fusion], dim=1))
        return self.classifier(self.dropout(fused)), fused


class ProjectionHead(nn.Module):
    """Two 1x1 conv-BN-ReLU layers (in -> hidden -> out), L2-normalised per pixel."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvBNReLU(in_channels, hidden_channels, 1),
                                   ConvBNReLU(hidden_channels, out_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return l2_normalize(self.convs(x))


class MultiLevelProjectionHead(nn.Module):
    """SePiCo's DAFormer projection: four stages resized to stage 1 and concatenated, then
    1x1 conv-BN-ReLU (sum C_i -> D), 1x1 conv-BN-ReLU (D -> D), L2 normalisation.

    The first conv is computed without building the upsampled concatenation: a 1x1 conv is linear
    per pixel and bilinear weights sum to one, so conv(cat(up(x_i))) = sum_i up(W_i x_i) + b. Each
    level is projected at its own resolution and only D-channel maps are upsampled. The weight is
    still one [D, sum C_i] conv, as in the published head.
    """

    def __init__(self, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.convs = nn.Sequential(ConvBNReLU(sum(in_channels), out_channels, 1),
                                   ConvBNReLU(out_channels, out_channels, 1))

    def forward(self, stages: list[Tensor]) -> Tensor:
        conv, bn, relu = self.convs[0]
        size = stages[0].shape[-2:]
        weights = conv.weight.split(self.in_channels, dim=1)
        x = None
        for stage, w in zip(stages, weights, strict=True):
            y = resize(F.conv2d(stage, w), size)
            x = y if x is None else x + y
        return l2_normalize(self.convs[1](relu(bn(x))))

    def forward_reference(self, stages: list[Tensor]) -> Tensor:
        """The published formulation (resize, concatenate, convolve); for tests."""
        size = stages[0].shape[-2:]
        x = torch.cat([resize(s, size) for s in stages], dim=1)
        return l2_normalize(self.convs(x))


__all__ = ["ASPPClassifier", "ConvBNReLU", "DAFormerHead", "DepthwiseSeparableConv",
           "SigmoidMapHead",
           "MultiLevelProjectionHead", "ProjectionHead", "l2_normalize", "resize"]
