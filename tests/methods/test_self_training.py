"""The building blocks of the self-training step against hand-computed expectations."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastuda.engine.self_training import (
    classmix_masks,
    ema_alpha,
    ema_update,
    lr_factor,
    pseudo_label,
    pseudo_margin_mask,
    set_teacher_mode,
    weighted_ce,
)

REPO = Path(__file__).resolve().parents[2]


def test_ema_alpha_schedule() -> None:
    assert ema_alpha(0, 0.999) == 0.0  # the teacher starts as a copy of the student
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(9, 0.999) == pytest.approx(0.9)
    assert ema_alpha(100000, 0.999) == 0.999


def test_ema_update_parameters_and_buffers() -> None:
    torch.manual_seed(0)
    student, teacher = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    student.weight.data = torch.tensor([1.0, 2.0, 3.0])
    teacher.weight.data = torch.tensor([3.0, 2.0, 1.0])
    student.running_mean.fill_(4.0)
    student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.75)
    assert teacher.weight.tolist() == pytest.approx([2.5, 2.0, 1.5])
    assert teacher.running_mean.tolist() == pytest.approx([1.0, 1.0, 1.0])  # 0.75*0 + 0.25*4
    assert int(teacher.num_batches_tracked) == 7


def test_ema_update_parameters_only_as_released() -> None:
    """SePiCo sepico.py#L135-L144 averages ``parameters()`` only: the teacher's buffers (its
    BatchNorm running statistics) stay what its own forwards made them."""
    student, teacher = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    student.weight.data = torch.tensor([1.0, 2.0, 3.0])
    teacher.weight.data = torch.tensor([3.0, 2.0, 1.0])
    student.running_mean.fill_(4.0)
    teacher.running_mean.fill_(-1.0)
    student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.75, buffers=False)
    assert teacher.weight.tolist() == pytest.approx([2.5, 2.0, 1.5])
    assert teacher.running_mean.tolist() == [-1.0, -1.0, -1.0]
    assert int(teacher.num_batches_tracked) == 0


def _tiny_bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.5))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        net[1].bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
        net[1].running_mean.fill_(5.0)
        net[1].running_var.fill_(4.0)
    return net


def test_teacher_batch_norm_normalises_with_the_batch_statistics() -> None:
    """The released teacher (train mode, dropout off; SePiCo sepico.py#L244-L248): BatchNorm of
    the batch it sees, dropout the identity; "running" is the eval-mode teacher."""
    student = _tiny_bn_net()
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        y = student[0](x)  # the conv's output, normalised by hand below
    w, b, eps = student[1].weight.detach(), student[1].bias.detach(), student[1].eps
    mean = y.mean((0, 2, 3))
    var = ((y - mean[:, None, None]) ** 2).mean((0, 2, 3))  # biased, as BatchNorm normalises
    batch = (y - mean[:, None, None]) / torch.sqrt(var[:, None, None] + eps) * w[:, None, None] \
        + b[:, None, None]
    running = (y - 5.0) / math.sqrt(4.0 + eps) * w[:, None, None] + b[:, None, None]

    teacher = set_teacher_mode(copy.deepcopy(student), "batch")
    assert not teacher.training and not teacher[2].training and teacher[1].training
    with torch.no_grad():
        out = teacher(x)
    assert torch.allclose(out, batch, atol=1e-5)  # no dropout zeros or 1/(1-p) scaling
    # its own forward moves its running statistics (momentum 0.1), as the release's does
    assert teacher[1].running_mean.tolist() == pytest.approx((0.9 * 5.0 + 0.1 * mean).tolist())

    teacher = set_teacher_mode(copy.deepcopy(student), "running")
    assert not any(m.training for m in teacher.modules())
    with torch.no_grad():
        assert torch.allclose(teacher(x), running, atol=1e-5)
    assert teacher[1].running_mean.tolist() == [5.0, 5.0, 5.0]


@pytest.mark.parametrize("norm", ["batch", "running"])
def test_trainer_teacher_modes_and_hrda_inference(norm: str) -> None:
    """The loop's HRDA teacher stays an eval-mode module (its multi-resolution inference), only
    its BatchNorm layers follow self_training.teacher_norm, even after an evaluation put the
    whole teacher in eval mode; the EMA averages buffers only for "running"."""
    from fastuda.config import load_config
    from fastuda.engine.self_training import SelfTraining
    from fastuda.methods import build_methods
    from fastuda.models import build_network

    cfg = load_config(REPO / "configs" / "demo_cluda_hrda.toml", [
        "data.crop_size=[64, 64]", "hrda.detail_crop=[32, 32]", "hrda.attention_channels=8",
        "cluda.grid=[4, 4]", "cluda.head_channels=8", f"self_training.teacher_norm=\"{norm}\""])
    torch.manual_seed(0)
    model = build_network(cfg)
    trainer = SelfTraining(cfg, model, build_methods(cfg, model, torch.device("cpu")),
                           torch.device("cpu"))
    bns = [m for m in trainer.teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training == (norm == "batch") for m in bns)
    assert not trainer.teacher.training  # HRDAModel.forward: the inference path
    trainer.teacher.eval()  # what an evaluation of the teacher leaves behind
    g = torch.Generator().manual_seed(1)
    src = {"image": torch.randn(2, 3, 64, 64, generator=g),
           "label": torch.randint(0, 4, (2, 64, 64), generator=g)}
    before = [m.running_mean.clone() for m in bns]
    assert trainer.step(src, {"image": torch.randn(2, 3, 64, 64, generator=g)}, 5).finite
    assert all(m.training == (norm == "batch") for m in bns) and not trainer.teacher.training
    s_after = [m.running_mean for m in trainer.student.modules() if isinstance(m, nn.BatchNorm2d)]
    a = 1.0 - 1.0 / 7  # ema_alpha(5 + 1, 0.999): alpha(it + 1) after step it, as released
    for tb, t0, s1 in zip(bns, before, s_after, strict=True):
        if norm == "running":  # no teacher forward moved them; the EMA of the student's
            assert torch.allclose(tb.running_mean, a * t0 + (1 - a) * s1, atol=1e-6)
        else:  # the EMA left them alone: only the teacher's own forwards moved them
            assert not torch.allclose(tb.running_mean, a * t0 + (1 - a) * s1, atol=1e-6)


def test_pseudo_label_weight_is_the_confident_fraction() -> None:
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, :2] = 10.0  # top half: class 1, confident
    logits[0, 0, 2:, :1] = 10.0  # one column of the bottom half: class 0, confident
    label, weight = pseudo_label(logits, threshold=0.968)
    assert label[0, :2].eq(1).all() and label[0, 2:, 0].eq(0).all()
    expected_q = (8 + 2) / 16
    assert weight.unique().tolist() == pytest.approx([expected_q])
    _, w2 = pseudo_label(logits, threshold=0.968, ignore_top=1, ignore_bottom=1, quality="image")
    assert w2[0, 0].eq(0).all() and w2[0, -1].eq(0).all()
    # "image": q counts only the kept rows' confident pixels, over all pixels
    assert float(w2[0, 1, 0]) == pytest.approx((4 + 1) / 16)


def test_pseudo_label_quality_is_one_scalar_per_batch_before_the_rows() -> None:
    """The release (SePiCo sepico.py#L254-L256 then #L283-L292; DAFormer dacs.py#L274-L286):
    q = confident pixels of the whole batch, every row / all pixels of the batch; the ignored
    rows are zeroed in the weight map afterwards."""
    logits = torch.zeros(2, 2, 4, 4)
    logits[0, 1, :2] = 10.0  # image 0: its two top rows confident (8 pixels, 4 in row 0)
    logits[1, 0, 3, :1] = 10.0  # image 1: one confident pixel, in the bottom row
    _, weight = pseudo_label(logits, threshold=0.968, ignore_top=1, ignore_bottom=1)
    q = (8 + 1) / 32  # rows 0 and 3 counted, both images together
    expected = torch.full((2, 4, 4), q)
    expected[:, 0] = 0
    expected[:, -1] = 0
    assert torch.allclose(weight, expected)
    # fastuda before issue 13: per image, after the rows: 4/16 and 0/16
    _, old = pseudo_label(logits, threshold=0.968, ignore_top=1, ignore_bottom=1, quality="image")
    assert old[:, 1:3].flatten(1).max(1).values.tolist() == pytest.approx([4 / 16, 0.0])


def test_classmix_takes_half_the_classes_rounded_up() -> None:
    gen = torch.Generator().manual_seed(0)
    lbl = torch.tensor([[[0, 1, 2], [3, 4, 255]], [[5, 5, 5], [5, 5, 5]]])
    masks = classmix_masks(lbl, gen)
    chosen0 = lbl[0][masks[0]].unique()
    assert chosen0.numel() == 3 and 255 not in chosen0.tolist()
    # every pixel of a chosen class is pasted, none of the others
    for c in range(5):
        assert bool(masks[0][lbl[0] == c].all()) == (c in chosen0.tolist())
    assert masks[1].all()  # one class -> ceil(1/2) = 1 class: all of it


def test_weighted_ce_is_mean_over_all_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    label = torch.randint(0, 3, (2, 4, 4))
    label[0, 0, 0] = 255
    weight = torch.rand(2, 4, 4)
    ce = F.cross_entropy(logits, label, ignore_index=255, reduction="none")
    assert float(weighted_ce(logits, label, weight)) == pytest.approx(float((ce * weight).mean()),
                                                                      rel=1e-6)
    # logits at a lower stride are upsampled to the label size first
    small = torch.randn(2, 3, 2, 2)
    up = F.interpolate(small, size=(4, 4), mode="bilinear", align_corners=False)
    assert float(weighted_ce(small, label)) == pytest.approx(
        float(F.cross_entropy(up, label, ignore_index=255)), rel=1e-6)


def test_lr_schedule() -> None:
    assert lr_factor(0, 100, 10, 1.0) == pytest.approx(1e-6)
    assert lr_factor(5, 100, 10, 1.0) == pytest.approx(0.95 * (1 - (1 - 1e-6) * 0.5))
    assert lr_factor(10, 100, 10, 1.0) == pytest.approx(0.9)
    assert lr_factor(50, 100, 0, 2.0) == pytest.approx(0.25)
    assert math.isclose(lr_factor(99, 100, 10, 1.0), 0.01)


def test_pseudo_margin_mask_by_hand() -> None:
    """HRDA's margins (top 1, bottom 2, left 3, right 1) on a 10x12 image: the mask of a 6x8
    crop at (2, 3), flipped, in a 6x9 batch (one padded column), and at twice the scale."""
    image = [[0.0 if y < 1 or y >= 10 - 2 or x < 3 or x >= 12 - 1 else 1.0 for x in range(12)]
             for y in range(10)]
    window = [row[3:11] for row in image[2:8]]
    metas = [{"scaled_size": (10, 12), "crop_box": (2, 3, 6, 8), "flip": False},
             {"scaled_size": (10, 12), "crop_box": (2, 3, 6, 8), "flip": True}]
    got = pseudo_margin_mask(metas, [1, 2, 3, 1], (6, 9))
    expected = torch.ones(2, 6, 9)
    expected[0, :, :8] = torch.tensor(window)
    expected[1, :, :8] = torch.tensor([row[::-1] for row in window])
    assert torch.equal(got, expected)
    # an image scaled to 20x24 from the reference 10x12: margins of 2, 4, 6, 2 pixels
    big = pseudo_margin_mask([{"scaled_size": (20, 24), "crop_box": (0, 0, 20, 24),
                               "flip": False}], [1, 2, 3, 1], (20, 24), reference_hw=(10, 12))
    rows, cols = big[0][:, 10], big[0][10]  # a column and a row inside
    assert rows.tolist() == [0.0] * 2 + [1.0] * 14 + [0.0] * 4
    assert cols.tolist() == [0.0] * 6 + [1.0] * 16 + [0.0] * 2


def test_source_ce_averages_over_all_pixels_as_released() -> None:
    """mmseg v0.16's loss (SePiCo mmseg/models/losses/cross_entropy_loss.py#L21-L32, utils.py
    #L68-L69): CE with reduction 'none' (0 at ignored pixels), then the mean over every pixel."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 2, 2, generator=g)
    label = torch.tensor([[[0, 255], [2, 255]]])  # two labelled pixels of four
    ce0 = -torch.log_softmax(logits[0, :, 0, 0], 0)[0]
    ce2 = -torch.log_softmax(logits[0, :, 1, 0], 0)[2]
    assert float(weighted_ce(logits, label, average="all")) == pytest.approx(
        float(ce0 + ce2) / 4, rel=1e-6)
    assert float(weighted_ce(logits, label, average="valid")) == pytest.approx(
        float(ce0 + ce2) / 2, rel=1e-6)
    from fastuda.engine.losses import segmentation_losses

    out = {"logits": logits, "logits_detail": logits[:, :, :1], "detail_box": torch.tensor(
        [0, 1, 0, 2])}
    losses = segmentation_losses("src", out, label, detail_weight=0.1, average="all")
    assert float(losses["src.ce"]) == pytest.approx(0.9 * float(ce0 + ce2) / 4, rel=1e-6)
    # the detail box holds row 0: one labelled pixel of two
    up = F.interpolate(logits[:, :, :1], size=(1, 2), mode="bilinear", align_corners=False)
    assert float(losses["src.ce_detail"]) == pytest.approx(
        0.1 * float(-torch.log_softmax(up[0, :, 0, 0], 0)[0]) / 2, rel=1e-6)


@pytest.mark.parametrize("step_rule", ["next", "same"])
def test_teacher_after_the_first_steps_is_the_released_ema(step_rule: str) -> None:
    """The teacher after steps 0, 1, 2 against an EMA computed here from the student's
    parameters after each step. Released (SePiCo sepico.py#L133-L134, #L222-L227; DAFormer
    dacs.py#L104-L105, #L213-L218): the teacher starts as a copy, and the update at the start of
    iteration t > 0 uses alpha(t) = min(1 - 1/(t + 1), 0.999), i.e. 1/2, 2/3, 3/4 after steps
    0, 1, 2. "same" (fastuda before issue 13): alpha(it) after step it: 0, 1/2, 2/3."""
    from fastuda.config import load_config
    from fastuda.engine.self_training import SelfTraining
    from fastuda.methods import build_methods
    from fastuda.models import build_network

    cfg = load_config(REPO / "configs" / "demo_daformer.toml", [
        "data.crop_size=[32, 32]", "self_training.teacher_norm=\"batch\"",
        f"self_training.ema_alpha_step=\"{step_rule}\""])
    torch.manual_seed(0)
    model = build_network(cfg)
    trainer = SelfTraining(cfg, model, build_methods(cfg, model, torch.device("cpu")),
                           torch.device("cpu"))
    expected = [p.detach().clone() for p in trainer.teacher.parameters()]
    alphas = {"next": [1 / 2, 2 / 3, 3 / 4], "same": [0.0, 1 / 2, 2 / 3]}[step_rule]
    g = torch.Generator().manual_seed(1)
    for it, a in enumerate(alphas):
        src = {"image": torch.randn(2, 3, 32, 32, generator=g),
               "label": torch.randint(0, 4, (2, 32, 32), generator=g)}
        assert trainer.step(src, {"image": torch.randn(2, 3, 32, 32, generator=g)}, it).finite
        student = [p.detach() for p in trainer.student.parameters()]
        expected = [a * e + (1 - a) * s for e, s in zip(expected, student, strict=True)]
        teacher = list(trainer.teacher.parameters())
        assert all(torch.allclose(t, e, atol=1e-6, rtol=1e-5)
                   for t, e in zip(teacher, expected, strict=True)), (step_rule, it)
        if a > 0:  # the student moved away from the teacher: they differ
            assert not all(torch.equal(t, s) for t, s in zip(teacher, student, strict=True))
