"""SePiCo's Cityscapes->Dark Zurich rules (fastuda/methods/daynight.py) against hand-computed
cases: the released class weights, the DANNet day/night fusion, the test-time re-weighting."""

from __future__ import annotations

import math

import torch

from fastuda.methods.daynight import (
    RELEASED_FREQUENCIES,
    SHIFT_INSENSITIVE_CLASSES,
    mix_day_night_probs,
    released_class_weight,
    reweight_test_probs,
)


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


def test_test_time_reweighting_by_hand() -> None:
    """logits (0, ln 2, 0): softmax (0.25, 0.5, 0.25); weights (2.5, 1, 1): (0.625, 0.5, 0.25):
    the prediction moves from class 1 to class 0."""
    logits = torch.tensor([0.0, math.log(2.0), 0.0]).view(1, 3, 1, 1)
    out = reweight_test_probs(logits, torch.tensor([2.5, 1.0, 1.0]))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.625, 0.5, 0.25]))
    assert int(logits.argmax(1)) == 1 and int(out.argmax(1)) == 0
