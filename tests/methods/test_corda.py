"""CorDA: BerHu and the depth weight by hand, the network wrapper, and depth crops that agree with
the label crops of both loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastuda.config import DataConfig, DatasetConfig, ModelConfig
from fastuda.data import ensure_synthetic
from fastuda.data.depth import load_depth_batch, read_inverse_depth
from fastuda.data.io import DataError
from fastuda.data.loaders import build_train_iterator, dali_available
from fastuda.engine.context import MethodContext, StepView
from fastuda.methods.corda import CorDA, CorDAModel, CorDASettings, berhu_loss, depth_weight
from fastuda.models import build_model

REPO = Path(__file__).resolve().parents[2]
SKY = 10


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


def test_model_wrapper_outputs_and_param_groups() -> None:
    net = build_model(ModelConfig(name="deeplabv2", backbone="resnet18", num_classes=5,
                                  projection=False))
    method = CorDA(CorDASettings(channels=16), MethodContext(num_classes=5))
    model = method.wrap_model(net)
    assert isinstance(model, CorDAModel) and method.wrap_model(model) is model
    out = model(torch.randn(2, 3, 32, 32))
    assert out["logits"].shape == (2, 5, 4, 4)
    assert out["depth_source"].shape == out["depth_target"].shape == (2, 4, 4)
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


def test_hooks_mix_and_weight_pseudo_labels() -> None:
    method = CorDA(CorDASettings(), MethodContext(num_classes=3))
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
