"""DeepLab-V2 (Chen et al., TPAMI 2017): dilated ResNet (output stride 8) + ASPP classifier.

``output_stride = 16`` (only the last stage dilated) is not the published model: it halves the
backbone's compute for small CPU runs (the demos).

The classifier reads layer 4 directly (no dropout, as in DeepLab-V2 and DAFormer's DLV2 head, so
``model.dropout`` is not used here). The SePiCo projection head reads layer 4 too: 1x1 conv-BN-ReLU
to the same width (2048 for ResNet-50/101), 1x1 conv-BN-ReLU to D = 512, L2-normalised.
"""

from __future__ import annotations

from torch import Tensor

from . import outputs as O
from .base import SegModel
from .heads import ASPPClassifier, ProjectionHead
from .resnet import ResNet

PUBLISHED_EMBED_DIM = 512


class DeepLabV2(SegModel):
    def __init__(self, backbone: str = "resnet101", num_classes: int = 19,
                 projection: bool = True, embed_dim: int = 0,
                 channels_last: bool = False, output_stride: int = 8) -> None:
        super().__init__(channels_last)
        self.backbone = ResNet(backbone, output_stride)
        width = self.backbone.out_channels[-1]
        self.decode_head = ASPPClassifier(width, num_classes)
        self.output_stride = self.backbone.output_stride
        self.num_classes = num_classes
        self.feature_channels = width
        if projection:
            self.embed_dim = embed_dim or PUBLISHED_EMBED_DIM
            self.projection_head = ProjectionHead(width, width, self.embed_dim)
        else:
            self.embed_dim = 0
            self.projection_head = None

    def backbone_output(self, images: Tensor) -> Tensor:
        return self.backbone(self._prepare(images))[-1]

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        c4 = self.backbone(self._prepare(images))[-1]
        # through the head's __call__ (HRDA's attention reads its input with a forward pre-hook)
        logits, branches = self.decode_head(c4, branches=True)
        out = {O.LOGITS: logits, O.FEATURES: c4, O.BACKBONE: c4, O.ASPP_BRANCHES: branches}
        if self.projection_head is not None:
            out[O.EMBEDDINGS] = self.projection_head(c4)
        return out
