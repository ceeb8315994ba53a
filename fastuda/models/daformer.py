"""DAFormer (Hoyer et al., CVPR 2022): MiT encoder + context-aware fusion decoder.

Logits and the fused 256-channel decoder map are at stride 4. The SePiCo projection head reads the
four encoder stages (resized to stride 4, concatenated) and gives D = 256 unit-norm embeddings.
"""

from __future__ import annotations

from torch import Tensor

from . import outputs as O
from .base import SegModel
from .heads import DAFormerHead, MultiLevelProjectionHead
from .mit import MixTransformer

PUBLISHED_EMBED_DIM = 256


class DAFormer(SegModel):
    def __init__(self, backbone: str = "mit_b5", num_classes: int = 19,
                 decoder_channels: int = 256, projection: bool = True, embed_dim: int = 0,
                 drop_path: float = 0.1, dropout: float = 0.1,
                 channels_last: bool = False) -> None:
        super().__init__(channels_last)
        self.backbone = MixTransformer(backbone, drop_path_rate=drop_path)
        self.decode_head = DAFormerHead(self.backbone.out_channels, num_classes,
                                        channels=decoder_channels, dropout=dropout)
        self.output_stride = 4
        self.num_classes = num_classes
        self.feature_channels = decoder_channels
        if projection:
            self.embed_dim = embed_dim or PUBLISHED_EMBED_DIM
            self.projection_head = MultiLevelProjectionHead(self.backbone.out_channels,
                                                            self.embed_dim)
        else:
            self.embed_dim = 0
            self.projection_head = None

    def backbone_output(self, images: Tensor) -> Tensor:
        return self.backbone(self._prepare(images))[-1]

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        stages = self.backbone(self._prepare(images))
        logits, fused = self.decode_head(stages)
        out = {O.LOGITS: logits, O.FEATURES: fused, O.BACKBONE: stages[-1]}
        if self.projection_head is not None:
            out[O.EMBEDDINGS] = self.projection_head(stages)
        return out
