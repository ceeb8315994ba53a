"""SePiCo's class-balanced target crop in the loop: the released behaviour (pseudo-labels made
again by the teacher on the crop, ``regen_pseudo = True`` in BIT-DA/SePiCo experiments.py#L274,
mmseg/models/uda/sepico.py#L259-L268) and ``class_balanced_crop_regen = false`` (the whole
image's teacher logits cut to the crop: one teacher forward less per step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastuda.config import ConfigError, load_config
from fastuda.engine.context import StepView
from fastuda.engine.self_training import SelfTraining, pseudo_label
from fastuda.methods import build_methods
from fastuda.models import build_network

REPO = Path(__file__).resolve().parents[2]
CROP = 32


def make_trainer(regen: bool) -> SelfTraining:
    cfg = load_config(REPO / "configs" / "demo.toml", [
        f"data.crop_size=[{CROP}, {CROP}]", "model.embed_dim=16",
        f"self_training.class_balanced_crop_regen={str(regen).lower()}"])
    torch.manual_seed(0)
    model = build_network(cfg)
    return SelfTraining(cfg, model, build_methods(cfg, model, torch.device("cpu")),
                        torch.device("cpu"))


def view_and_target() -> tuple[StepView, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    whole = torch.randn(2, 3, 2 * CROP, 4 * CROP, generator=g)  # a target resized wider
    view = StepView(it=0, source={}, target={"image": whole, "meta": [{}, {}]},
                    source_image=torch.zeros(2, 3, CROP, CROP),
                    source_label=torch.zeros(2, CROP, CROP, dtype=torch.long))
    return view, whole


def find_window(whole: torch.Tensor, crop: torch.Tensor) -> tuple[int, int]:
    """Where ``crop`` [3, h, w] lies in ``whole`` [3, H, W] (exact copy), by search."""
    h, w = crop.shape[-2:]
    hits = [(t, left) for t in range(whole.shape[-2] - h + 1)
            for left in range(whole.shape[-1] - w + 1)
            if torch.equal(whole[:, t:t + h, left:left + w], crop)]
    assert len(hits) == 1
    return hits[0]


def teacher_logits(trainer: SelfTraining, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = trainer.teacher(images)["logits"]
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("regen", [True, False])
def test_pseudo_labels_of_the_crop(regen: bool) -> None:
    trainer = make_trainer(regen)
    view, whole = view_and_target()
    # a threshold that keeps about half of the pixels, so the quality weight is not trivially 1
    thr = float(torch.softmax(teacher_logits(trainer, whole), 1).amax(1).median())
    trainer.cfg.self_training.pseudo_threshold = thr
    calls: list[tuple[int, ...]] = []
    trainer.teacher.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    trainer._make_pseudo_labels(view, {})
    crop = view.target_image
    assert crop.shape == (2, 3, CROP, CROP)
    boxes = [find_window(whole[b], crop[b]) for b in range(2)]
    if regen:  # released: the teacher runs on the whole image, then on the crop
        assert calls == [tuple(whole.shape), tuple(crop.shape)]
        logits = teacher_logits(trainer, crop)
    else:  # one teacher forward; its upsampled logits cut to each image's window
        assert calls == [tuple(whole.shape)]
        full = teacher_logits(trainer, whole)
        logits = torch.stack([full[b, :, t:t + CROP, left:left + CROP]
                              for b, (t, left) in enumerate(boxes)])
    # the expectation is the logits above; labels and weights follow from them by the loop's
    # own pseudo_label (tested by hand in test_self_training.py)
    label, weight = pseudo_label(logits, thr)
    assert torch.equal(view.pseudo_label, label)
    assert torch.allclose(view.pseudo_weight, weight)


def test_reuse_is_rejected_with_a_method_that_refines_from_teacher_outputs() -> None:
    # BiPCL's label transfer reads the teacher's target embeddings, which the reused crop lacks
    with pytest.raises(ConfigError, match="self_training.class_balanced_crop_regen"):
        load_config(REPO / "configs" / "demo_bipcl.toml", [
            "self_training.class_balanced_crop=true",
            "self_training.class_balanced_crop_regen=false"])
    cfg = load_config(REPO / "configs" / "demo_bipcl.toml", [
        "self_training.class_balanced_crop=true"])
    assert cfg.self_training.class_balanced_crop_regen
