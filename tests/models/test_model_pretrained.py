"""Pretrained loading from local files in the formats users have.

The checkpoints are written here key by key, with the names and shapes of torchvision's ResNet and
of the released ImageNet MiT files (taken from their layer descriptions, not from fastuda's
modules), filled with random values, saved with torch.save and loaded back.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from fastuda.config import ModelConfig
from fastuda.models import build_model, load_pretrained

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn(prefix: str, c: int, with_counter: bool = True) -> dict[str, tuple[int, ...]]:
    keys = BN_KEYS if with_counter else BN_KEYS[:4]
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (c,)) for k in keys}


def torchvision_resnet_shapes(depth: str, with_counter: bool = True) -> dict[str, tuple]:
    """torchvision ``resnet18`` / ``resnet50`` / ``resnet101`` state-dict keys and shapes, fc
    included."""
    blocks, bottleneck = {"resnet18": ((2, 2, 2, 2), False),
                          "resnet50": ((3, 4, 6, 3), True),
                          "resnet101": ((3, 4, 23, 3), True)}[depth]
    shapes: dict[str, tuple] = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64, with_counter)}
    c_in = 64
    for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), start=1):
        c_out = width * 4 if bottleneck else width
        for j in range(n):
            p = f"layer{i}.{j}"
            if bottleneck:
                shapes[f"{p}.conv1.weight"] = (width, c_in, 1, 1)
                shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
                shapes[f"{p}.conv3.weight"] = (c_out, width, 1, 1)
                for k, c in ((1, width), (2, width), (3, c_out)):
                    shapes.update(bn(f"{p}.bn{k}", c, with_counter))
            else:
                shapes[f"{p}.conv1.weight"] = (width, c_in, 3, 3)
                shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
                shapes.update(bn(f"{p}.bn1", width, with_counter))
                shapes.update(bn(f"{p}.bn2", width, with_counter))
            if j == 0 and (i > 1 or c_in != c_out):
                shapes[f"{p}.downsample.0.weight"] = (c_out, c_in, 1, 1)
                shapes.update(bn(f"{p}.downsample.1", c_out, with_counter))
            c_in = c_out
    shapes["fc.weight"] = (1000, c_in)
    shapes["fc.bias"] = (1000,)
    return shapes


def released_mit_shapes(dims: tuple[int, ...], depths: tuple[int, ...]) -> dict[str, tuple]:
    """Keys and shapes of the released ``mit_b*.pth`` ImageNet checkpoints, head included."""
    shapes: dict[str, tuple] = {}
    c_in = 3
    for i, (c, depth) in enumerate(zip(dims, depths, strict=True), start=1):
        k = 7 if i == 1 else 3
        sr = (8, 4, 2, 1)[i - 1]
        shapes[f"patch_embed{i}.proj.weight"] = (c, c_in, k, k)
        shapes[f"patch_embed{i}.proj.bias"] = (c,)
        shapes[f"patch_embed{i}.norm.weight"] = (c,)
        shapes[f"patch_embed{i}.norm.bias"] = (c,)
        for j in range(depth):
            p = f"block{i}.{j}"
            for name, shape in (("norm1", (c,)), ("attn.q", (c, c)), ("attn.kv", (2 * c, c)),
                                ("attn.proj", (c, c)), ("norm2", (c,)),
                                ("mlp.fc1", (4 * c, c)), ("mlp.dwconv.dwconv", (4 * c, 1, 3, 3)),
                                ("mlp.fc2", (c, 4 * c))):
                shapes[f"{p}.{name}.weight"] = shape
                shapes[f"{p}.{name}.bias"] = (shape[0],)
            if sr > 1:
                shapes[f"{p}.attn.sr.weight"] = (c, c, sr, sr)
                shapes[f"{p}.attn.sr.bias"] = (c,)
                shapes[f"{p}.attn.norm.weight"] = (c,)
                shapes[f"{p}.attn.norm.bias"] = (c,)
        shapes[f"norm{i}.weight"] = (c,)
        shapes[f"norm{i}.bias"] = (c,)
        c_in = c
    shapes["head.weight"] = (1000, dims[-1])
    shapes["head.bias"] = (1000,)
    return shapes


MIT_B0 = ((32, 64, 160, 256), (2, 2, 2, 2))
MIT_B1 = ((64, 128, 320, 512), (2, 2, 2, 2))


def random_state(shapes: dict[str, tuple]) -> OrderedDict:
    g = torch.Generator().manual_seed(1)
    state = OrderedDict()
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        else:
            state[key] = torch.rand(shape, generator=g) + 0.5  # positive: valid running_var
    return state


def save(tmp_path: Path, state, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def small(name: str, backbone: str, **kw):
    return build_model(ModelConfig(name=name, backbone=backbone, **kw))


def test_released_mit_checkpoint_loads_every_backbone_tensor(tmp_path: Path) -> None:
    state = random_state(released_mit_shapes(*MIT_B0))
    path = save(tmp_path, state)
    model = small("daformer", "mit_b0")
    head_before = model.decode_head.classifier.weight.clone()
    report = load_pretrained(model, str(path))
    assert report["format"] == "mit"
    assert report["missing"] == [] and report["unexpected"] == []
    assert sorted(report["dropped"]) == ["head.bias", "head.weight"]
    own = model.state_dict()
    backbone_keys = [k for k in own if k.startswith("backbone.")]
    assert len(report["loaded"]) == len(backbone_keys) == len(state) - 2
    for key, value in state.items():
        if not key.startswith("head."):
            assert torch.equal(own["backbone." + key], value), key
    assert torch.equal(model.decode_head.classifier.weight, head_before)  # heads untouched


def test_torchvision_resnet_checkpoint_loads(tmp_path: Path) -> None:
    for depth in ("resnet18", "resnet50"):
        state = random_state(torchvision_resnet_shapes(depth))
        path = save(tmp_path, state, f"{depth}.pth")
        model = small("deeplabv2", depth, projection=False)
        report = load_pretrained(model, path)
        assert report["format"] == "torchvision_resnet"
        assert report["missing"] == [] and report["unexpected"] == []
        assert sorted(report["dropped"]) == ["fc.bias", "fc.weight"]
        own = model.state_dict()
        for key, value in state.items():
            if not key.startswith("fc."):
                assert torch.equal(own["backbone." + key], value), key


def test_old_torchvision_files_without_bn_counters(tmp_path: Path) -> None:
    state = random_state(torchvision_resnet_shapes("resnet18", with_counter=False))
    report = load_pretrained(small("deeplabv2", "resnet18"), save(tmp_path, state))
    assert report["missing"] == []


def test_wrapped_and_ddp_prefixed_checkpoints(tmp_path: Path) -> None:
    state = random_state(released_mit_shapes(*MIT_B0))
    wrapped = {"state_dict": OrderedDict(("module." + k, v) for k, v in state.items()),
               "meta": {"epoch": 3}}
    model = small("daformer", "mit_b0")
    report = load_pretrained(model, save(tmp_path, wrapped))
    assert report["missing"] == [] and report["unexpected"] == []
    assert torch.equal(model.backbone.norm4.weight, state["norm4.weight"])


def test_missing_and_unexpected_keys_are_reported(tmp_path: Path) -> None:
    state = random_state(released_mit_shapes(*MIT_B0))
    del state["block2.1.mlp.fc2.weight"]
    state["block1.0.attn.extra.weight"] = torch.zeros(3)  # matches no MiT key
    state["block1.7.norm1.weight"] = torch.zeros(32)  # a MiT key, but B0 has 2 blocks per stage
    with pytest.warns(UserWarning, match="1 missing key"):
        report = load_pretrained(small("daformer", "mit_b0"), save(tmp_path, state))
    assert report["missing"] == ["backbone.block2.1.mlp.fc2.weight"]
    assert sorted(report["unexpected"]) == ["block1.0.attn.extra.weight", "block1.7.norm1.weight"]


def test_shape_mismatch_fails_naming_the_key(tmp_path: Path) -> None:
    path = save(tmp_path, random_state(released_mit_shapes(*MIT_B1)))  # B1 widths into B0
    with pytest.raises(ValueError, match=r"'patch_embed1\.proj\.weight'.*\(64, 3, 7, 7\).*"
                                         r"\(32, 3, 7, 7\)"):
        load_pretrained(small("daformer", "mit_b0"), path)


def test_wrong_architecture_and_unknown_files_fail(tmp_path: Path) -> None:
    resnet = save(tmp_path, random_state(torchvision_resnet_shapes("resnet18")), "r18.pth")
    with pytest.raises(ValueError, match="torchvision_resnet checkpoint.*DAFormer"):
        load_pretrained(small("daformer", "mit_b0"), resnet)
    other = save(tmp_path, {"encoder.weight": torch.zeros(2)}, "other.pth")
    with pytest.raises(ValueError, match="match no known format.*encoder.weight"):
        load_pretrained(small("daformer", "mit_b0"), other)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(small("daformer", "mit_b0"), tmp_path / "nope.pth")


class NotATensor:
    pass


def test_loading_is_weights_only(tmp_path: Path) -> None:
    # a pickle that needs an arbitrary class is refused by weights_only=True
    path = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": NotATensor()}, path)
    with pytest.raises(ValueError, match="cannot read pretrained checkpoint .*pickled.pth.*"
                                         "Weights only load failed"):
        load_pretrained(small("deeplabv2", "resnet18"), path)


def test_fastuda_model_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = small("deeplabv2", "resnet18")
    path = save(tmp_path, source.state_dict())
    torch.manual_seed(1)
    target = small("deeplabv2", "resnet18")
    report = load_pretrained(target, path)
    assert report["format"] == "fastuda" and report["missing"] == []
    x = torch.randn(1, 3, 32, 32)
    source.eval()
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(x)["logits"], source(x)["logits"], rtol=0, atol=0)


def test_build_model_loads_config_path(tmp_path: Path) -> None:
    state = random_state(released_mit_shapes(*MIT_B0))
    path = save(tmp_path, state)
    model = build_model(ModelConfig(name="daformer", backbone="mit_b0", pretrained=str(path)))
    assert model.pretrained_report["format"] == "mit"
    assert torch.equal(model.backbone.block3[1].attn.q.weight, state["block3.1.attn.q.weight"])
    assert build_model(ModelConfig(name="daformer", backbone="mit_b0")).pretrained_report is None


def mmcv_resnet_v1c_shapes(depth: str) -> dict[str, tuple]:
    """The open-mmlab ``resnet50_v1c`` / ``resnet101_v1c`` files: mmcv's ResNetV1c layout, a deep
    stem nn.Sequential (conv 3x3 3 -> 32 stride 2, BN, ReLU, conv 32 -> 32, BN, ReLU, conv
    32 -> 64, BN, ReLU: parameters at indices 0/1, 3/4, 6/7; BIT-DA/SePiCo
    mmseg/models/backbones/resnet.py#L589-L622) in place of conv1/bn1, the stages as torchvision
    names them."""
    shapes = {k: v for k, v in torchvision_resnet_shapes(depth).items()
              if not k.startswith(("conv1.", "bn1."))}
    stem = {"stem.0.weight": (32, 3, 3, 3), **bn("stem.1", 32),
            "stem.3.weight": (32, 32, 3, 3), **bn("stem.4", 32),
            "stem.6.weight": (64, 32, 3, 3), **bn("stem.7", 64)}
    return {**stem, **shapes}


def test_mmcv_resnet_v1c_layout_round_trips(tmp_path: Path) -> None:
    # every key of the model's backbone is one of the mmcv file's, with its shape
    with torch.device("meta"):
        big = small("deeplabv2", "resnet101_v1c", projection=False)
    expect = {k: v for k, v in mmcv_resnet_v1c_shapes("resnet101").items()
              if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in big.backbone.state_dict().items()} == expect
    # an mmcv-layout file (wrapped as mmcv saves it) loads every backbone tensor; fc is dropped
    state = random_state(mmcv_resnet_v1c_shapes("resnet50"))
    path = save(tmp_path, {"state_dict": state, "meta": {"mmcv_version": "1.3.7"}})
    model = small("deeplabv2", "resnet50_v1c", projection=False)
    report = load_pretrained(model, path)
    assert report["format"] == "mmcv_resnet_v1c"
    assert report["missing"] == [] and report["unexpected"] == []
    assert sorted(report["dropped"]) == ["fc.bias", "fc.weight"]
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(own["backbone." + key], value), key
    # and a fastuda model's backbone saved back in that layout is the same file
    back = {k.removeprefix("backbone."): v for k, v in own.items() if k.startswith("backbone.")}
    assert set(back) == set(state) - {"fc.weight", "fc.bias"}


def test_mmcv_resnet_v1c_bad_keys_are_errors_naming_them(tmp_path: Path) -> None:
    base = random_state(mmcv_resnet_v1c_shapes("resnet50"))
    model = lambda: small("deeplabv2", "resnet50_v1c", projection=False)  # noqa: E731
    missing = OrderedDict((k, v) for k, v in base.items() if k != "stem.4.running_mean")
    with pytest.raises(ValueError, match=r"missing key 'stem\.4\.running_mean'"):
        load_pretrained(model(), save(tmp_path, missing, "missing.pth"))
    extra = OrderedDict(base, **{"stem.9.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected key 'stem\.9\.weight'"):
        load_pretrained(model(), save(tmp_path, extra, "extra.pth"))
    deep = OrderedDict(base, **{"layer3.6.conv1.weight": torch.zeros(256, 1024, 1, 1)})
    with pytest.raises(ValueError, match=r"unexpected key 'layer3\.6\.conv1\.weight'"):
        load_pretrained(model(), save(tmp_path, deep, "deep.pth"))  # a ResNet-101 block
    wrong = OrderedDict(base, **{"stem.3.weight": torch.zeros(32, 32, 5, 5)})
    with pytest.raises(ValueError, match=r"'stem\.3\.weight'.*\(32, 32, 5, 5\).*\(32, 32, 3, 3\)"):
        load_pretrained(model(), save(tmp_path, wrong, "wrong.pth"))
    # the two ResNet layouts do not cross: a 7x7-stem file for the deep stem and back
    tv = save(tmp_path, random_state(torchvision_resnet_shapes("resnet50")), "tv.pth")
    with pytest.raises(ValueError, match="torchvision ResNet checkpoint.*resnet50_v1c"):
        load_pretrained(model(), tv)
    with pytest.raises(ValueError, match=r"unexpected key 'stem\.0\.weight'"):
        load_pretrained(small("deeplabv2", "resnet50", projection=False),
                        save(tmp_path, base, "v1c.pth"))


def test_deeplab_coco_file_drops_its_classifier(tmp_path: Path) -> None:
    # the DeepLab release's COCO-pretrained file (CorDA's initialisation) has torchvision's names
    # plus its COCO ASPP classifier, layer5.conv2d_list.{0..3} (qinenergy/corda
    # trainUDA_gta.py#L255-L263 copies the keys by name)
    state = random_state(torchvision_resnet_shapes("resnet18"))
    del state["fc.weight"], state["fc.bias"]
    for i in range(4):
        state[f"layer5.conv2d_list.{i}.weight"] = torch.zeros(21, 512, 3, 3)
        state[f"layer5.conv2d_list.{i}.bias"] = torch.zeros(21)
    report = load_pretrained(small("deeplabv2", "resnet18"), save(tmp_path, state))
    assert report["format"] == "torchvision_resnet" and report["unexpected"] == []
    assert sorted(report["dropped"]) == sorted(k for k in state if k.startswith("layer5."))


def test_bgr_file_reads_rgb_images_after_loading(tmp_path: Path) -> None:
    """model.pretrained_channels = "bgr" (the Caffe DeepLab files DASS and CorDA feed BGR minus
    the Caffe mean): the first convolution, loaded with its input channels reversed, gives on
    an RGB image what the file's own weights give on that image in BGR order."""
    import torch.nn.functional as F

    state = random_state(torchvision_resnet_shapes("resnet18"))
    path = save(tmp_path, state)
    model = build_model(ModelConfig(name="deeplabv2", backbone="resnet18", projection=False,
                                    pretrained=str(path), pretrained_channels="bgr"))
    rgb = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(3))
    bgr = rgb[:, [2, 1, 0]]
    expected = F.conv2d(bgr, state["conv1.weight"], stride=2, padding=3)  # the file on BGR
    assert torch.allclose(model.backbone.conv1(rgb), expected, atol=1e-5)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"][:, [2, 1, 0]])
    # every other tensor as in the file
    assert torch.equal(model.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    rgb_model = build_model(ModelConfig(name="deeplabv2", backbone="resnet18", projection=False,
                                        pretrained=str(path)))
    assert torch.equal(rgb_model.backbone.conv1.weight, state["conv1.weight"])


def test_bgr_needs_a_resnet_stem_of_a_released_file(tmp_path: Path) -> None:
    model = small("deeplabv2", "resnet18", projection=False)
    fastuda_file = save(tmp_path, model.state_dict(), "fastuda.pth")
    with pytest.raises(ValueError, match="reads RGB already"):
        load_pretrained(small("deeplabv2", "resnet18", projection=False), fastuda_file, "bgr")
    from fastuda.config import ConfigError

    with pytest.raises(ConfigError, match="model.pretrained_channels"):
        ModelConfig(name="daformer", backbone="mit_b0", pretrained_channels="bgr")


def test_deeplab_init_file_with_scale_prefix_loads(tmp_path: Path) -> None:
    # the Caffe-converted DeepLab-V2 ImageNet initialisation: torchvision's names under
    # "Scale.", its classifier as layer5 (cvlab-yonsei/DASS model/model_builder.py#L76-L81
    # drops the first key part and skips layer5)
    state = random_state(torchvision_resnet_shapes("resnet18"))
    del state["fc.weight"], state["fc.bias"]
    for i in range(4):
        state[f"layer5.conv2d_list.{i}.weight"] = torch.zeros(21, 512, 3, 3)
    prefixed = OrderedDict(("Scale." + k, v) for k, v in state.items())
    model = small("deeplabv2", "resnet18", projection=False)
    report = load_pretrained(model, save(tmp_path, prefixed))
    assert report["format"] == "torchvision_resnet"
    assert report["missing"] == [] and report["unexpected"] == []
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
