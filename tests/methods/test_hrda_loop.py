"""The shared loop in HRDA mode: the detail CE on the box, and an exact checkpoint round trip of
the generator the detail boxes come from."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastuda.config import load_config
from fastuda.engine.self_training import SelfTraining, segmentation_losses
from fastuda.methods import build_methods
from fastuda.models import build_network

REPO = Path(__file__).resolve().parents[2]


def test_segmentation_losses_crop_labels_and_weights_to_the_box() -> None:
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 8, 8), generator=g)
    weight = torch.rand(2, 8, 8, generator=g)
    out = {"logits": torch.randn(2, 3, 4, 4, generator=g),
           "logits_detail": torch.randn(2, 3, 2, 2, generator=g),
           "detail_box": torch.tensor([4, 8, 0, 4])}
    losses = segmentation_losses("mix", out, label, weight, detail_weight=0.1)
    up = F.interpolate(out["logits_detail"], size=(4, 4), mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, label[:, 4:8, 0:4], reduction="none")
    assert float(losses["mix.ce_detail"]) == pytest.approx(
        0.1 * float((ce * weight[:, 4:8, 0:4]).mean()), rel=1e-6)
    # the fused CE counts 1 - 0.1 (the released HRDAHead.losses)
    up = F.interpolate(out["logits"], size=(8, 8), mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, label, reduction="none")
    assert float(losses["mix.ce"]) == pytest.approx(0.9 * float((ce * weight).mean()), rel=1e-6)
    assert set(segmentation_losses("src", {"logits": out["logits"]}, label)) == {"src.ce"}


def make_trainer() -> SelfTraining:
    cfg = load_config(REPO / "configs" / "demo_cluda_hrda.toml", [
        "data.crop_size=[64, 64]", "hrda.detail_crop=[32, 32]", "hrda.attention_channels=8",
        "cluda.grid=[4, 4]", "cluda.head_channels=8", "model.num_classes=19",
        "self_training.pseudo_threshold=0.01"])
    torch.manual_seed(0)
    model = build_network(cfg)
    method = build_methods(cfg, model, torch.device("cpu"))
    return SelfTraining(cfg, model, method, torch.device("cpu"))


def batches(it: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(100 + it)
    src = {"image": torch.randn(2, 3, 64, 64, generator=g),
           "label": torch.randint(0, 4, (2, 64, 64), generator=g)}
    return src, {"image": torch.randn(2, 3, 64, 64, generator=g)}


def test_checkpoint_round_trip_resumes_the_detail_boxes_exactly() -> None:
    a = make_trainer()
    assert a.student.generator is a.generator and a.teacher.generator is None
    a.step(*batches(0), 0)
    state = copy.deepcopy(a.state_dict())
    ra = a.step(*batches(1), 1)
    box_a = a.student.draw_box(64, 64)

    b = make_trainer()
    b.load_state_dict(state)
    assert b.student.generator is b.generator
    rb = b.step(*batches(1), 1)
    assert ra.finite and rb.finite
    assert {"src.ce_detail", "mix.ce_detail", "cluda.src.contrast", "cluda.mix.contrast"} \
        <= set(ra.losses)
    assert ra.losses == rb.losses
    assert b.student.draw_box(64, 64) == box_a
    for (k, pa), pb in zip(a.student.state_dict().items(), b.student.state_dict().values(),
                           strict=True):
        assert torch.equal(pa, pb), k
    # CLUDA's pair-weight head: in the optimiser, trained, and restored by the method's state
    for (k, pa), pb in zip(a.methods["cluda"].state_dict().items(),
                           b.methods["cluda"].state_dict().values(),
                           strict=True):
        assert torch.equal(pa, pb), k


def test_cluda_weight_head_is_trained_and_checkpointed() -> None:
    a = make_trainer()
    head = a.methods["cluda"].weight_head
    assert head is not None and a.method_params
    in_optim = {id(p) for g in a.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in head.parameters()} <= in_optim
    group = next(g for g in a.optimizer.param_groups if g["params"][0] is a.method_params[0])
    assert group["lr"] == pytest.approx(a.cfg.optim.lr * a.cfg.optim.head_lr_mult)
    before = copy.deepcopy(a.methods["cluda"].state_dict())
    assert any(k.startswith("weight_head.") for k in before)
    assert a.step(*batches(0), 0).finite
    after = a.methods["cluda"].state_dict()
    assert not torch.equal(before["weight_head.out.weight"], after["weight_head.out.weight"])
    # a checkpoint round trip restores the head (a fresh trainer's differs before loading)
    state = copy.deepcopy(a.state_dict())
    b = make_trainer()
    assert not torch.equal(b.methods["cluda"].state_dict()["weight_head.out.weight"],
                           after["weight_head.out.weight"])
    b.load_state_dict(state)
    for k, v in after.items():
        assert torch.equal(b.methods["cluda"].state_dict()[k], v), k
    ra, rb = a.step(*batches(1), 1), b.step(*batches(1), 1)
    assert ra.losses == rb.losses


def test_cluda_needs_the_feature_channels_of_the_hrda_head() -> None:
    from fastuda.engine.context import MethodContext
    from fastuda.methods.cluda import CLUDA, CLUDASettings

    with pytest.raises(ValueError, match="feature_channels"):
        CLUDA(CLUDASettings(multires_loss="three_term"),
              MethodContext(num_classes=19, multi_resolution=True))
    with pytest.raises(ValueError, match="decode head"):  # the released head's type
        CLUDA(CLUDASettings(), MethodContext(num_classes=19, multi_resolution=True))
    cfg = load_config(REPO / "configs" / "demo_cluda_hrda.toml")
    assert build_methods(cfg, build_network(cfg), torch.device("cpu"))["cluda"].weight_head \
        is not None
    single = load_config(REPO / "configs" / "demo_cluda_hrda.toml", ["hrda.enabled=false"])
    assert build_methods(single, build_network(single),
                         torch.device("cpu"))["cluda"].weight_head is None
