"""Parameter counts against published numbers and against counts derived by hand from the papers.

Big variants are built on the meta device: construction only, no memory, no forward.
"""

from __future__ import annotations

import pytest
import torch

from fastuda.config import ModelConfig
from fastuda.models import build_model
from fastuda.models.mit import MixTransformer
from fastuda.models.resnet import ResNet


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(fn):
    with torch.device("meta"):
        return fn()


# torchvision's ImageNet ResNets (weights meta "num_params") minus their 1000-way fc layer
TORCHVISION_TOTAL = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet101": 44_549_160}
TORCHVISION_FC = {"resnet18": 512 * 1000 + 1000, "resnet50": 2048 * 1000 + 1000,
                  "resnet101": 2048 * 1000 + 1000}


@pytest.mark.parametrize("depth", ["resnet18", "resnet50", "resnet101"])
def test_resnet_matches_torchvision_backbone(depth: str) -> None:
    model = on_meta(lambda: ResNet(depth))
    assert n_params(model) == TORCHVISION_TOTAL[depth] - TORCHVISION_FC[depth]


def test_resnet101_is_42_5m_and_deeplabv2_adds_the_aspp() -> None:
    model = on_meta(lambda: build_model(ModelConfig(name="deeplabv2", backbone="resnet101",
                                                    projection=False)))
    backbone = n_params(model.backbone)
    assert round(backbone / 1e6, 1) == 42.5
    # ASPP: four 3x3 convs 2048 -> 19 classes with bias
    assert n_params(model.decode_head) == 4 * (2048 * 9 * 19 + 19)


def test_deeplabv2_projection_head_size() -> None:
    # SePiCo: 1x1 conv-BN-ReLU 2048 -> 2048, 1x1 conv-BN-ReLU 2048 -> 512
    model = on_meta(lambda: build_model(ModelConfig(name="deeplabv2", backbone="resnet101")))
    assert n_params(model.projection_head) == 2048 * 2048 + 2 * 2048 + 2048 * 512 + 2 * 512
    assert model.embed_dim == 512


# SegFormer, Table 6: channels, depths; heads (1, 2, 5, 8), MLP ratio 4, reduction (8, 4, 2, 1)
SEGFORMER = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
# SegFormer, Table 1 (ADE20K, 150 classes): encoder / decoder / total parameters in millions
PAPER = {
    "mit_b0": (3.4, 0.4, 3.8), "mit_b1": (13.1, 0.6, 13.7), "mit_b2": (24.2, 3.3, 27.5),
    "mit_b3": (44.0, 3.3, 47.3), "mit_b4": (60.8, 3.3, 64.1), "mit_b5": (81.4, 3.3, 84.7),
}


def mit_count_by_hand(dims: tuple[int, ...], depths: tuple[int, ...]) -> int:
    """The MiT parameter count written out from the paper's description of the layers."""
    total, c_in = 0, 3
    for i, (c, depth) in enumerate(zip(dims, depths, strict=True)):
        k = 7 if i == 0 else 3
        sr = (8, 4, 2, 1)[i]
        total += c * c_in * k * k + c + 2 * c  # overlapping patch embedding conv + LayerNorm
        per_block = 2 * c  # norm1
        per_block += (c * c + c) + (2 * c * c + 2 * c) + (c * c + c)  # q, kv, output proj
        if sr > 1:
            per_block += c * c * sr * sr + c + 2 * c  # reduction conv + its LayerNorm
        per_block += 2 * c  # norm2
        hidden = 4 * c
        per_block += (hidden * c + hidden) + (hidden * 9 + hidden) + (c * hidden + c)  # Mix-FFN
        total += depth * per_block + 2 * c  # blocks + stage LayerNorm
        c_in = c
    return total


def segformer_decoder_count(dims: tuple[int, ...], width: int, classes: int = 150) -> int:
    """All-MLP decoder: per-level linear to ``width``, 1x1 fuse conv (no bias) + BN, classifier."""
    return sum(c * width + width for c in dims) + 4 * width * width + 2 * width + \
        width * classes + classes


@pytest.mark.parametrize("name", list(SEGFORMER))
def test_mit_encoder_counts_match_segformer(name: str) -> None:
    dims, depths = SEGFORMER[name]
    encoder = n_params(on_meta(lambda: MixTransformer(name)))
    assert encoder == mit_count_by_hand(dims, depths)
    # The paper's totals are SegFormer (encoder + all-MLP decoder, C = 256 for B0/B1, 768 above)
    # rounded to 0.1M, and its encoder column equals total minus decoder of the rounded numbers
    # (B0: 3.8 - 0.4 = 3.4 although the encoder alone is 3.32M; likewise B1 13.15M, B3 44.07M).
    paper_encoder, paper_decoder, paper_total = PAPER[name]
    decoder = segformer_decoder_count(dims, 256 if name in ("mit_b0", "mit_b1") else 768)
    assert round(decoder / 1e6, 1) == paper_decoder
    assert round((encoder + decoder) / 1e6, 1) == paper_total
    assert round(paper_total - paper_decoder, 1) == paper_encoder
    # and the encoder alone is within the paper's 0.1M precision of its encoder column
    assert abs(encoder / 1e6 - paper_encoder) < 0.1


def test_daformer_head_size_for_mit_b5() -> None:
    model = on_meta(lambda: build_model(ModelConfig(name="daformer", backbone="mit_b5")))
    e, dims = 256, (64, 128, 320, 512)
    embed = sum(c * e + e for c in dims)
    cat = 4 * e
    aspp = (cat * e + 2 * e)  # dilation 1: 1x1 conv-BN
    aspp += 3 * (cat * 9 + 2 * cat + cat * e + 2 * e)  # depth-wise 3x3-BN + point-wise 1x1-BN
    bottleneck = 4 * e * e * 9 + 2 * e
    classifier = e * 19 + 19
    assert n_params(model.decode_head) == embed + aspp + bottleneck + classifier
    # SePiCo projection: 1024 -> 256 -> 256, conv-BN-ReLU twice
    assert n_params(model.projection_head) == 1024 * 256 + 2 * 256 + 256 * 256 + 2 * 256
