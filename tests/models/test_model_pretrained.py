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
    """torchvision ``resnet18`` / ``resnet50`` state-dict keys and shapes, fc included."""
    blocks, bottleneck = {"resnet18": ((2, 2, 2, 2), False),
                          "resnet50": ((3, 4, 6, 3), True)}[depth]
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
