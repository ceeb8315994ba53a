"""SePiCo's Cityscapes->Dark Zurich rules (fastuda/methods/daynight.py) against hand-computed
cases: the released class weights, the DANNet day/night fusion, the test-time re-weighting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastuda.config import ConfigError, EvalConfig, load_config
from fastuda.data import class_balanced_crop
from fastuda.engine.context import StepView
from fastuda.engine.losses import weighted_ce
from fastuda.engine.self_training import SelfTraining
from fastuda.evaluate import predict
from fastuda.methods import build_methods
from fastuda.methods.daynight import (
    RELEASED_FREQUENCIES,
    SHIFT_INSENSITIVE_CLASSES,
    eval_class_weight,
    mix_day_night_probs,
    released_class_weight,
)
from fastuda.models import build_network

REPO = Path(__file__).resolve().parents[2]


def _pixels(*probs: list[float]) -> torch.Tensor:
    """[1, C, 1, P] from one probability vector per pixel."""
    return torch.tensor(probs, dtype=torch.float32).T[None, :, None, :]


def test_class_weight_formula_on_a_hand_case() -> None:
    """f = e^0, e^-1, e^-2: log f = 0, -1, -2, mean -1, unbiased std 1 -> 1 - s, 1, 1 + s."""
    w = released_class_weight([1.0, math.exp(-1), math.exp(-2)], std=0.05)
    torch.testing.assert_close(w, torch.tensor([0.95, 1.0, 1.05]))


def test_released_class_weights() -> None:
    """The released frequencies (BIT-DA/SePiCo experiments.py#L487-L490): 19 classes; the
    weights average 1 with unbiased std 0.05 (train, #L491-L492) or 0.16 (test,
    encoder_decoder_projector.py#L308); road (most frequent) weighs least, bicycle most."""
    assert len(RELEASED_FREQUENCIES) == 19
    assert RELEASED_FREQUENCIES[0] == 0.36869696 and RELEASED_FREQUENCIES[18] == 0.00413907
    for s in (0.05, 0.16):
        w = released_class_weight(std=s)
        assert w.shape == (19,)
        assert abs(float(w.mean()) - 1.0) < 1e-6
        assert abs(float(w.std()) - s) < 1e-6
        assert int(w.argmin()) == 0 and int(w.argmax()) == 17  # road / bicycle (0.00098658)


def test_shift_insensitive_classes_are_released_ranges() -> None:
    # experiments.py#L257: road..fence [0, 5), vegetation, terrain, sky [8, 11)
    assert SHIFT_INSENSITIVE_CLASSES == ((0, 5), (8, 11))


def test_fusion_rule_by_hand() -> None:
    """Classes 0, 1 shift-insensitive ([0, 2)), class 2 not; day_ratio 0.8, threshold 0.4.
    Pixel A: day (0.5, 0.3, 0.2), night (0.1, 0.2, 0.7): class 0 takes 0.8 day (0.5 > 0.4):
    0.8*0.5 + 0.2*0.1 = 0.42; class 1 takes 0.2 day (0.3 <= 0.4): 0.2*0.3 + 0.8*0.2 = 0.22;
    class 2 night only: 0.7 -> label 2. Pixel B: day (0.9, 0.05, 0.05), night (0.3, 0.3, 0.4):
    0.72 + 0.06 = 0.78, 0.01 + 0.24 = 0.25, 0.4 -> label 0."""
    day = _pixels([0.5, 0.3, 0.2], [0.9, 0.05, 0.05])
    night = _pixels([0.1, 0.2, 0.7], [0.3, 0.3, 0.4])
    fused = mix_day_night_probs(day, night, classes=((0, 2),), day_ratio=0.8,
                                day_confidence=0.4)
    torch.testing.assert_close(fused, _pixels([0.42, 0.22, 0.7], [0.78, 0.25, 0.4]))
    assert fused.argmax(1).flatten().tolist() == [2, 0]
    # the class weights multiply the fused map: (1, 2, 0.5) turns pixel A into class 1
    weighted = mix_day_night_probs(day, night, classes=((0, 2),),
                                   class_weight=torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(weighted, _pixels([0.42, 0.44, 0.35], [0.78, 0.5, 0.2]))
    assert weighted.argmax(1).flatten().tolist() == [1, 0]


class FixedLogits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.logits.expand(images.shape[0], -1, -1, -1)}


def test_test_time_reweighting_by_hand() -> None:
    """logits (0, ln 2, 0): softmax (0.25, 0.5, 0.25); weights (2.5, 1, 1): (0.625, 0.5, 0.25):
    the prediction moves from class 1 to class 0 (encoder_decoder_projector.py#L314-L330)."""
    logits = torch.tensor([0.0, math.log(2.0), 0.0]).view(1, 3, 1, 1)
    model = FixedLogits(logits)
    cfg = EvalConfig(mode="whole")
    images = torch.zeros(1, 3, 1, 1)
    out = predict(model, images, cfg, 3, class_weight=torch.tensor([2.5, 1.0, 1.0]))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.625, 0.5, 0.25]))
    assert int(predict(model, images, cfg, 3).argmax(1)) == 1 and int(out.argmax(1)) == 0


def test_test_time_reweighting_resizes_the_weighted_scores() -> None:
    """As released: softmax at image size, times the weights, then the bilinear resize to the
    label's size (not the logits resized first)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 2, 2, generator=g) * 3
    w = torch.tensor([2.0, 1.0, 0.5])
    out = predict(FixedLogits(logits), torch.zeros(1, 3, 2, 2), EvalConfig(mode="whole"), 3,
                  (4, 4), w)
    want = F.interpolate(torch.softmax(logits, 1) * w.view(1, 3, 1, 1), size=(4, 4),
                         mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, want)


def test_preset_turns_the_test_time_weights_on() -> None:
    cfg = load_config(REPO / "configs" / "sepico" / "daformer_dist_cs2darkzurich.toml")
    w = eval_class_weight(cfg)
    assert w is not None
    torch.testing.assert_close(w, released_class_weight(std=0.16))
    assert abs(float(w.std()) - 0.16) < 1e-6
    off = load_config(REPO / "configs" / "sepico" / "daformer_dist_cs2darkzurich.toml",
                      ["daynight.test_reweight=false"])
    assert eval_class_weight(off) is None
    assert eval_class_weight(load_config(REPO / "configs" / "demo.toml")) is None


# -- in the loop ----------------------------------------------------------------------------
CROP = 32


def make_trainer(*sets: str) -> SelfTraining:
    cfg = load_config(REPO / "configs" / "demo.toml", [
        f"data.crop_size=[{CROP}, {CROP}]", "model.embed_dim=16",
        'methods=["sepico", "daynight"]', "self_training.class_balanced_crop_regen=true", *sets])
    torch.manual_seed(0)
    model = build_network(cfg)
    return SelfTraining(cfg, model, build_methods(cfg, model, torch.device("cpu")),
                        torch.device("cpu"))


def teacher_probs(trainer: SelfTraining, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = trainer.teacher(images)["logits"]
    return torch.softmax(F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                                       align_corners=False), 1)


def test_loop_fuses_day_and_night_for_the_crop_and_the_pseudo_labels() -> None:
    """As released (sepico_dark.py#L324-L360): the crop is chosen on the fused labels of the
    whole images, the day image is cropped with the night crop's box, and the pseudo-labels and
    the quality weight come from the fused, class-weighted map of the two crops."""
    trainer = make_trainer()
    g = torch.Generator().manual_seed(3)
    night = torch.randn(2, 3, 2 * CROP, 4 * CROP, generator=g)
    day = torch.randn(2, 3, 2 * CROP, 4 * CROP, generator=g)
    view = StepView(it=0, source={}, target={"image": night, "day": day, "meta": [{}, {}]},
                    source_image=torch.zeros(2, 3, CROP, CROP),
                    source_label=torch.zeros(2, CROP, CROP, dtype=torch.long))
    w = released_class_weight()
    whole = mix_day_night_probs(teacher_probs(trainer, day), teacher_probs(trainer, night),
                                class_weight=w)
    thr = float(whole.amax(1).median())  # about half the pixels confident
    trainer.cfg.self_training.pseudo_threshold = thr
    expected_gen = torch.Generator().set_state(trainer.generator.get_state())
    boxes = [class_balanced_crop(lbl, (CROP, CROP), generator=expected_gen)
             for lbl in whole.argmax(1)]
    seen: list[torch.Tensor] = []
    trainer.teacher.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    trainer._make_pseudo_labels(view, {})
    assert [tuple(x.shape) for x in seen] == [tuple(night.shape), tuple(day.shape),
                                              (2, 3, CROP, CROP), (2, 3, CROP, CROP)]
    night_crop = torch.stack([night[b, :, t:t + CROP, x:x + CROP]
                              for b, (t, x) in enumerate(boxes)])
    day_crop = torch.stack([day[b, :, t:t + CROP, x:x + CROP] for b, (t, x) in enumerate(boxes)])
    assert torch.equal(view.target_image, night_crop)
    assert torch.equal(seen[2], night_crop) and torch.equal(seen[3], day_crop)
    fused = mix_day_night_probs(teacher_probs(trainer, day_crop),
                                teacher_probs(trainer, night_crop), class_weight=w)
    conf, label = fused.max(1)
    assert torch.equal(view.pseudo_label, label)
    q = float((conf >= thr).float().mean())
    torch.testing.assert_close(view.pseudo_weight, torch.full_like(view.pseudo_weight, q))
    # the fusion changed something: the night-only labels differ
    assert not torch.equal(label, teacher_probs(trainer, night_crop).argmax(1))


def test_segmentation_ce_is_class_weighted_as_mmseg() -> None:
    """mmseg: F.cross_entropy(weight=class_weight, reduction='none'), then the plain mean
    (BIT-DA/SePiCo mmseg/models/losses/cross_entropy_loss.py#L21-L32). Zero logits over 2
    classes: every pixel's CE is ln 2. Labels (0, 1, 255), weights (1, 3): 'all' mean
    (ln2 + 3 ln2 + 0) / 3; 'valid' (ln2 + 3 ln2) / 2; pixel weights (0.5, 1, 1):
    (0.5 ln2 + 3 ln2) / 3."""
    logits = torch.zeros(1, 2, 1, 3)
    label = torch.tensor([[[0, 1, 255]]])
    cw = torch.tensor([1.0, 3.0])
    ln2 = math.log(2.0)
    torch.testing.assert_close(weighted_ce(logits, label, None, "all", cw),
                               torch.tensor(4 * ln2 / 3))
    torch.testing.assert_close(weighted_ce(logits, label, None, "valid", cw),
                               torch.tensor(4 * ln2 / 2))
    torch.testing.assert_close(weighted_ce(logits, label, torch.tensor([[[0.5, 1.0, 1.0]]]),
                                           "all", cw), torch.tensor(3.5 * ln2 / 3))
    # in the loop: the method sets the context's weights; every pass's CE uses them (the
    # released mean over all pixels; the demo base keeps "valid")
    trainer = make_trainer('self_training.source_ce_average="all"')
    torch.testing.assert_close(trainer.ctx.ce_class_weight, released_class_weight())
    out = {"logits": torch.zeros(1, 19, 1, 3)}
    lab = torch.tensor([[[0, 17, 255]]])
    ce = trainer.ctx.segmentation_loss("src", out, lab)["src.ce"]
    w = released_class_weight()
    torch.testing.assert_close(ce, (w[0] + w[17]) * math.log(19.0) / 3)
    off = make_trainer("daynight.ce_class_weight=false")
    assert off.ctx.ce_class_weight is None


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="daynight.day_ratio"):
        make_trainer("daynight.day_ratio=1.5")
    with pytest.raises(ConfigError, match="daynight.frequencies"):
        make_trainer("daynight.frequencies=[0.5, 0.5]")
    with pytest.raises(ConfigError, match="class_balanced_crop_regen"):
        make_trainer("self_training.class_balanced_crop_regen=false")
