"""Parameter counts against published numbers and against counts derived by hand from the papers.

Big variants are built on the meta device: construction only, no memory, no forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastuda.config import ConfigError, ModelConfig, load_config
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


@pytest.mark.parametrize("depth", ["resnet50", "resnet101"])
def test_resnet_v1c_is_the_torchvision_count_with_the_deep_stem(depth: str) -> None:
    # mmseg's ResNetV1c: the 7x7 conv (64 x 3 x 49) and its BN (2 x 64) become three 3x3 convs
    # 3 -> 32 -> 32 -> 64 with BNs (BIT-DA/SePiCo mmseg/models/backbones/resnet.py#L589-L622)
    seven = 64 * 3 * 49 + 2 * 64
    deep = 32 * 3 * 9 + 2 * 32 + 32 * 32 * 9 + 2 * 32 + 64 * 32 * 9 + 2 * 64
    model = on_meta(lambda: ResNet(f"{depth}_v1c"))
    assert n_params(model) == TORCHVISION_TOTAL[depth] - TORCHVISION_FC[depth] - seven + deep


def test_resnet_v1c_stem_strides_and_stages() -> None:
    net = ResNet("resnet50_v1c").eval()
    convs = [m for m in net.stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 32, (3, 3), (2, 2)), (32, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1))]
    assert [type(m).__name__ for m in net.stem] == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    assert not hasattr(net, "conv1")
    # same DeepLab-V2 stages as the torchvision layout: output stride 8, contracted dilations
    assert net.layer3[0].conv2.dilation == (1, 1) and net.layer4[0].conv2.dilation == (2, 2)
    assert net.layer4[1].conv2.dilation == (4, 4)
    with torch.no_grad():
        stages = net(torch.randn(1, 3, 64, 64))
    assert [tuple(x.shape[1:]) for x in stages] == [(256, 16, 16), (512, 8, 8), (1024, 8, 8),
                                                    (2048, 8, 8)]
    # the stem is the three conv-BN-ReLU in order, then the 3x3/2 max-pool
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = x
        for i in (0, 3, 6):
            y = torch.relu(net.stem[i + 1](net.stem[i](y)))
        y = torch.nn.functional.max_pool2d(y, 3, 2, 1)
        assert torch.allclose(net.layer1(y), net(x)[0])


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


def test_resnet_deeplab_is_the_caffe_layout_of_the_release() -> None:
    # qinenergy/corda model/deeplabv2_gta.py: Bottleneck conv1 carries the stride (#L69), conv2
    # none (#L75); max-pool ceil_mode (#L197); layer3/layer4 with dilation 2/4 in every block
    # (#L200-L201, #L236-L239); the parameters are torchvision's ResNet-101's
    net = on_meta(lambda: ResNet("resnet101_deeplab"))
    assert n_params(net) == TORCHVISION_TOTAL["resnet101"] - TORCHVISION_FC["resnet101"]
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)
    assert net.maxpool.ceil_mode
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in net.layer3)
    assert all(b.conv2.dilation == (4, 4) and b.conv2.padding == (4, 4) for b in net.layer4)
    assert all(b.conv1.stride == (1, 1) for b in (*net.layer3, *net.layer4))
    # DeepLab's grid: 65 -> 7x7/2 conv 33 -> ceil pool 17 -> 1x1/2 conv 9 (then stride 1)
    real = ResNet("resnet101_deeplab").eval()
    with torch.no_grad():
        stages = real(torch.randn(1, 3, 65, 65))
    assert [tuple(x.shape[1:]) for x in stages] == [(256, 17, 17), (512, 9, 9), (1024, 9, 9),
                                                    (2048, 9, 9)]


def test_freeze_bn_affine_fixes_the_backbone_bn_only() -> None:
    model = build_model(ModelConfig(name="deeplabv2", backbone="resnet18", freeze_bn_affine=True))
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    frozen = {id(p) for m in bns for p in m.parameters()}
    assert all(p.requires_grad for p in model.parameters() if id(p) not in frozen)
    heads = [m for m in model.projection_head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert heads and all(m.weight.requires_grad for m in heads)
    grouped = {id(p) for g in model.param_groups(1e-3, 10, 0.01) for p in g["params"]}
    assert not grouped & {id(p) for m in bns for p in m.parameters()}
    # the statistics still come from the batch in training
    model.train()
    before = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, bns[0].running_mean)
    with pytest.raises(ConfigError, match="model.freeze_bn_affine"):
        ModelConfig(name="daformer", backbone="mit_b0", freeze_bn_affine=True)


PRESETS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(PRESETS.glob("sepico/deeplabv2_*.toml")),
                         ids=lambda p: p.stem)
def test_sepico_deeplabv2_presets_use_resnet101_v1c(path: Path) -> None:
    # BIT-DA/SePiCo experiments.py#L266 ('dlv2_proj', 'r101v1c'), #L29-L30
    # (open-mmlab://resnet101_v1c)
    model = load_config(path).model
    assert model.backbone == "resnet101_v1c" and not model.freeze_bn_affine


@pytest.mark.parametrize("name", ["corda/deeplabv2_gta2cs", "corda/deeplabv2_synthia2cs"])
def test_corda_presets_use_the_released_deeplab_resnet(name: str) -> None:
    # qinenergy/corda model/deeplabv2_gta.py#L187-L240 (Caffe-layout ResNet-101, BN affine fixed)
    model = load_config(PRESETS / f"{name}.toml").model
    assert model.backbone == "resnet101_deeplab" and model.freeze_bn_affine


def test_bipcl_preset_uses_the_released_deeplab_resnet_on_bgr_weights() -> None:
    # cvlab-yonsei/DASS model/DeeplabV2.py#L52-L95, #L117-L163 (the DeepLab Caffe layout, BN
    # affine fixed) from the Caffe-converted DeepLab_init.pth (config/so_config.yml#L45), fed
    # BGR minus the Caffe mean (dataset/transforms.py#L127-L150)
    model = load_config(PRESETS / "bipcl/deeplabv2_gta2cs.toml").model
    assert model.backbone == "resnet101_deeplab" and model.freeze_bn_affine
    assert model.pretrained_channels == "bgr"


@pytest.mark.parametrize("name", ["spcl/deeplabv2_gta2cs"])
def test_other_deeplabv2_presets_keep_torchvision_resnet101(name: str) -> None:
    assert load_config(PRESETS / f"{name}.toml").model.backbone == "resnet101"
