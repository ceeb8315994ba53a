"""Loading DINOv2 weights from local files: the official release's layout
(``dinov2_vit*14_pretrain.pth``) and timm's safetensors, written from a random model and read back
into another; missing, unexpected and mis-shaped keys are errors that name them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from fastuda.models import load_pretrained  # noqa: E402
from fastuda.models.pretrained import detect_format, map_keys  # noqa: E402
from fastuda.models.vit import ViTSegModel  # noqa: E402

TINY = {"depth": 4, "embed_dim": 48, "num_heads": 2}


def tiny(backbone: str = "dinov2_vits14", seed: int = 0, **timm_kwargs) -> ViTSegModel:
    torch.manual_seed(seed)
    return ViTSegModel(backbone, drop_path=0.0, timm_kwargs={**TINY, **timm_kwargs})


def official_layout(model: ViTSegModel) -> dict[str, torch.Tensor]:
    """The model's transformer as the DINOv2 release writes it (dinov2/models/vision_transformer.py:
    a mask token of [1, C]; ViT-g's SwiGLU MLP as mlp.w12 / mlp.w3)."""
    sd = {}
    for k, v in model.backbone.vit.state_dict().items():
        if model.backbone.spec.timm_name.startswith("vit_giant"):
            k = re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", k))
        sd[k] = v.clone()
    sd["mask_token"] = torch.zeros(1, model.backbone.embed_dim)
    return sd


def backbone_state(model: ViTSegModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}


def assert_same_backbone(a: ViTSegModel, b: ViTSegModel) -> None:
    sa, sb = backbone_state(a), backbone_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("backbone", ["dinov2_vits14", "dinov2_vitg14"])
def test_official_dinov2_layout_round_trips(backbone: str, tmp_path: Path) -> None:
    src, dst = tiny(backbone, seed=0), tiny(backbone, seed=1)
    assert not torch.equal(src.backbone.vit.blocks[0].attn.qkv.weight,
                           dst.backbone.vit.blocks[0].attn.qkv.weight)
    sd = official_layout(src)
    if backbone == "dinov2_vitg14":
        assert "blocks.0.mlp.w12.weight" in sd and "blocks.0.mlp.fc1.weight" not in sd
    path = tmp_path / f"{backbone}_pretrain.pth"
    torch.save(sd, path)
    heads_before = {k: v.clone() for k, v in dst.state_dict().items()
                    if not k.startswith("backbone.")}
    report = load_pretrained(dst, path)
    assert report["format"] == "dinov2"
    assert report["dropped"] == ["mask_token"]  # token masking is not part of the model
    assert report["missing"] == [] and report["unexpected"] == []
    assert len(report["loaded"]) == len(sd) - 1
    assert_same_backbone(src, dst)
    for k, v in heads_before.items():  # the heads keep their initialisation
        assert torch.equal(dst.state_dict()[k], v), k


def test_timm_safetensors_round_trip(tmp_path: Path) -> None:
    src, dst = tiny(seed=0), tiny(seed=1)
    sd = {k: v.contiguous() for k, v in src.backbone.vit.state_dict().items()}  # timm's keys
    assert "blocks.3.ls2.gamma" in sd and "mask_token" not in sd
    sd["head.weight"] = torch.zeros(1000, 48)  # a classifier, as timm files with one carry
    sd["head.bias"] = torch.zeros(1000)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(sd, str(path))
    report = load_pretrained(dst, path)
    assert report["format"] == "timm_vit"
    assert sorted(report["dropped"]) == ["head.bias", "head.weight"]
    assert_same_backbone(src, dst)
    out_a, out_b = src.eval()(torch.ones(1, 3, 28, 28)), dst.eval()(torch.ones(1, 3, 28, 28))
    torch.testing.assert_close(out_a["backbone"], out_b["backbone"])


def test_a_missing_key_is_an_error_that_names_it(tmp_path: Path) -> None:
    sd = official_layout(tiny())
    del sd["blocks.2.ls1.gamma"]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"missing key 'blocks\.2\.ls1\.gamma'"):
        load_pretrained(tiny(seed=1), tmp_path / "cut.pth")
    # the checkpoint of a shallower ViT: the blocks it lacks are named
    torch.save(official_layout(tiny(depth=2)), tmp_path / "shallow.pth")
    with pytest.raises(ValueError, match=r"missing key 'blocks\.2\.norm1\.weight'"):
        load_pretrained(tiny(seed=1), tmp_path / "shallow.pth")


def test_an_unexpected_key_is_an_error_that_names_it(tmp_path: Path) -> None:
    sd = official_layout(tiny())
    sd["blocks.1.attn.q_norm.weight"] = torch.ones(24)  # matches no DINOv2 pattern
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected key 'blocks\.1\.attn\.q_norm\.weight'"):
        load_pretrained(tiny(seed=1), tmp_path / "extra.pth")
    # a deeper ViT's checkpoint: its extra blocks match the pattern but have no place
    torch.save(official_layout(tiny(depth=6)), tmp_path / "deep.pth")
    with pytest.raises(ValueError, match=r"unexpected key 'blocks\.4\."):
        load_pretrained(tiny(seed=1), tmp_path / "deep.pth")


def test_a_shape_mismatch_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    torch.save(official_layout(tiny(embed_dim=64)), tmp_path / "wider.pth")
    with pytest.raises(ValueError, match=r"shape mismatch for 'cls_token' .*checkpoint "
                                         r"\(1, 1, 64\), model \(1, 1, 48\)"):
        load_pretrained(tiny(), tmp_path / "wider.pth")


def test_a_vit_checkpoint_does_not_fit_other_models(tmp_path: Path) -> None:
    from fastuda.config import ModelConfig
    from fastuda.models import build_model

    torch.save(official_layout(tiny()), tmp_path / "vit.pth")
    model = build_model(ModelConfig(name="deeplabv2", backbone="resnet18", projection=False))
    with pytest.raises(ValueError, match="dinov2 checkpoint, which does not fit a DeepLabV2"):
        load_pretrained(model, tmp_path / "vit.pth")


def test_full_size_released_keys_map_onto_the_model() -> None:
    """The released ViT-B/14 and ViT-g/14 files' keys and shapes (written out from the DINOv2
    architecture: 37 x 37 positions + class token, MLP ratio 4, ViT-g SwiGLU 2 x 4096 packed)
    map one to one onto the full-size models (built on the meta device)."""
    for name, c, depth, mlp in (("dinov2_vitb14", 768, 12, "fc"), ("dinov2_vitg14", 1536, 40,
                                                                     "w")):
        hidden = 4 * c if mlp == "fc" else 4096
        released = {"cls_token": (1, 1, c), "pos_embed": (1, 1370, c), "mask_token": (1, c),
                    "patch_embed.proj.weight": (c, 3, 14, 14), "patch_embed.proj.bias": (c,),
                    "norm.weight": (c,), "norm.bias": (c,)}
        for i in range(depth):
            b = f"blocks.{i}."
            fc1, fc2 = ("mlp.fc1", "mlp.fc2") if mlp == "fc" else ("mlp.w12", "mlp.w3")
            width1 = hidden if mlp == "fc" else 2 * hidden
            released.update({
                b + "norm1.weight": (c,), b + "norm1.bias": (c,),
                b + "attn.qkv.weight": (3 * c, c), b + "attn.qkv.bias": (3 * c,),
                b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,),
                b + "ls1.gamma": (c,), b + "norm2.weight": (c,), b + "norm2.bias": (c,),
                b + fc1 + ".weight": (width1, c), b + fc1 + ".bias": (width1,),
                b + fc2 + ".weight": (c, hidden), b + fc2 + ".bias": (c,),
                b + "ls2.gamma": (c,)})
        state = {k: torch.empty(s, device="meta") for k, s in released.items()}
        assert detect_format(state) == "dinov2"
        mapping, dropped, unmatched = map_keys(state, "dinov2")
        assert dropped == ["mask_token"] and unmatched == []
        with torch.device("meta"):
            own = ViTSegModel(name).state_dict()
        vit_keys = {k for k in own if k.startswith("backbone.vit.")}
        assert set(mapping.values()) == vit_keys
        for k, m in mapping.items():
            assert tuple(own[m].shape) == released[k], k
