"""Dilated ResNet backbones (18/50/101) with torchvision's parameter layout.

Module names match torchvision's ``resnet*`` state dicts (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` ...), so an ImageNet checkpoint maps onto the backbone key for key.
The stride sits on the 3x3 conv of a bottleneck (torchvision's "v1.5"). For DeepLab-V2 the last
two stages trade their stride for dilation (output stride 8); as in torchvision and mmseg
(``contract_dilation``) the first block of a dilated stage keeps the previous stage's dilation.

``resnet50_v1c`` / ``resnet101_v1c`` are mmseg's ``ResNetV1c`` (``deep_stem=True``,
``avg_down=False``; BIT-DA/SePiCo mmseg/models/backbones/resnet.py#L589-L622, #L687-L699), the
DeepLab-V2 backbone of the SePiCo and DAFormer releases: the 7x7 stem is replaced by three 3x3
convs 3 -> 32 (stride 2) -> 32 -> 64, each with BN and ReLU, named as mmcv names them (``stem.0``
conv, ``stem.1`` BN, ``stem.3``/``stem.4``, ``stem.6``/``stem.7``; 2, 5, 8 are the ReLUs), then the
same max-pool and stages as above, so the open-mmlab ``resnet101_v1c`` ImageNet file maps onto
the backbone key for key.

``resnet101_deeplab`` is the ResNet-101 of the DeepLab-V2 release as CorDA trains it
(qinenergy/corda model/deeplabv2_gta.py#L64-L108, #L187-L240, the "Caffe" layout of the
COCO-pretrained DeepLab file): the stride of a bottleneck on its first 1x1 conv, a ceil-mode
max-pool, and every block of the dilated stages at the full dilation (2 and 4, no contraction);
the parameter names and shapes are torchvision's, so its ``resnet101COCO`` file loads key for key
(its COCO classifier ``layer5.*`` is dropped).
"""

from __future__ import annotations

from torch import Tensor, nn

# (block type, blocks per stage) per depth, as in He et al. 2016, Table 1.
RESNET_SPECS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet50_v1c": ("bottleneck", (3, 4, 6, 3)),
    "resnet101_v1c": ("bottleneck", (3, 4, 23, 3)),
    "resnet101_deeplab": ("bottleneck", (3, 4, 23, 3)),
}
# the variants with mmseg's deep stem (ResNetV1c)
DEEP_STEM = frozenset({"resnet50_v1c", "resnet101_v1c"})
# the DeepLab-V2 release's Caffe layout (stride on the 1x1 conv, ceil-mode pool, full dilations)
CAFFE_LAYOUT = frozenset({"resnet101_deeplab"})


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; unlike torchvision's, it supports dilation."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride, dilation), 1x1 expand x4, with a residual; ``stride_in_1x1``
    puts the stride on the first 1x1 conv instead (the Caffe layout of the DeepLab release)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, stride_in_1x1: bool = False) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, s1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, s3, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# which of the four stages trade their stride for dilation, per output stride
OUTPUT_STRIDES = {8: (False, False, True, True), 16: (False, False, False, True),
                  32: (False, False, False, False)}


class ResNet(nn.Module):
    """ResNet feature extractor returning the outputs of the four stages (no pooling, no fc).

    ``output_stride`` 8 is the DeepLab-V2 layout (strides 4, 8, 8, 8 for the four stages: the
    last two trade their stride for dilation), 16 dilates only the last stage (4, 8, 16, 16;
    about half the compute at a given input), 32 is the plain classification layout.
    """

    def __init__(self, depth: str = "resnet101", output_stride: int = 8) -> None:
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"unknown ResNet {depth!r}; expected one of {sorted(RESNET_SPECS)}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"ResNet output_stride must be one of {sorted(OUTPUT_STRIDES)}, "
                             f"got {output_stride}")
        kind, blocks = RESNET_SPECS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.deep_stem = depth in DEEP_STEM
        if self.deep_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 32, 3, 2, padding=1, bias=False), nn.BatchNorm2d(32),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, 3, 1, padding=1, bias=False), nn.BatchNorm2d(32),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, 64, 3, 1, padding=1, bias=False), nn.BatchNorm2d(64),
                nn.ReLU(inplace=True))
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
        self.caffe = depth in CAFFE_LAYOUT
        self.maxpool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=self.caffe)
        self._in_channels = 64
        self._dilation = 1
        dilate = OUTPUT_STRIDES[output_stride]
        self.layer1 = self._make_stage(block, 64, blocks[0], 1, dilate[0])
        self.layer2 = self._make_stage(block, 128, blocks[1], 2, dilate[1])
        self.layer3 = self._make_stage(block, 256, blocks[2], 2, dilate[2])
        self.layer4 = self._make_stage(block, 512, blocks[3], 2, dilate[3])
        self.out_channels = [c * block.expansion for c in (64, 128, 256, 512)]
        self.output_stride = output_stride
        self._init_weights()

    def _make_stage(self, block: type[nn.Module], channels: int, num_blocks: int, stride: int,
                    dilate: bool) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out_channels = channels * block.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))
        # the first block keeps the previous dilation so the sampling grid grows gradually (the
        # Caffe layout dilates it fully, as released)
        kw = {"stride_in_1x1": True} if self.caffe else {}
        first = self._dilation if self.caffe else previous_dilation
        layers = [block(self._in_channels, channels, stride, dilation=first,
                        downsample=downsample, **kw)]
        self._in_channels = out_channels
        for _ in range(1, num_blocks):
            layers.append(block(out_channels, channels, 1, dilation=self._dilation, **kw))
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


def resnet(depth: str, output_stride: int = 8) -> ResNet:
    """Build a ResNet backbone by name (``resnet18``, ``resnet50``, ``resnet101``,
    ``resnet50_v1c``, ``resnet101_v1c``, ``resnet101_deeplab``)."""
    return ResNet(depth, output_stride)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["CAFFE_LAYOUT", "DEEP_STEM", "RESNET_SPECS", "BasicBlock", "Bottleneck", "ResNet",
           "count_parameters", "resnet"]
