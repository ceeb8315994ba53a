"""Forward behaviour of the small variants: output names, shapes, strides, normalisation, eval
determinism, memory formats, autocast, and the building blocks against hand-written formulas."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastuda.config import ModelConfig, load_config
from fastuda.models import build_model, build_network, convert_sync_batchnorm
from fastuda.models.base import mmseg_no_decay
from fastuda.models.heads import ASPPClassifier, MultiLevelProjectionHead, l2_normalize
from fastuda.models.mit import EfficientSelfAttention, MixTransformer, drop_path
from fastuda.models.resnet import ResNet

SMALL = [("deeplabv2", "resnet18"), ("daformer", "mit_b0")]


def small_model(name: str, backbone: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, backbone=backbone, **kw))


@pytest.mark.parametrize("name,backbone", SMALL)
def test_output_names_shapes_and_strides(name: str, backbone: str) -> None:
    model = small_model(name, backbone)
    h, w = 64, 96
    out = model(torch.randn(2, 3, h, w))
    s = model.output_stride
    assert s == {"deeplabv2": 8, "daformer": 4}[name]
    d = {"deeplabv2": 512, "daformer": 256}[name]
    assert model.embed_dim == d and model.num_classes == 19
    assert out["logits"].shape == (2, 19, h // s, w // s)
    assert out["embeddings"].shape == (2, d, h // s, w // s)
    assert out["features"].shape == (2, model.feature_channels, h // s, w // s)
    assert model.feature_channels == {"deeplabv2": 512, "daformer": 256}[name]
    last = {"deeplabv2": (512, 8), "daformer": (256, 32)}[name]
    assert out["backbone"].shape == (2, last[0], h // last[1], w // last[1])
    norms = out["embeddings"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_output_size_for_sizes_not_divisible_by_the_stride() -> None:
    # every strided layer pads so a map of size n becomes ceil(n / 2) (ceil(n / 4) for MiT's stem)
    for name, backbone in SMALL:
        model = small_model(name, backbone, projection=False).eval()
        out = model(torch.randn(1, 3, 37, 50))
        s = model.output_stride
        assert out["logits"].shape[-2:] == (math.ceil(37 / s), math.ceil(50 / s))
        assert "embeddings" not in out and model.embed_dim == 0


def test_embed_dim_override() -> None:
    model = small_model("daformer", "mit_b0", embed_dim=64)
    assert model.embed_dim == 64
    assert model(torch.randn(1, 3, 32, 32))["embeddings"].shape[1] == 64


def test_resnet_stage_strides_and_dilations() -> None:
    with torch.device("meta"):
        net = ResNet("resnet101")
    # DeepLab: stages 3 and 4 keep stride 1; the first block of a dilated stage keeps the previous
    # stage's dilation (1 -> 2, 2 -> 4)
    assert net.layer3[0].conv2.stride == (1, 1) and net.layer3[0].conv2.dilation == (1, 1)
    assert all(b.conv2.dilation == (2, 2) for b in net.layer3[1:])
    assert net.layer4[0].conv2.stride == (1, 1) and net.layer4[0].conv2.dilation == (2, 2)
    assert all(b.conv2.dilation == (4, 4) for b in net.layer4[1:])
    assert net.layer2[0].conv2.stride == (2, 2)
    stages = ResNet("resnet18").eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(x.shape[1:]) for x in stages] == [(64, 16, 16), (128, 8, 8), (256, 8, 8),
                                                    (512, 8, 8)]


def test_mit_stage_shapes() -> None:
    stages = MixTransformer("mit_b0").eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(x.shape[1:]) for x in stages] == [(32, 16, 16), (64, 8, 8), (160, 4, 4),
                                                    (256, 2, 2)]


@pytest.mark.parametrize("name,backbone", SMALL)
def test_eval_is_deterministic_and_train_is_stochastic(name: str, backbone: str) -> None:
    model = small_model(name, backbone, drop_path=0.5, dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    if name == "daformer":  # DeepLab-V2 has no dropout; DAFormer has dropout and drop-path
        model.train()
        with torch.no_grad():
            c, d = model(x), model(x)
        assert not torch.equal(c["logits"], d["logits"])


def test_drop_path_is_unbiased_and_whole_sample() -> None:
    torch.manual_seed(0)
    x = torch.ones(20000, 3, 2)
    y = drop_path(x, 0.3, training=True)
    kept = y[:, 0, 0] != 0
    # each sample is either zeroed entirely or scaled by 1 / keep
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert torch.count_nonzero(y[~kept]) == 0
    assert abs(kept.float().mean().item() - 0.7) < 0.02
    assert drop_path(x, 0.3, training=False) is x


def test_efficient_attention_matches_the_formula() -> None:
    torch.manual_seed(0)
    dim, heads, sr, h, w = 16, 2, 2, 6, 4
    attn = EfficientSelfAttention(dim, heads, sr).double()
    x = torch.randn(3, h * w, dim, dtype=torch.float64)
    # keys/values from the spatially reduced map: conv with kernel = stride = sr, then LayerNorm
    grid = x.transpose(1, 2).reshape(3, dim, h, w)
    reduced = F.conv2d(grid, attn.sr.weight, attn.sr.bias, stride=sr).flatten(2).transpose(1, 2)
    reduced = F.layer_norm(reduced, (dim,), attn.norm.weight, attn.norm.bias)
    q = x @ attn.q.weight.T + attn.q.bias
    kv = reduced @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :dim], kv[..., dim:]
    d = dim // heads
    outs = []
    for i in range(heads):
        qi, ki, vi = (t[..., i * d:(i + 1) * d] for t in (q, k, v))
        outs.append(torch.softmax(qi @ ki.transpose(1, 2) / math.sqrt(d), dim=-1) @ vi)
    expected = torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x, h, w), expected)


def test_aspp_is_the_sum_of_dilated_convs() -> None:
    torch.manual_seed(0)
    head = ASPPClassifier(8, 5).double()
    x = torch.randn(2, 8, 30, 30, dtype=torch.float64)
    expected = sum(F.conv2d(x, c.weight, c.bias, padding=d, dilation=d)
                   for c, d in zip(head.convs, (6, 12, 18, 24), strict=True))
    torch.testing.assert_close(head(x), expected)


def test_multilevel_projection_equals_resize_concat_conv() -> None:
    torch.manual_seed(0)
    chans = [4, 6, 8, 10]
    head = MultiLevelProjectionHead(chans, 12).double()
    for m in head.modules():  # non-trivial BN statistics, compared in eval mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    head.eval()
    stages = [torch.randn(2, c, 15 // 2**i + 1, 17 // 2**i + 1, dtype=torch.float64)
              for i, c in enumerate(chans)]
    torch.testing.assert_close(head(stages), head.forward_reference(stages))
    head.train()  # batch statistics too
    torch.testing.assert_close(head(stages), head.forward_reference(stages))


def test_l2_normalize_in_low_precision() -> None:
    x = torch.randn(2, 64, 3, 3) * 300  # squares overflow fp16 if accumulated in fp16
    for dtype in (torch.float16, torch.bfloat16):
        y = l2_normalize(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), F.normalize(x, dim=1), atol=1e-2, rtol=1e-2)
    big = torch.full((1, 256, 1, 1), 60000.0, dtype=torch.float16)  # norm beyond fp16's range
    torch.testing.assert_close(l2_normalize(big).float(), torch.full((1, 256, 1, 1), 1 / 16))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # zero vectors stay zero
        zeros = torch.zeros(1, 4, 1, 1, dtype=dtype)
        assert torch.equal(l2_normalize(zeros), zeros)


@pytest.mark.parametrize("name,backbone", SMALL)
def test_channels_last_matches_contiguous(name: str, backbone: str) -> None:
    model = small_model(name, backbone).eval()
    cl_model = small_model(name, backbone, channels_last=True).eval()
    cl_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref, out = model(x), cl_model(x)
    assert out["logits"].is_contiguous(memory_format=torch.channels_last)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], atol=1e-4, rtol=1e-4)


# CPU fp16 runs depth-wise convs group by group (seconds per layer), so DAFormer's fp16 case checks
# the forward only; fp16 training is a GPU matter and bf16 covers the CPU backward.
@pytest.mark.parametrize("name,backbone,dtype,backward", [
    ("deeplabv2", "resnet18", torch.bfloat16, True), ("daformer", "mit_b0", torch.bfloat16, True),
    ("deeplabv2", "resnet18", torch.float16, True), ("daformer", "mit_b0", torch.float16, False)])
def test_autocast(name: str, backbone: str, dtype: torch.dtype, backward: bool) -> None:
    model = small_model(name, backbone)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=dtype), torch.set_grad_enabled(backward):
        out = model(x)
        loss = out["logits"].float().logsumexp(1).mean() + out["embeddings"].float().mean()
    assert out["logits"].dtype == dtype and out["embeddings"].dtype == dtype
    assert all(torch.isfinite(v).all() for v in out.values())
    norms = out["embeddings"].float().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-2, rtol=0)
    if backward:
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_param_groups_cover_every_parameter_once() -> None:
    model = small_model("daformer", "mit_b0")
    model.no_decay = "1d"  # optim.no_decay = "1d": every 1-D parameter undecayed
    groups = model.param_groups(lr=1e-4, head_lr_mult=10.0, weight_decay=0.01)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    backbone_ids = {id(p) for n, p in model.named_parameters() if n.startswith("backbone.")}
    for name, g in by_name.items():
        in_backbone = name.startswith("backbone")
        assert all((id(p) in backbone_ids) == in_backbone for p in g["params"])
        assert g["lr"] == pytest.approx(1e-4 if in_backbone else 1e-3)
        assert g["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.01)
        assert all((p.ndim <= 1) == name.endswith("no_decay") for p in g["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert names[id(by_name["backbone_no_decay"]["params"][1])].startswith("backbone.")
    no_decay_names = {names[id(p)] for p in by_name["backbone_no_decay"]["params"]}
    assert "backbone.norm4.weight" in no_decay_names
    assert "backbone.block1.0.attn.q.bias" in no_decay_names
    torch.optim.AdamW(groups)  # accepted as is


# MiT-B0 (SegFormer, Table 6): depths (2, 2, 2, 2), spatial reduction (8, 4, 2, 1); its norms by
# the released names (patch_embed{i}.norm, block{i}.{j}.norm1/norm2, attn.norm where sr > 1,
# norm{i})
def mit_b0_norm_names() -> set[str]:
    names = set()
    for i, sr in zip(range(1, 5), (8, 4, 2, 1), strict=True):
        mods = [f"patch_embed{i}.norm", f"norm{i}"]
        for j in range(2):
            mods += [f"block{i}.{j}.norm1", f"block{i}.{j}.norm2"]
            if sr > 1:
                mods.append(f"block{i}.{j}.attn.norm")
        names |= {f"backbone.{m}.{w}" for m in mods for w in ("weight", "bias")}
    return names


def test_param_groups_released_decay_rule_on_mit() -> None:
    # the DAFormer/SePiCo releases' custom_keys: decay 0 for names containing norm/pos_block
    # (MiT only); biases, BN and every head parameter decayed
    model = small_model("daformer", "mit_b0", projection=True)
    assert model.no_decay == "mmseg"
    groups = model.param_groups(lr=1e-4, head_lr_mult=10.0, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(names)
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert undecayed == mit_b0_norm_names() and len(undecayed) == 60
    assert {g["name"] for g in groups} == {"backbone", "backbone_no_decay", "head"}
    decayed = set(names.values()) - undecayed
    assert "backbone.block1.0.attn.q.bias" in decayed
    assert "decode_head.fusion.0.1.weight" in decayed  # a BatchNorm of the head
    assert any(n.startswith("projection_head.") and n.endswith("bias") for n in decayed)


def test_param_groups_released_decay_rule_on_resnet() -> None:
    # no norm/pos_block name in a ResNet DeepLab-V2: everything decayed, BN and biases included
    for backbone in ("resnet18", "resnet50_v1c"):
        model = small_model("deeplabv2", backbone)
        groups = model.param_groups(lr=1.0, head_lr_mult=10.0, weight_decay=0.01)
        assert {g["name"] for g in groups} == {"backbone", "head"}
        assert all(g["weight_decay"] == 0.01 for g in groups)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_mmseg_no_decay_follows_mmcv_key_order() -> None:
    # keys tried longest first, then alphabetically ("head" before "norm"); the first decides
    assert mmseg_no_decay("backbone.block2.1.norm2.weight")
    assert mmseg_no_decay("backbone.pos_block.0.proj.bias")
    assert not mmseg_no_decay("decode_head.norm.weight")  # "head": lr x10, decay kept
    assert not mmseg_no_decay("backbone.layer1.0.bn1.weight")
    assert not mmseg_no_decay("backbone.block1.0.attn.q.bias")


def test_optim_no_decay_reaches_the_network() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    # the rule a config names is the rule the network applies, either way round
    for rule in ("1d", "mmseg"):
        cfg = load_config(configs / "demo_daformer.toml", [f'optim.no_decay="{rule}"'])
        assert build_network(cfg).no_decay == rule
    # the presets use the released rule (the default)
    assert load_config(configs / "baselines" / "daformer_gta2cs.toml").optim.no_decay == "mmseg"


def test_param_groups_skip_frozen_parameters() -> None:
    model = small_model("deeplabv2", "resnet18", projection=False)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    groups = model.param_groups(lr=1.0, head_lr_mult=10.0, weight_decay=0.0)
    assert {g["name"] for g in groups} == {"head"}  # the released rule: no undecayed head param
    model.no_decay = "1d"
    groups = model.param_groups(lr=1.0, head_lr_mult=10.0, weight_decay=0.0)
    assert {g["name"] for g in groups} == {"head", "head_no_decay"}


def test_convert_sync_batchnorm() -> None:
    model = small_model("deeplabv2", "resnet18")
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model = convert_sync_batchnorm(model)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == n_bn > 0
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())


def test_bad_input_is_named() -> None:
    model = small_model("deeplabv2", "resnet18")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(2, 1, 8, 8\)"):
        model(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("stride", [8, 16])
def test_deeplabv2_output_stride(stride: int) -> None:
    """Stride 16 dilates only layer 4: layer 3 then runs at 1/16, and the logits come out at
    1/16 of a 64x64 input; stride 8 is the published layout."""
    cfg = ModelConfig(name="deeplabv2", backbone="resnet18", projection=True, embed_dim=16,
                      output_stride=stride)
    model = build_model(cfg).eval()
    assert model.output_stride == stride
    stages = model.backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(x.shape[-2:]) for x in stages] == [(16, 16), (8, 8), (64 // stride,) * 2,
                                                     (64 // stride,) * 2]
    out = model(torch.randn(1, 3, 64, 64))
    assert out["logits"].shape == (1, 19, 64 // stride, 64 // stride)
    assert out["embeddings"].shape == (1, 16, 64 // stride, 64 // stride)
    # layer 4's first block keeps layer 3's dilation, the rest are dilated by 2 at stride 16
    assert model.backbone.layer4[1].conv1.dilation == ((2, 2) if stride == 16 else (4, 4))


def test_output_stride_is_validated() -> None:
    from fastuda.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.output_stride: 16 .*daformer"):
        ModelConfig(name="daformer", backbone="mit_b0", output_stride=16)
    with pytest.raises(ConfigError, match=r"model.output_stride: 32"):
        ModelConfig(name="deeplabv2", backbone="resnet18", output_stride=32)
