"""CorDA: BerHu and the depth weights by hand, the network wrapper (the release's task blocks,
initial and final heads, ASPP dilations), the released deep-supervision losses against plain torch
computations, the initial-head pseudo-labels, a short run of the demo, and depth crops that agree
with the label crops of both loaders. Release: qinenergy/corda 2904cc6."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastuda.config import ConfigError, DataConfig, DatasetConfig, ModelConfig, load_config
from fastuda.data import ensure_synthetic
from fastuda.data.classes import IGNORE_INDEX
from fastuda.data.depth import load_depth_batch, read_inverse_depth
from fastuda.data.io import DataError
from fastuda.data.loaders import build_train_iterator, dali_available
from fastuda.engine.context import MethodContext, StepView
from fastuda.engine.self_training import SelfTraining
from fastuda.methods import build_methods
from fastuda.methods.base import MethodStack
from fastuda.methods.corda import (
    CorDA,
    CorDAModel,
    CorDASettings,
    TaskBottleneck,
    aspp_with_dilations,
    berhu_loss,
    depth_weight,
    released_depth_weight,
    task_block,
)
from fastuda.models import build_model, build_network
from fastuda.models import outputs as O
from fastuda.models.heads import ASPPClassifier

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo_corda.toml"
SKY = 10
NAN = float("nan")


def test_berhu_by_hand() -> None:
    # errors 0.1, 0.5, 1.0 -> c = 0.2: 0.1, (0.25 + 0.04) / 0.4, (1 + 0.04) / 0.4; NaN skipped
    pred = torch.tensor([[[0.1, 0.5, 1.0, 7.0]]], requires_grad=True)
    target = torch.tensor([[[0.0, 0.0, 0.0, float("nan")]]])
    loss = berhu_loss(pred, target, ratio=0.2)
    assert float(loss.detach()) == pytest.approx((0.1 + 0.725 + 2.6) / 3, rel=1e-6)
    loss.backward()
    # d/de: 1 in the L1 part, e / c in the L2 part; nothing for the invalid pixel
    assert pred.grad[0, 0].tolist() == pytest.approx([1 / 3, 2.5 / 3, 5 / 3, 0.0], rel=1e-5)
    nothing = berhu_loss(pred, torch.full((1, 1, 4), float("nan")))
    assert float(nothing.detach()) == 0.0


def test_depth_weight_by_hand() -> None:
    ds = torch.tensor([[[0.5, 0.2, 0.3, 0.4]]])
    dt = torch.tensor([[[0.5, 0.4, 0.1, 0.4]]])
    # relative: |diff| / |D_tgt| = 0, 0.5, 2, 0 -> relu(1 - .) + 1e-3 = 1.001, 0.501, 0.001, 1.001
    # clipped to 1, 0.501, 0.001, 1 -> divided by the mean
    raw = torch.tensor([1.0, 0.501, 0.001, 1.0])
    assert torch.allclose(depth_weight(ds, dt)[0, 0], raw / raw.mean(), atol=1e-6)
    # constant d = 0.4: |diff| / 0.4 = 0, 0.5, 0.5, 0
    raw = torch.tensor([1.0, 0.501, 0.501, 1.0])
    assert torch.allclose(depth_weight(ds, dt, scale=0.4)[0, 0], raw / raw.mean(), atol=1e-6)


@pytest.mark.parametrize("formulation", ["released", "fastuda"])
def test_model_wrapper_outputs_and_param_groups(formulation: str) -> None:
    net = build_model(ModelConfig(name="deeplabv2", backbone="resnet18", num_classes=5,
                                  projection=False))
    method = CorDA(CorDASettings(channels=16, formulation=formulation),
                   MethodContext(num_classes=5))
    model = method.wrap_model(net)
    assert isinstance(model, CorDAModel) and method.wrap_model(model) is model
    out = model(torch.randn(2, 3, 32, 32))
    assert out["logits"].shape == (2, 5, 4, 4)
    assert out["depth_source"].shape == out["depth_target"].shape == (2, 4, 4)
    initial = {O.LOGITS_INITIAL, O.DEPTH_SOURCE_INITIAL, O.DEPTH_TARGET_INITIAL}
    assert (initial <= set(out)) == (formulation == "released")
    groups = model.param_groups(1e-3, 10.0, 0.01)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    corda = [g for g in groups if g["name"].startswith("corda")]
    assert corda and all(g["lr"] == pytest.approx(1e-2) for g in corda)
    heads = [p for n, p in model.named_parameters() if not n.startswith("net.")]
    # optim.no_decay "mmseg" (default): every head parameter decayed; "1d": 1-D ones exempt
    assert [len(g["params"]) for g in corda if g["weight_decay"] == 0.01] == [len(heads)]
    net.no_decay = "1d"
    corda = [g for g in model.param_groups(1e-3, 10.0, 0.01) if g["name"].startswith("corda")]
    one_d = sum(1 for p in heads if p.ndim <= 1)
    assert {g["weight_decay"]: len(g["params"]) for g in corda} == {0.01: len(heads) - one_d,
                                                                    0.0: one_d}


def test_fastuda_formulation_hooks_mix_and_weight_pseudo_labels() -> None:
    method = CorDA(CorDASettings(formulation="fastuda"), MethodContext(num_classes=3))
    src = {"image": torch.zeros(1, 3, 2, 2), "depth": torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])}
    tgt = {"image": torch.zeros(1, 3, 2, 2),
           "depth": torch.tensor([[[0.5, float("nan")], [0.7, 0.8]]])}
    method.start_step(StepView(0, src, tgt, src["image"], torch.zeros(1, 2, 2)))
    out = {"depth_source": torch.zeros(1, 2, 2, requires_grad=True),
           "depth_target": torch.zeros(1, 2, 2, requires_grad=True)}
    s = method.source_losses(out, torch.zeros(1, 2, 2, dtype=torch.long), 0)["src.depth"]
    s = s.detach()
    assert float(s) == pytest.approx(0.01 * float(berhu_loss(out["depth_source"].detach(),
                                                             src["depth"])))
    mask = torch.tensor([[[True, False], [False, True]]])
    method.on_mix(mask, 0)
    mixed = torch.tensor([[[0.1, float("nan")], [0.7, 0.4]]])
    m = method.mixed_losses(out, mask.long(), torch.ones(1, 2, 2), 0)["mix.depth"].detach()
    assert float(m) == pytest.approx(0.001 * float(berhu_loss(out["depth_target"].detach(), mixed)))
    label, weight = torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 0.5)
    teacher = {"depth_source": torch.full((1, 2, 2), 0.2), "depth_target": torch.full((1, 2, 2),
                                                                                     0.2)}
    got_label, got_weight = method.refine_pseudo_labels(teacher, label, weight, 0)
    assert torch.equal(got_label, label) and torch.allclose(got_weight, weight)  # w == 1


def test_read_inverse_depth(tmp_path: Path) -> None:
    path = tmp_path / "d.png"
    Image.fromarray(np.array([[0, 65535], [32768, 100]], dtype=np.uint16)).save(path)
    inv = read_inverse_depth(str(path))
    assert np.isnan(inv[0, 0]) and inv[0, 1] == 1.0
    assert inv[1, 0] == pytest.approx(32768 / 65535)
    assert read_inverse_depth(str(path), zero_is_invalid=False)[0, 0] == 0.0
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(rgb)
    with pytest.raises(DataError, match="16-bit grayscale"):
        read_inverse_depth(str(rgb))


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_depth_crops_follow_the_label_crops(loader: str) -> None:
    if loader == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    root = REPO / "data" / "synthetic"
    ensure_synthetic(str(root))
    cfg = DataConfig(batch_size=4, num_workers=0, crop_size=[48, 96], ratio_range=[0.5, 1.5],
                     flip_prob=0.5, rcs=False, loader=loader)
    ds = DatasetConfig(name="synthetic_source", root=str(root))
    it = build_train_iterator(cfg, ds, stream=0, seed=3)
    flips = set()
    try:
        for _ in range(2):
            batch = next(it)
            depth = load_depth_batch(batch)
            label = batch["label"]
            assert depth.shape == label.shape
            padded = label == 255  # the synthetic pair labels every pixel: 255 is padding
            assert torch.isnan(depth[padded]).all() and not torch.isnan(depth[~padded]).any()
            # in the synthetic pair inverse depth 0 (infinitely far) is exactly the sky
            assert torch.equal(depth[~padded] == 0, label[~padded] == SKY)
            flips |= {bool(m["flip"]) for m in batch["meta"]}
    finally:
        it.close()
    assert flips == {True, False}  # both orientations were checked


# ----------------------------------------------------------------------------------------------
# The released network (qinenergy/corda model/deeplabv2_gta.py, model/deeplabv2_synthia.py)
# ----------------------------------------------------------------------------------------------
def _bn(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                        bn.eps)


def test_task_blocks_are_the_released_bottlenecks() -> None:
    # InitialTaskPredictionModule (#L337-L349): BottleneckPad(2048, 64, 1x1 conv + BN shortcut),
    # BottleneckPad(256, 64, identity): 2048 -> 256
    block = task_block(2048, 256)
    first, second = block
    assert [tuple(c.weight.shape) for c in (first.conv1, first.conv2, first.conv3)] == [
        (64, 2048, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1)]
    conv, bn = first.downsample
    assert tuple(conv.weight.shape) == (256, 2048, 1, 1) and conv.bias is None
    assert isinstance(bn, torch.nn.BatchNorm2d) and second.downsample is None
    assert block(torch.randn(2, 2048, 3, 3)).shape == (2, 256, 3, 3)
    # BottleneckPad.forward (#L147-L167) with plain ops, eval-mode BN with random statistics
    torch.manual_seed(0)
    b = TaskBottleneck(8, 2, shortcut=True)
    for m in b.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    b.eval()
    x = torch.randn(1, 8, 5, 5)
    y = F.relu(_bn(F.conv2d(x, b.conv1.weight), b.bn1))
    y = F.relu(_bn(F.conv2d(y, b.conv2.weight, padding=1), b.bn2))
    y = _bn(F.conv2d(y, b.conv3.weight), b.bn3)
    expected = F.relu(y + _bn(F.conv2d(x, b.downsample[0].weight), b.downsample[1]))
    assert torch.allclose(b(x), expected, atol=1e-5)
    ident = TaskBottleneck(8, 2, shortcut=False).eval()
    z = ident.bn3(ident.conv3(F.relu(ident.bn2(ident.conv2(F.relu(ident.bn1(ident.conv1(x))))))))
    assert torch.allclose(ident(x), F.relu(z + x), atol=1e-6)


def _released_model(**settings: object) -> tuple[CorDAModel, torch.nn.Module]:
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="deeplabv2", backbone="resnet18", num_classes=5,
                                  projection=False))
    s = CorDASettings(channels=16, **settings)
    return CorDA(s, MethodContext(num_classes=5)).wrap_model(net), net


def test_released_heads() -> None:
    model, net = _released_model()
    # SA blocks bias-free (model/layers.py#L28-L30); initial D / D_src 1x1 convs on the depth
    # feature (#L348-L351); final S, D, D_src ASPPs on 256 -> here 16 channels (#L212-L215)
    for sa in (model.depth_to_seg, model.seg_to_depth):
        assert sa.value.bias is None and sa.gate.bias is None
    for head in (model.initial_depth_source, model.initial_depth_target):
        assert tuple(head.weight.shape) == (1, 16, 1, 1)
    assert model.initial_seg is None
    for head, n in ((model.classifier, 5), (model.depth_source, 1), (model.depth_target, 1)):
        assert isinstance(head, ASPPClassifier) and head.in_channels == 16
        assert head.convs[0].out_channels == n
    # the task blocks' BN is trained (BottleneckPad has no requires_grad = False, #L134-L141)
    assert all(p.requires_grad for p in model.seg_task.parameters())
    # initial S = the wrapped DeepLab-V2's ASPP on layer 4 (Classifier_Module2048, #L346, #L363)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        expected = net.decode_head(net.backbone(x)[-1])
    assert torch.allclose(out[O.LOGITS_INITIAL], expected, atol=1e-6)
    assert not torch.allclose(out[O.LOGITS], out[O.LOGITS_INITIAL])
    # SYNTHIA's release: initial S a 1x1 conv on the segmentation task feature, before the
    # exchange (model/deeplabv2_synthia.py#L330, #L343)
    task, _ = _released_model(initial_seg_head="task")
    task.eval()
    seen = {}
    task.seg_task.register_forward_hook(lambda m, i, o: seen.setdefault("f", o))
    with torch.no_grad():
        out = task(x)
    w, b = task.initial_seg.weight, task.initial_seg.bias
    assert torch.allclose(out[O.LOGITS_INITIAL], F.conv2d(seen["f"], w, b), atol=1e-6)


def test_aspp_dilations_key() -> None:
    model, net = _released_model()
    heads = (net.decode_head, model.classifier, model.depth_source, model.depth_target)
    assert all(h.dilations == (6, 12, 18, 24) for h in heads)  # the fix, default
    model, net = _released_model(aspp_dilations=[6, 12])
    heads = (net.decode_head, model.classifier, model.depth_source, model.depth_target)
    assert all(h.dilations == (6, 12) for h in heads)
    # the release's Classifier_Module.forward returns inside its loop (#L122-L126): out =
    # conv[0](x) + conv[1](x); the [6, 12] head computes exactly that, keeping those weights
    torch.manual_seed(0)
    full = ASPPClassifier(8, 3)
    for conv in full.convs:
        torch.nn.init.normal_(conv.bias)
    x = torch.randn(1, 8, 30, 30)
    released = aspp_with_dilations(full, [6, 12])
    assert torch.allclose(released(x), full.convs[0](x) + full.convs[1](x), atol=1e-6)
    assert aspp_with_dilations(full, [6, 12, 18, 24]) is full
    # invalid values are errors naming the key
    for sets, key in ((["corda.aspp_dilations=[]"], "corda.aspp_dilations"),
                      (["corda.aspp_dilations=[6, 6]"], "corda.aspp_dilations"),
                      (["corda.formulation='released'", "corda.channels=10"], "corda.channels"),
                      (["corda.formulation='released'", "corda.discrepancy_scale=0.5"],
                       "corda.discrepancy_scale"),
                      (["corda.formulation='paper'"], "corda.formulation"),
                      (["corda.initial_seg_head='aspp'"], "corda.initial_seg_head")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(DEMO, sets)


# ----------------------------------------------------------------------------------------------
# The released losses (trainUDA_gta.py), by hand
# ----------------------------------------------------------------------------------------------
def _released(**settings: object) -> CorDA:
    return CorDA(CorDASettings(**settings), MethodContext(num_classes=3))


def _ce_by_hand(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """-log softmax at the label, 0 at ignored pixels: [B, H, W]."""
    logp = torch.log_softmax(logits, 1)
    safe = torch.where(label == IGNORE_INDEX, 0, label)
    ce = -logp.gather(1, safe[:, None])[:, 0]
    return torch.where(label == IGNORE_INDEX, 0.0, ce)


def _step(method: CorDA, src_depth: torch.Tensor, tgt_depth: torch.Tensor) -> None:
    img = torch.zeros(1, 3, 2, 2)
    method.start_step(StepView(0, {"image": img, "depth": src_depth},
                               {"image": img, "depth": tgt_depth}, img,
                               torch.zeros(1, 2, 2, dtype=torch.long)))


def test_released_source_losses_by_hand() -> None:
    # trainUDA_gta.py#L411-L416: CE(S) (the loop's) + CE(initial S)
    # + 0.01 [BerHu(initial D_src) + BerHu(D_src)] against the source depth
    method = _released()
    depth = torch.tensor([[[0.1, 0.2], [NAN, 0.4]]])
    _step(method, depth, torch.zeros(1, 2, 2))
    g = torch.Generator().manual_seed(1)
    label = torch.tensor([[[0, 1], [IGNORE_INDEX, 2]]])
    out = {O.LOGITS: torch.randn(1, 3, 2, 2, generator=g),
           O.LOGITS_INITIAL: torch.randn(1, 3, 2, 2, generator=g),
           # errors 0, 0.5, 1.0 (the NaN pixel skipped): c = 0.2 -> 0, 0.725, 2.6
           O.DEPTH_SOURCE: torch.tensor([[[0.1, 0.7], [5.0, 1.4]]]),
           # errors 0.1 everywhere: c = 0.02 -> (0.01 + 0.0004) / 0.04 = 0.26
           O.DEPTH_SOURCE_INITIAL: depth.nan_to_num(3.0) + 0.1}
    losses = method.source_losses(out, label, 0)
    assert set(losses) == {"src.ce_initial", "src.depth", "src.depth_initial"}
    ce = _ce_by_hand(out[O.LOGITS_INITIAL], label)
    assert float(losses["src.ce_initial"]) == pytest.approx(float(ce.sum() / 4), rel=1e-6)
    assert float(losses["src.depth"]) == pytest.approx(0.01 * (0.725 + 2.6) / 3, rel=1e-5)
    assert float(losses["src.depth_initial"]) == pytest.approx(0.01 * 0.26, rel=1e-5)
    # the presets average the source CE over the labelled pixels (CrossEntropy2d, utils/loss.py
    # #L25-L31), as the loop's src.ce does
    cfg = load_config(REPO / "configs" / "corda" / "deeplabv2_gta2cs.toml")
    method = CorDA(cfg.settings("corda"), MethodContext(num_classes=3,
                                                        self_training=cfg.self_training))
    _step(method, depth, torch.zeros(1, 2, 2))
    got = method.source_losses(out, label, 0)["src.ce_initial"]
    assert float(got) == pytest.approx(float(ce.sum() / 3), rel=1e-6)


def test_released_mixed_losses_by_hand() -> None:
    # trainUDA_gta.py#L489-L509, #L528-L533: CE(initial S) with the pixel weights (mean over all
    # pixels); BerHu of the ClassMix of the D_src head (pasted) and the D head (target pixels)
    # against the ClassMix of the two depth maps, final and initial heads, x 0.001
    method = _released(depth_weighting=False)
    _step(method, torch.tensor([[[0.1, 0.2], [0.3, NAN]]]),
          torch.tensor([[[0.5, 0.6], [0.7, 0.8]]]))
    mask = torch.tensor([[[True, False], [False, True]]])
    method.on_mix(mask, 0)  # ground truth [[0.1, 0.6], [0.7, NaN]]
    g = torch.Generator().manual_seed(2)
    label = torch.tensor([[[0, 1], [2, IGNORE_INDEX]]])
    weight = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]])
    out = {O.LOGITS: torch.randn(1, 3, 2, 2, generator=g),
           O.LOGITS_INITIAL: torch.randn(1, 3, 2, 2, generator=g),
           # mixed prediction [[0.2, 0.6], [0.9, 0.3]]: errors 0.1, 0, 0.2; c = 0.04
           # -> (0.01 + 0.0016) / 0.08 = 0.145, 0, (0.04 + 0.0016) / 0.08 = 0.52
           O.DEPTH_SOURCE: torch.tensor([[[0.2, 9.0], [9.0, 0.3]]]),
           O.DEPTH_TARGET: torch.tensor([[[9.0, 0.6], [0.9, 9.0]]]),
           # mixed initial [[0.4, 0.9], [1.0, .]]: errors 0.3 each, c = 0.06 -> 0.78
           O.DEPTH_SOURCE_INITIAL: torch.tensor([[[0.4, 0.0], [0.0, 0.0]]]),
           O.DEPTH_TARGET_INITIAL: torch.tensor([[[0.0, 0.9], [1.0, 0.0]]])}
    assert torch.equal(method.reweight_mixed(out, label, weight, 0), weight)  # weighting off
    losses = method.mixed_losses(out, label, weight, 0)
    assert set(losses) == {"mix.ce_initial", "mix.depth", "mix.depth_initial"}
    ce = _ce_by_hand(out[O.LOGITS_INITIAL], label)
    assert float(losses["mix.ce_initial"]) == pytest.approx(float((ce * weight).mean()),
                                                            rel=1e-6)
    assert float(losses["mix.depth"]) == pytest.approx(0.001 * 0.665 / 3, rel=1e-5)
    assert float(losses["mix.depth_initial"]) == pytest.approx(0.001 * 0.78, rel=1e-5)


def test_released_depth_weight_by_hand() -> None:
    # trainUDA_gta.py#L513-L516, #L523: the student's D_src and D heads on the mixed image,
    # divided by the ground-truth mixed depth [[0.5, 0.4], [0.1, invalid]]:
    # |diff| = 0, 0.2, 0.2, 0.5 -> ratios 0, 0.5, 2 -> relu(1 - .) + 1e-3 = 1.001, 0.501, 0.001;
    # the invalid pixel gets + 1; clipped to [0, 1]: 1, 0.501, 0.001, 1; mean 0.6255
    method = _released()
    _step(method, torch.tensor([[[0.5, 7.0], [7.0, NAN]]]),
          torch.tensor([[[7.0, 0.4], [0.1, 7.0]]]))
    mask = torch.tensor([[[True, False], [False, True]]])
    method.on_mix(mask, 0)
    out = {O.DEPTH_SOURCE: torch.tensor([[[0.5, 0.2], [0.3, 0.4]]]),
           O.DEPTH_TARGET: torch.tensor([[[0.5, 0.4], [0.1, 0.9]]])}
    weight = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]])  # ClassMixed: 1 pasted, q = 0.5 elsewhere
    w = torch.tensor([[[1.0, 0.501], [0.001, 1.0]]])
    got = method.reweight_mixed(out, torch.zeros(1, 2, 2, dtype=torch.long), weight, 0)
    assert torch.allclose(got, weight * w / 0.6255, atol=1e-6)
    # depth 0 (the synthetic pair's sky; the release's depths are >= 1): the floor 1e-3
    zero = released_depth_weight(torch.tensor([[0.1, 0.1]]), torch.tensor([[0.1, 0.1]]),
                                 torch.tensor([[0.0, 0.5]]))
    assert torch.allclose(zero, torch.tensor([[0.001, 1.0]]) / 0.5005, atol=1e-6)
    # the fastuda formulation leaves the mixed weights to the loop (teacher weights instead)
    fastuda = CorDA(CorDASettings(formulation="fastuda"), MethodContext(num_classes=3))
    assert fastuda.reweight_mixed(out, torch.zeros(1, 2, 2), weight, 0) is weight


def test_depth_weight_images_key_reproduces_the_release_broadcast() -> None:
    # trainUDA_gta.py#L512-L523: pixelWiseWeight [B, H, W] * depth_weight [B, 1, H, W] is
    # [B, B, H, W]; CrossEntropyLoss2dPixelWiseWeighted (utils/loss.py#L40-L43) then takes
    # mean(ce [B, H, W] * that): the release's loss, computed literally here
    g = torch.Generator().manual_seed(4)
    src_depth = torch.rand(2, 1, 3, generator=g) + 0.5
    tgt_depth = torch.rand(2, 1, 3, generator=g) + 0.5
    mask = torch.tensor([[[True, False, False]], [[False, True, False]]])
    depth_u = torch.where(mask, src_depth, tgt_depth)
    out = {O.DEPTH_SOURCE: depth_u + 0.3 * torch.rand(2, 1, 3, generator=g),
           O.DEPTH_TARGET: depth_u - 0.3 * torch.rand(2, 1, 3, generator=g)}
    logits = torch.randn(2, 3, 1, 3, generator=g)
    label = torch.randint(0, 3, (2, 1, 3), generator=g)
    pw = torch.where(mask, 1.0, 0.4)  # ClassMixed: 1 pasted, q = 0.4
    diff = (out[O.DEPTH_SOURCE] - out[O.DEPTH_TARGET]).abs()[:, None]
    dw = (torch.relu(1.0 - diff / depth_u[:, None]) + 1e-3).clamp(0, 1)  # [B, 1, H, W]
    ce = F.cross_entropy(logits, label, reduction="none")
    released = torch.mean(ce * (pw * dw / torch.mean(dw)))
    assert (pw * dw).shape == (2, 2, 1, 3)  # the broadcast
    for images, same in (("batch_mean", True), ("own", False)):
        method = _released(depth_weight_images=images)
        _step(method, src_depth, tgt_depth)
        method.on_mix(mask, 0)
        w = method.reweight_mixed(out, label, pw, 0)
        got = (_ce_by_hand(logits, label) * w).mean()  # the loop's weighted CE
        assert math.isclose(float(got), float(released), rel_tol=1e-5) == same, images
    # "own": each image its own weight, the release's formula without the broadcast
    own = (pw * dw[:, 0] / torch.mean(dw))
    assert torch.allclose(w, own, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# In the loop
# ----------------------------------------------------------------------------------------------
def _trainer(*sets: str) -> SelfTraining:
    cfg = load_config(DEMO, ["corda.formulation='released'", "data.crop_size=[64, 64]",
                             "model.backbone='resnet18'", *sets])
    torch.manual_seed(0)
    model = build_network(cfg)
    return SelfTraining(cfg, model, build_methods(cfg, model, torch.device("cpu")),
                        torch.device("cpu"))


class _FixedTeacher(torch.nn.Module):
    """Final logits say class 0 everywhere, the initial ones class 1."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = images.shape
        final = torch.zeros(b, 4, h // 8, w // 8)
        final[:, 0] = 20.0
        initial = torch.zeros_like(final)
        initial[:, 1] = 20.0
        return {O.LOGITS: final, O.LOGITS_INITIAL: initial}


def test_pseudo_labels_from_the_initial_head_until_25001() -> None:
    # trainUDA_gta.py#L435-L439: `if i_iter < 25001: initial_S else S` (i_iter from 0, as here)
    method = _released()
    assert method.pseudo_label_logits(0) == O.LOGITS_INITIAL
    assert method.pseudo_label_logits(25000) == O.LOGITS_INITIAL
    assert method.pseudo_label_logits(25001) is None
    stack = MethodStack([method], MethodContext(num_classes=3))
    assert stack.pseudo_label_logits(25001) == O.LOGITS
    assert _released(initial_pseudo_iters=0).pseudo_label_logits(0) is None  # SYNTHIA's
    fastuda = CorDA(CorDASettings(formulation="fastuda"), MethodContext(num_classes=3))
    assert fastuda.pseudo_label_logits(0) is None
    # the loop makes the pseudo-labels from the output the methods name
    trainer = _trainer()
    trainer.teacher = _FixedTeacher()
    images = torch.zeros(2, 3, 64, 64)
    for it, cls in ((0, 1), (25000, 1), (25001, 0), (40000, 0)):
        view = StepView(it=it, source={}, target={}, source_image=images,
                        source_label=torch.zeros(2, 64, 64, dtype=torch.long))
        label, weight, out = trainer._teacher_pseudo_labels(images, view)
        assert label.shape == (2, 64, 64) and bool((label == cls).all()), it
        assert out[O.LOGITS].shape[-2:] == (64, 64)
        assert float(weight.mean()) == pytest.approx(1.0)


def test_loop_mixed_ce_uses_the_depth_weight() -> None:
    # the loop's mix.ce (CE(S) with the pixel weights, trainUDA_gta.py#L529) reads the weights
    # CorDA computed from the student's mixed outputs, and so does CorDA's mix.ce_initial
    trainer = _trainer()
    method = trainer.methods["corda"]
    _step(method, torch.tensor([[[0.5, 7.0], [7.0, NAN]]]),
          torch.tensor([[[7.0, 0.4], [0.1, 7.0]]]))
    mask = torch.tensor([[[True, False], [False, True]]])
    method.on_mix(mask, 0)
    g = torch.Generator().manual_seed(3)
    out = {O.LOGITS: torch.randn(1, 4, 2, 2, generator=g),
           O.LOGITS_INITIAL: torch.randn(1, 4, 2, 2, generator=g),
           O.DEPTH_SOURCE: torch.tensor([[[0.5, 0.2], [0.3, 0.4]]]),
           O.DEPTH_TARGET: torch.tensor([[[0.5, 0.4], [0.1, 0.9]]]),
           O.DEPTH_SOURCE_INITIAL: torch.zeros(1, 2, 2),
           O.DEPTH_TARGET_INITIAL: torch.zeros(1, 2, 2)}
    label = torch.tensor([[[0, 1], [2, 3]]])
    img = torch.zeros(1, 3, 2, 2)
    view = StepView(0, {}, {}, img, label, mix_mask=mask, mixed_label=label,
                    mixed_weight=torch.tensor([[[1.0, 0.5], [0.5, 1.0]]]))
    losses = trainer._mixed_losses(out, view)
    weight = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]]) * torch.tensor(
        [[[1.0, 0.501], [0.001, 1.0]]]) / 0.6255
    assert torch.allclose(view.mixed_weight, weight, atol=1e-6)
    for key, logits in (("mix.ce", O.LOGITS), ("corda.mix.ce_initial", O.LOGITS_INITIAL)):
        expected = (_ce_by_hand(out[logits], label) * weight).mean()
        assert float(losses[key]) == pytest.approx(float(expected), rel=1e-5), key


@pytest.fixture(scope="module")
def synthetic_root() -> str:
    root = REPO / "data" / "synthetic"
    ensure_synthetic(str(root))
    return str(root)


@pytest.mark.parametrize("formulation", ["fastuda", "released"])
def test_demo_trains(formulation: str, synthetic_root: str, tmp_path: Path) -> None:
    """configs/demo_corda.toml (the fastuda formulation its README numbers were measured with)
    trains, and so does the released formulation; every CorDA loss is logged, finite."""
    sets = ["model.backbone='resnet18'", "data.crop_size=[64, 64]", "data.num_workers=0",
            "data.rcs_min_pixels=10", "train.max_iters=1", "train.device='cpu'",
            "train.precision='fp32'", "eval.mode='whole'", "eval.max_images=2",
            "eval.num_vis=1", f"corda.formulation={formulation!r}", "corda.channels=16"]
    for dom, name in (("source", "synthetic_source"), ("target", "synthetic_target"),
                      ("val", "synthetic_target")):
        split = "val" if dom == "val" else "train"
        sets += [f"data.{dom}.name={name!r}", f"data.{dom}.root={synthetic_root!r}",
                 f"data.{dom}.resize=[]", f"data.{dom}.split={split!r}"]
    from fastuda.train import train

    assert train(load_config(DEMO, sets), tmp_path / "run") is not None
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(x for x in lines if x["type"] == "train")
    own = {"corda.src.depth", "corda.mix.depth"}
    if formulation == "released":
        own |= {"corda.src.ce_initial", "corda.src.depth_initial", "corda.mix.ce_initial",
                "corda.mix.depth_initial"}
    assert own | {"src.ce", "mix.ce"} <= set(logged)
    assert not any(k.endswith("_initial") for k in logged) or formulation == "released"
    assert all(math.isfinite(logged[k]) for k in own)
    # evaluate/predict/export load the checkpoint into the network CorDA trained (its wrapper)
    from fastuda.engine.checkpoint import any_checkpoint
    from fastuda.evaluate import load_model

    cfg = load_config(DEMO, sets)
    for weights in ("student", "teacher"):
        model = load_model(cfg, any_checkpoint(tmp_path / "run"), weights, torch.device("cpu"))
        assert isinstance(model, CorDAModel) and model.formulation == formulation
        with torch.no_grad():
            logits = model(torch.zeros(1, 3, 64, 64))[O.LOGITS]
        assert logits.shape[:2] == (1, cfg.model.num_classes)
