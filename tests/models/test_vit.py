"""DINOv2 ViT segmentation models (fastuda/models/vit.py): every named size builds with DINOv2's
shapes (on the meta device), forward/backward of every size at a tiny input (full widths, depth
cut to 4), patch-14 padding and resizing, the feature pyramid, output grid sampling,
gradient checkpointing, layer-wise lr decay, HRDA around a ViT, config checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")

from fastuda.config import ConfigError, HRDAConfig, ModelConfig  # noqa: E402
from fastuda.models import HRDAModel, build_model  # noqa: E402
from fastuda.models.vit import (  # noqa: E402
    VIT_SPECS,
    ViTSegModel,
    feature_layers,
    sample_output_grid,
    vit_input_size,
)

# (embed dim, depth, heads, MLP hidden) of the released DINOv2 backbones
# (facebookresearch/dinov2 dinov2/hub/backbones.py, dinov2/models/vision_transformer.py: MLP ratio
# 4; ViT-g: SwiGLU with hidden (int(4 C * 2 / 3) + 7) // 8 * 8 = 4096, its two inputs packed)
DINOV2 = {"dinov2_vits14": (384, 12, 6, 1536), "dinov2_vitb14": (768, 12, 12, 3072),
          "dinov2_vitl14": (1024, 24, 16, 4096), "dinov2_vitg14": (1536, 40, 24, 4096)}


def dinov2_param_count(c: int, depth: int, hidden: int, swiglu: bool) -> int:
    """Parameters of a DINOv2 ViT/14 at 518 px (37 x 37 patches + class token), no mask token."""
    stem = 3 * 14 * 14 * c + c + c + (37 * 37 + 1) * c  # patch embed, class token, positions
    mlp = (c * 2 * hidden + 2 * hidden + hidden * c + c) if swiglu else \
        (c * hidden + hidden + hidden * c + c)
    block = 2 * c + (3 * c * c + 3 * c) + (c * c + c) + c + 2 * c + mlp + c
    return stem + depth * block + 2 * c


def tiny(backbone: str, **kw) -> ViTSegModel:
    """The named size at full width, its depth cut to 4 (the full depths are built on the meta
    device above: their random initialisation alone takes seconds on CPU)."""
    torch.manual_seed(0)
    kw.setdefault("drop_path", 0.0)
    return ViTSegModel(backbone, timm_kwargs={"depth": 4}, **kw)


@pytest.mark.parametrize("backbone", sorted(DINOV2))
def test_every_named_size_builds_with_dinov2_shapes(backbone: str) -> None:
    c, depth, heads, hidden = DINOV2[backbone]
    with torch.device("meta"):
        model = ViTSegModel(backbone, head="daformer")
        out = model(torch.empty(2, 3, 30, 44))
    vit = model.backbone.vit
    assert (model.backbone.embed_dim, model.backbone.depth, vit.blocks[0].attn.num_heads) == \
        (c, depth, heads)
    n = sum(p.numel() for p in vit.parameters())
    assert n == dinov2_param_count(c, depth, hidden, swiglu=backbone == "dinov2_vitg14")
    assert vit.pos_embed.shape == (1, 37 * 37 + 1, c)
    # 30 x 44 is padded to 42 x 56: 3 x 4 patches; outputs on the stride-4 grid of 30 x 44
    assert out["backbone"].shape == (2, c, 3, 4)
    assert out["logits"].shape == (2, 19, 8, 11)
    assert out["embeddings"].shape == (2, 256, 8, 11)
    assert out["features"].shape == (2, 256, 8, 11)


def test_feature_layers_are_the_quarters_of_the_depth() -> None:
    assert feature_layers(12) == [2, 5, 8, 11]
    assert feature_layers(24) == [5, 11, 17, 23]
    assert feature_layers(40) == [9, 19, 29, 39]
    with pytest.raises(ValueError, match="divisible by 4"):
        feature_layers(6)


@pytest.mark.parametrize("backbone", sorted(DINOV2))
@pytest.mark.parametrize("head", ["vfm_uda", "daformer"])
def test_forward_backward_every_size(backbone: str, head: str) -> None:
    c = DINOV2[backbone][0]
    model = tiny(backbone, head=head, embed_dim=32, decoder_channels=32)
    h, w = 30, 44  # not multiples of 14: padded to 42 x 56 (3 x 4 patches)
    out = model(torch.randn(2, 3, h, w))
    grid = (math.ceil(h / 4), math.ceil(w / 4))
    assert model.output_stride == 4
    assert out["logits"].shape == (2, 19, *grid)
    assert out["features"].shape == (2, model.feature_channels, *grid)
    assert model.feature_channels == (c // 4 if head == "vfm_uda" else 32)
    assert out["embeddings"].shape == (2, 32, *grid)
    assert out["backbone"].shape == (2, c, 3, 4)
    norms = out["embeddings"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    loss = F.cross_entropy(out["logits"], torch.randint(0, 19, (2, *grid))) \
        + out["embeddings"].mean() + out["features"].mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_pyramid_levels_and_their_strides() -> None:
    model = tiny("dinov2_vits14", head="daformer")
    x, _ = model.prepare_input(torch.randn(1, 3, 56, 84))  # 4 x 6 patches
    maps = model.backbone(x, model.layers)
    assert [tuple(m.shape) for m in maps] == [(1, 384, 4, 6)] * 4
    levels = model.pyramid(maps)
    assert [tuple(lv.shape[-2:]) for lv in levels] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(lv.shape[1] == 384 for lv in levels)


def test_vfm_uda_head_is_the_released_one() -> None:
    """Layer shapes of tue-mps/vfm-uda models/vit_variants/vit_lightweight_head.py (ViT-B)."""
    with torch.device("meta"):
        model = ViTSegModel("dinov2_vitb14", head="vfm_uda", projection=False)
    shapes = {k: tuple(v.shape) for k, v in model.decode_head.state_dict().items()}
    assert shapes == {"upscale.0.weight": (768, 384, 2, 2), "upscale.1.weight": (384,),
                      "upscale.1.bias": (384,), "upscale.3.weight": (384, 192, 2, 2),
                      "upscale.4.weight": (192,), "upscale.4.bias": (192,),
                      "upscale.5.weight": (192, 192, 3, 3), "upscale.6.weight": (192,),
                      "upscale.6.bias": (192,), "classifier.weight": (19, 192, 1, 1)}
    torch.manual_seed(0)
    head = ViTSegModel("dinov2_vits14", projection=False, timm_kwargs={"depth": 4}).decode_head
    assert abs(float(head.classifier.weight.detach().std()) - 0.1) < 0.01  # N(0, 0.1) as released


def test_input_sizes_pad_and_release_resize() -> None:
    # pad: the next multiple of 14; resize: floor(side * 1.1 / 14) * 14 as VFM-UDA (1024 -> 1120)
    assert [vit_input_size(s, "pad", 1.0) for s in (14, 15, 28, 30, 512)] == [14, 28, 28, 42, 518]
    assert vit_input_size(1024, "resize", 1.1) == 1120
    assert vit_input_size(512, "resize", 1.1) == 560
    assert vit_input_size(1024, "resize", 1.0) == 1036  # the release's rule at scale 1: ceil
    assert vit_input_size(5, "resize", 1.1) == 14


def test_sample_output_grid_is_bilinear_resize_on_whole_cells() -> None:
    x = torch.randn(2, 3, 16, 24)  # a map spanning 56 x 84 pixels (stride 3.5)
    full = F.interpolate(x, size=(14, 21), mode="bilinear", align_corners=False)
    torch.testing.assert_close(sample_output_grid(x, (56, 84), (14, 21)), full)
    # an image of 50 x 81 padded to 56 x 84: its grid is the top-left 13 x 21 of the same samples
    torch.testing.assert_close(sample_output_grid(x, (56, 84), (13, 21)), full[..., :13, :21])
    # a map already on the 4-pixel grid is returned as it is
    y = torch.randn(1, 5, 7, 9)
    torch.testing.assert_close(sample_output_grid(y, (28, 36), (7, 9)), y)


def test_padding_changes_nothing_but_the_size() -> None:
    """pad mode: the image of 52 x 52 (padded to 56 x 56) gives the same outputs as the caller's
    zero-padded 56 x 56 image, on the first 13 x 13 of its 14 x 14 grid."""
    for head in ("vfm_uda", "daformer"):
        model = tiny("dinov2_vits14", head=head).eval()
        img = torch.randn(1, 3, 52, 52)
        a = model(img)
        b = model(F.pad(img, (0, 4, 0, 4)))
        for key in ("logits", "features", "embeddings"):
            assert a[key].shape[-2:] == (13, 13)
            torch.testing.assert_close(a[key], b[key][..., :13, :13], atol=1e-5, rtol=1e-4)


def test_resize_mode_feeds_the_transformer_the_resized_image() -> None:
    model = tiny("dinov2_vits14", input_mode="resize", resize_scale=1.1).eval()
    img = torch.randn(1, 3, 64, 64)
    x, covered = model.prepare_input(img)
    assert x.shape[-2:] == (70, 70) and covered == (64, 64)
    torch.testing.assert_close(x, F.interpolate(img, size=(70, 70), mode="bilinear",
                                                align_corners=False))
    out = model(img)
    assert out["backbone"].shape[-2:] == (5, 5) and out["logits"].shape[-2:] == (16, 16)


def test_gradient_checkpointing_recomputes_blocks_and_changes_no_number() -> None:
    results = []
    for ckpt in (False, True):
        model = tiny("dinov2_vits14", head="daformer", grad_checkpointing=ckpt)
        calls: list[int] = []
        # a pre-hook: the recomputation stops once it has what the backward needs
        model.backbone.vit.blocks[0].register_forward_pre_hook(
            lambda *a, calls=calls: calls.append(1))
        out = model(torch.randn(2, 3, 28, 42, generator=torch.Generator().manual_seed(1)))
        (out["logits"].square().mean() + out["embeddings"].mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out["logits"].detach(), grads, len(calls)))
    (la, ga, ca), (lb, gb, cb) = results
    assert (ca, cb) == (1, 2)  # checkpointing runs the block again in the backward
    torch.testing.assert_close(la, lb)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-6, rtol=1e-4, msg=n)


def test_layer_decay_groups_follow_the_release() -> None:
    """tue-mps/vfm-uda training/uda_vit/uda_vit_generic.py configure_optimizers: decoder at lr,
    block i of n at lr_enc * decay ** (n - 1 - i), stems (patch embed, tokens, final norm) at
    lr_enc * decay ** n."""
    model = ViTSegModel("dinov2_vits14", timm_kwargs={"depth": 4, "embed_dim": 32,
                                                     "num_heads": 2}, layer_decay=0.5)
    groups = model.param_groups(1e-4, 10.0, 0.01)
    expected = {"backbone.block3": 1.0, "backbone.block2": 0.5, "backbone.block1": 0.25,
                "backbone.block0": 0.125, "backbone.stem": 0.0625, "head": 10.0}
    got = {g["name"].removesuffix("_no_decay"): g["lr_mult"] for g in groups}
    assert got == expected
    assert groups[0]["name"] == "backbone.block3"  # the lr the trainer logs: optim.lr
    for g in groups:
        assert g["lr"] == pytest.approx(1e-4 * g["lr_mult"])
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    names = {id(p): n for n, p in model.named_parameters()}
    stem = {names[id(p)] for g in groups if g["name"].startswith("backbone.stem")
            for p in g["params"]}
    assert stem == {"backbone.vit.cls_token", "backbone.vit.pos_embed",
                    "backbone.vit.patch_embed.proj.weight", "backbone.vit.patch_embed.proj.bias",
                    "backbone.vit.norm.weight", "backbone.vit.norm.bias"}


def test_hrda_around_a_vit_trains_and_infers() -> None:
    torch.manual_seed(0)
    model = ViTSegModel("dinov2_vits14", head="daformer", embed_dim=16, decoder_channels=16,
                        timm_kwargs={"depth": 4, "embed_dim": 32, "num_heads": 2})
    hrda = HRDAModel(model, HRDAConfig(detail_crop=[32, 32], attention_channels=8))
    assert hrda.align == 8
    out = hrda.train()(torch.randn(2, 3, 64, 64), box=(8, 40, 16, 48))
    assert out["logits"].shape == (2, 19, 16, 16)
    assert out["logits_detail"].shape == (2, 19, 8, 8)
    assert out["logits_context"].shape == (2, 19, 8, 8)
    (out["logits"].mean() + out["logits_detail"].mean()).backward()
    assert hrda.attention_head.classifier.weight.grad is not None
    assert model.backbone.vit.blocks[0].attn.qkv.weight.grad is not None
    with torch.no_grad():
        inf = hrda.eval()(torch.randn(1, 3, 60, 76))
    assert inf["logits"].shape == (1, 19, 15, 19)


def test_build_model_and_config_checks() -> None:
    cfg = ModelConfig(name="vit", backbone="dinov2_vits14", vit_head="daformer",
                      decoder_channels=32, embed_dim=16, layer_decay=0.9)
    model = build_model(cfg)
    assert isinstance(model, ViTSegModel) and model.layer_decay == 0.9
    assert model.embed_dim == 16 and model.feature_channels == 32
    assert sorted(VIT_SPECS) == ["dinov2_vitb14", "dinov2_vitg14", "dinov2_vitl14",
                                 "dinov2_vits14"]
    with pytest.raises(ConfigError, match="model.backbone.*dinov2_vits14"):
        ModelConfig(name="vit", backbone="mit_b5")
    with pytest.raises(ConfigError, match="model.layer_decay.*only 'vit'"):
        ModelConfig(name="daformer", layer_decay=0.9)
    with pytest.raises(ConfigError, match="model.grad_checkpointing"):
        ModelConfig(name="deeplabv2", backbone="resnet18", grad_checkpointing=True)
    with pytest.raises(ConfigError, match="model.layer_decay"):
        ModelConfig(name="vit", backbone="dinov2_vits14", layer_decay=0.0)


def test_a_missing_timm_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'vit' needs timm \(pip install 'fastuda\[vit\]'\)"):
        ModelConfig(name="vit", backbone="dinov2_vits14")
    ModelConfig(name="daformer")  # the other models do not need it


def test_mic_on_vit_preset_masks_the_releases_block_grid() -> None:
    """configs/vfm/mic_dinov2_vitb14_gta2cs.toml: tue-mps/vfm-uda's block masking draws
    round(1120 / 64) = 18 blocks per side of the ViT's 1120 input (1024 x 1.1 floored to 14);
    fastuda masks the 1024 crop, its 57-pixel blocks make the same 18 x 18 grid."""
    from fastuda.config import load_config
    from fastuda.methods.mic import block_mask
    from fastuda.models.vit import vit_input_size

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "vfm"
                      / "mic_dinov2_vitb14_gta2cs.toml")
    mic = cfg.settings("mic")
    assert cfg.methods == ["mic"] and (mic.mask_ratio, mic.weight, mic.augment) == (0.7, 1.0, True)
    side = vit_input_size(cfg.data.crop_size[0], cfg.model.vit_input, cfg.model.vit_resize_scale)
    assert side == 1120 and round(side / 64) == 18
    mask = block_mask(2, 1024, 1024, block_size=mic.block_size, ratio=mic.mask_ratio,
                      generator=torch.Generator().manual_seed(0))
    centres = ((torch.arange(18) + 0.5) * 1024 / 18).long()  # one pixel inside each block
    cells = mask[:, :, centres][:, :, :, centres]
    assert torch.equal(F.interpolate(cells, size=(1024, 1024), mode="nearest"), mask)
    assert abs(1 - cells.mean().item() - 0.7) < 0.1  # 648 cells, ratio 0.7 masked
