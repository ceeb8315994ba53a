"""HRDA wrapper: fusion against a hand computation, detail boxes, multi-resolution inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastuda.config import HRDAConfig, ModelConfig
from fastuda.models import HRDAModel, build_model
from fastuda.models.base import SegModel


class Stub(SegModel):
    """Stride-2 model whose outputs are simple functions of the pixels (average pooling)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.decode_head = nn.Conv2d(3, num_classes, 1)
        self.output_stride, self.num_classes = 2, num_classes
        self.feature_channels, self.embed_dim = 3, 0

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        feats = F.avg_pool2d(images, 2)
        return {"logits": self.decode_head(feats), "features": feats}


def stub_hrda(detail: tuple[int, int], stride: list[int] | None = None, *,
              classwise: bool = True, divisible: int = 8) -> HRDAModel:
    torch.manual_seed(0)
    cfg = HRDAConfig(enabled=True, context_scale=0.5, detail_crop=list(detail),
                     attention_channels=4, slide_stride=stride or [],
                     attention_classwise=classwise, crop_divisible=divisible)
    # a local (1x1) attention head on the decode head's input keeps the stub's outputs local
    return HRDAModel(Stub(), cfg, attention_head=nn.Conv2d(3, 3 if classwise else 1, 1)).eval()


def up(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_fusion_matches_a_hand_computation() -> None:
    """The released HRDAHead.forward: the class-wise attention masked to the box's cells of the
    context grid, fused = up(att) * detail (placed in zeros) + up((1 - att) * context)."""
    m = stub_hrda((8, 4))  # align = 2 / 0.5 = 4 pixels
    x = torch.randn(2, 3, 16, 12)
    box = (4, 12, 8, 12)
    out = m(x, box=box)
    ctx = m.model(up(x, (8, 6)))  # context grid 4 x 3
    att_c = torch.sigmoid(m.attention_head(ctx["features"]))
    det = m.model(x[:, :, 4:12, 8:12])
    grid = (8, 6)  # 16x12 / stride 2
    mask = torch.zeros(1, 1, 4, 3)
    mask[:, :, 1:3, 2:3] = 1  # context cells 4 // 4 .. 12 // 4, 8 // 4 .. 12 // 4
    att = up(att_c * mask, grid)
    placed = torch.zeros(2, 3, *grid)
    placed[:, :, 2:6, 4:6] = det["logits"]
    expected = att * placed + up((1 - att_c * mask) * ctx["logits"], grid)
    assert out["logits"].shape == (2, 3, 8, 6)
    assert torch.allclose(out["logits"], expected, atol=1e-6)
    assert torch.allclose(out["attention"], att, atol=1e-6)
    assert torch.all(out["attention"][..., 0, :] == 0)  # rows whose context cells are masked
    assert torch.equal(out["logits"][..., 0, :], up(ctx["logits"], grid)[..., 0, :])
    assert torch.equal(out["detail_box"], torch.tensor(box))
    assert out["logits_detail"].shape == (2, 3, 4, 2)
    assert out["features_detail"].shape == (2, 3, 4, 2)
    assert out["attention_context"].shape == (2, 3, 4, 3)  # one channel per class
    assert torch.allclose(out["attention_detail"], att[:, :, 2:6, 4:6])
    assert torch.allclose(out["features"], ctx["features"])
    # gradients reach the attention head through the fusion
    out["logits"].sum().backward()
    assert m.attention_head.weight.grad.abs().sum() > 0


def test_detail_box_is_aligned_deterministic_and_uniform() -> None:
    """The corner on multiples of crop_divisible, drawn as the release's get_crop_bbox:
    offset = randint(0, (margin + 1) // d) * d."""
    m = stub_hrda((8, 4), divisible=4).train()
    boxes = [m.draw_box(24, 16, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert boxes[0] == boxes[1]
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        y1, y2, x1, x2 = m.draw_box(24, 16, g)
        assert y1 % 4 == 0 and x1 % 4 == 0 and (y2 - y1, x2 - x1) == (8, 4)
        assert 0 <= y1 and y2 <= 24 and 0 <= x1 and x2 <= 16
        seen.add((y1, x1))
    # margins 16 and 12: (16 + 1) // 4 = 4 rows (0..12), (12 + 1) // 4 = 3 columns (0..8)
    assert seen == {(y, x) for y in range(0, 13, 4) for x in range(0, 9, 4)}
    m8 = stub_hrda((8, 4)).train()  # the released divisor 8
    seen = {m8.draw_box(24, 16, g)[::2] for _ in range(100)}
    assert seen == {(0, 0), (8, 0)}  # (16 + 1) // 8 = 2 rows, (12 + 1) // 8 = 1 column
    assert m8.draw_box(8, 4, g) == (0, 8, 0, 4)  # the crop is the box: no draw
    # training forward draws from the bound generator, the same boxes after re-seeding
    x = torch.randn(1, 3, 24, 16)
    with pytest.raises(RuntimeError, match="use_generator"):
        m(x)
    m.use_generator(torch.Generator().manual_seed(5))
    first = [m(x)["detail_box"].tolist() for _ in range(3)]
    m.use_generator(torch.Generator().manual_seed(5))
    assert [m(x)["detail_box"].tolist() for _ in range(3)] == first
    with pytest.raises(ValueError, match="multiples of 2"):
        m(x, box=(1, 9, 0, 4))


def test_inference_with_one_window_is_the_training_fusion_over_the_whole_image() -> None:
    m = stub_hrda((16, 12))
    x = torch.randn(2, 3, 16, 12)
    inf = m(x)  # eval mode: multi-resolution inference, one detail window = the image
    full = m.forward_train(x, (0, 16, 0, 12))
    assert "detail_box" not in inf
    assert torch.allclose(inf["logits"], full["logits"], atol=1e-6)
    assert torch.allclose(inf["attention"], full["attention"], atol=1e-6)


def test_sliding_detail_windows_are_averaged() -> None:
    m = stub_hrda((8, 8), stride=[4, 4])
    x = torch.randn(1, 3, 16, 12)
    assert m.windows(16, 12) == [(y, y + 8, x0, x0 + 8) for y in (0, 4, 8) for x0 in (0, 4)]
    inf = m(x)
    acc, hits = torch.zeros(1, 3, 8, 6), torch.zeros(1, 1, 8, 6)
    for y1, y2, x1, x2 in m.windows(16, 12):
        acc[..., y1 // 2:y2 // 2, x1 // 2:x2 // 2] += m.model(x[..., y1:y2, x1:x2])["logits"]
        hits[..., y1 // 2:y2 // 2, x1 // 2:x2 // 2] += 1
    detail = acc / hits
    ctx = m.model(up(x, (8, 6)))
    att_c = torch.sigmoid(m.attention_head(ctx["features"]))
    expected = up(att_c, (8, 6)) * detail + up((1 - att_c) * ctx["logits"], (8, 6))
    assert torch.allclose(inf["logits_detail"], detail, atol=1e-6)
    assert torch.allclose(inf["logits"], expected, atol=1e-6)
    # the stub is local (pooling + 1x1 conv): windowed detail = the whole image at full res
    assert torch.allclose(detail, m.model(x)["logits"], atol=1e-6)


def test_inference_pads_odd_sizes_and_crops_back() -> None:
    """13x10 with align 4: zeros at the bottom/right to 16x12, then cropped to ceil(13/2) x
    ceil(10/2). Expected values built independently of ``infer``: the training fusion written out
    by hand (one detail window = the whole padded image) on an input padded by assignment, and
    the stub's (local) logits on the un-padded image where no padding is in reach."""
    m = stub_hrda((16, 12))  # one detail window over the padded image
    x = torch.randn(2, 3, 13, 10)
    out = m(x)
    assert out["logits"].shape == (2, 3, 7, 5)  # ceil(13/2), ceil(10/2)
    assert out["logits_detail"].shape == (2, 3, 7, 5) and out["attention"].shape == (2, 3, 7, 5)
    xp = torch.zeros(2, 3, 16, 12)
    xp[..., :13, :10] = x  # zeros at the bottom and the right
    ctx = m.model(up(xp, (8, 6)))
    att_c = torch.sigmoid(m.attention_head(ctx["features"]))
    a = up(att_c, (8, 6))
    det = m.model(xp)["logits"]
    fused = a * det + up((1 - att_c) * ctx["logits"], (8, 6))
    torch.testing.assert_close(out["logits"], fused[..., :7, :5], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["logits_detail"], det[..., :7, :5], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["attention"], a[..., :7, :5], atol=1e-6, rtol=1e-5)
    # the detail view (2x2 pooling + 1x1 conv) of cells whose pixels are all real equals the
    # un-padded image's: rows 0-5 (pixels 0-11) and columns 0-4 (pixels 0-9)
    torch.testing.assert_close(out["logits_detail"][..., :6, :5], m.model(x)["logits"][..., :6, :5],
                               atol=1e-6, rtol=1e-5)
    # the last row's cells mix pixel row 12 with a zero row: pooled half of the real row
    half = m.model(F.pad(x[..., 12:13, :], (0, 0, 0, 1)))["logits"]
    torch.testing.assert_close(out["logits_detail"][..., 6:7, :], half, atol=1e-6, rtol=1e-5)


def test_real_model_shapes_and_param_groups() -> None:
    net = build_model(ModelConfig(name="deeplabv2", backbone="resnet18", num_classes=4,
                                  projection=False))
    m = HRDAModel(net, HRDAConfig(enabled=True, detail_crop=[32, 32], attention_channels=8))
    m.use_generator(torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 64, 64)
    out = m.train()(x)
    assert out["logits"].shape == (2, 4, 8, 8) and out["logits_detail"].shape == (2, 4, 4, 4)
    assert out["features_detail"].shape[-2:] == (4, 4)
    y1, y2, x1, x2 = out["detail_box"].tolist()
    assert y1 % 8 == 0 and x1 % 8 == 0 and (y2 - y1, x2 - x1) == (32, 32)
    with torch.no_grad():
        ev = m.eval()(x)
    assert ev["logits"].shape == (2, 4, 8, 8) and ev["attention"].shape == (2, 4, 8, 8)
    single = HRDAModel(net, HRDAConfig(enabled=True, detail_crop=[32, 32], attention_channels=8,
                                       attention_classwise=False))
    with torch.no_grad():
        assert single.eval()(x)["attention"].shape == (2, 1, 8, 8)  # one for all classes
    groups = m.param_groups(1e-3, 10.0, 0.01)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in m.parameters()}
    att = [g for g in groups if g["name"].startswith("attention")]
    assert att and all(g["lr"] == pytest.approx(1e-2) for g in att)
    # the released rule (mmseg custom_keys: "head" in decode_head.scale_attention.* wins over
    # "norm") decays every attention parameter, biases and BN included; "1d" exempts the 1-D ones
    n_att = sum(1 for _ in m.attention_head.parameters())
    assert [len(g["params"]) for g in att if g["weight_decay"] == 0.01] == [n_att]
    net.no_decay = "1d"
    att = [g for g in m.param_groups(1e-3, 10.0, 0.01) if g["name"].startswith("attention")]
    one_d = sum(1 for p in m.attention_head.parameters() if p.ndim <= 1)
    assert {g["weight_decay"]: len(g["params"]) for g in att} == {0.01: n_att - one_d,
                                                                  0.0: one_d}


def released_daformer_attention_params(in_channels: list[int], embed: int, out: int) -> int:
    """Parameters of the released attention head (lhoyer/HRDA c370b5b hrda_head.py#L49-L58 on
    configs/_base_/models/daformer_conv1_mitb5.py): an mlp embedding per level (weight + bias),
    one 1x1 ConvModule (no bias) + BN over the concatenation, the 1x1 conv_seg (with bias)."""
    embeds = sum(c * embed + embed for c in in_channels)
    fusion = len(in_channels) * embed * embed + 2 * embed
    return embeds + fusion + embed * out + out


def test_scale_attention_is_a_second_head_of_the_main_heads_type() -> None:
    """As released: a DAFormer head with attention_embed_dim-wide embeddings and the 1x1 conv
    fusion (no separable ASPP, no 3x3 bottleneck), the main head's dropout 0.1, class-wise
    output; for DeepLab-V2 a second DLV2 ASPP with the same dilations; for a ViT a second
    VFM-UDA head."""
    from fastuda.models.heads import ASPPClassifier, DAFormerHead
    from fastuda.models.vit import VFMUDAHead, ViTSegModel

    net = build_model(ModelConfig(name="daformer", backbone="mit_b0", projection=False))
    m = HRDAModel(net, HRDAConfig(enabled=True))  # attention_channels 256, class-wise
    a = m.attention_head
    assert isinstance(a, DAFormerHead) and a is not net.decode_head
    mit_b0 = [32, 64, 160, 256]
    assert [tuple(e.weight.shape) for e in a.embed] == [(256, c) for c in mit_b0]
    assert len(a.fusion) == 1 and tuple(a.fusion[0][0].weight.shape) == (256, 1024, 1, 1)
    assert a.fusion[0][0].bias is None and isinstance(a.fusion[0][1], nn.BatchNorm2d)
    assert isinstance(a.bottleneck, nn.Identity)
    assert isinstance(a.dropout, nn.Dropout2d) and a.dropout.p == 0.1
    assert tuple(a.classifier.weight.shape) == (19, 256, 1, 1)
    assert sum(p.numel() for p in a.parameters()) == \
        released_daformer_attention_params(mit_b0, 256, 19)
    one = HRDAModel(net, HRDAConfig(enabled=True, attention_channels=64,
                                    attention_classwise=False)).attention_head
    assert sum(p.numel() for p in one.parameters()) == \
        released_daformer_attention_params(mit_b0, 64, 1)

    dl = build_model(ModelConfig(name="deeplabv2", backbone="resnet18", projection=False))
    a = HRDAModel(dl, HRDAConfig(enabled=True, detail_crop=[32, 32])).attention_head
    assert isinstance(a, ASPPClassifier)
    assert [c.dilation for c in a.convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert all(tuple(c.weight.shape) == (19, 512, 3, 3) for c in a.convs)

    vit = ViTSegModel("dinov2_vits14", num_classes=5, projection=False,
                      timm_kwargs={"depth": 4, "embed_dim": 32, "num_heads": 2})
    a = HRDAModel(vit, HRDAConfig(enabled=True, detail_crop=[32, 32])).attention_head
    assert isinstance(a, VFMUDAHead) and tuple(a.classifier.weight.shape) == (5, 8, 1, 1)


def test_fusion_of_a_real_daformer_by_hand() -> None:
    """fused = up(att) * detail + up((1 - att) * context), with att the sigmoid of the attention
    head on the context view's backbone stages (computed here by calling the backbone directly),
    masked to the box's cells of the context grid."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="daformer", backbone="mit_b0", num_classes=3,
                                  decoder_channels=16, projection=False))
    m = HRDAModel(net, HRDAConfig(enabled=True, detail_crop=[32, 32],
                                  attention_channels=8)).eval()  # no dropout, BN running stats
    x = torch.randn(2, 3, 64, 64)
    box = (16, 48, 8, 40)  # align = 4 / 0.5 = 8: context cells 2..6 x 1..5 of 8 x 8
    with torch.no_grad():
        out = m(x, box=box)
        ctx_img = up(x, (32, 32))
        att_c = torch.sigmoid(m.attention_head(net.backbone(ctx_img))[0])
        ctx = net(ctx_img)["logits"]
        det = net(x[:, :, 16:48, 8:40])["logits"]
    assert not net.decode_head._forward_pre_hooks  # the capture leaves no hook behind
    assert att_c.shape == (2, 3, 8, 8) and out["logits"].shape == (2, 3, 16, 16)
    mask = torch.zeros(1, 1, 8, 8)
    mask[:, :, 2:6, 1:5] = 1
    att = up(att_c * mask, (16, 16))
    placed = torch.zeros(2, 3, 16, 16)
    placed[:, :, 4:12, 2:10] = det
    expected = att * placed + up((1 - att_c * mask) * ctx, (16, 16))
    torch.testing.assert_close(out["attention_context"], att_c, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5)
    # the teacher is a deep copy: it computes the same (no hook bound to the student)
    import copy

    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(m)(x, box=box)["logits"], out["logits"])
