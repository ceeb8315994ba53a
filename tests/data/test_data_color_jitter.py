"""The source stream's ColorJitter (SPCL, ``data.source.color_jitter``): each operation against a
hand computation, the draws against torchvision's ranges, the order, and the loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastuda.config import DataConfig, DatasetConfig
from fastuda.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    ColorJitterDraw,
    color_jitter,
    draw_color_jitter,
    jitter_crop,
    jitter_normalised,
)
from fastuda.data.loaders import build_train_iterator, normalise
from fastuda.data.sampling import SamplePlanner

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _only(op: int, value: float) -> ColorJitterDraw:
    values = [None, None, None, None]
    values[op] = value
    return ColorJitterDraw((0, 1, 2, 3), *values)


def _pixels(*rgb: tuple[float, float, float]) -> torch.Tensor:
    """[1, 3, 1, N] from N RGB triples."""
    return torch.tensor(rgb, dtype=torch.float64).t().reshape(1, 3, 1, len(rgb))


def _rgb(x: torch.Tensor) -> list[list[float]]:
    return x.reshape(3, -1).t().tolist()


def test_brightness_scales_and_clamps() -> None:
    out = color_jitter(_pixels((100 / 255, 0.5, 0.0), (220 / 255, 0.9, 0.1)),
                       _only(BRIGHTNESS, 1.3))
    np.testing.assert_allclose(_rgb(out), [[130 / 255, 0.65, 0.0], [1.0, 1.0, 0.13]])


def test_contrast_blends_with_the_mean_grey_of_the_image() -> None:
    # two grey pixels 0.2 and 0.6: mean grey 0.4; factor 0.5 halves the distance to it
    out = color_jitter(_pixels((0.2, 0.2, 0.2), (0.6, 0.6, 0.6)), _only(CONTRAST, 0.5))
    np.testing.assert_allclose(_rgb(out), [[0.3] * 3, [0.5] * 3])


def test_saturation_blends_with_the_pixel_grey() -> None:
    grey = 0.299 * 0.8 + 0.587 * 0.4 + 0.114 * 0.2  # ITU-R 601 luma = 0.4968
    out = color_jitter(_pixels((0.8, 0.4, 0.2)), _only(SATURATION, 0.0))
    np.testing.assert_allclose(_rgb(out), [[grey] * 3])
    out = color_jitter(_pixels((0.8, 0.4, 0.2)), _only(SATURATION, 2.0))
    np.testing.assert_allclose(_rgb(out), [[1.0, 0.8 - grey, 0.0]])  # 2x - grey, clamped


def test_hue_rotates_the_hue_circle() -> None:
    out = color_jitter(_pixels((1.0, 0.0, 0.0)), _only(HUE, 1 / 3))
    np.testing.assert_allclose(_rgb(out), [[0.0, 1.0, 0.0]], atol=1e-12)
    out = color_jitter(_pixels((1.0, 0.0, 0.0)), _only(HUE, -1 / 3))
    np.testing.assert_allclose(_rgb(out), [[0.0, 0.0, 1.0]], atol=1e-12)
    # (0.8, 0.4, 0.2): hue 20 deg, s 0.75, v 0.8; + half a turn -> 200 deg: (0.2, 0.6, 0.8)
    out = color_jitter(_pixels((0.8, 0.4, 0.2)), _only(HUE, 0.5))
    np.testing.assert_allclose(_rgb(out), [[0.2, 0.6, 0.8]], atol=1e-12)


def test_the_operations_run_in_the_drawn_order() -> None:
    x = _pixels((0.2, 0.2, 0.2), (0.6, 0.6, 0.6))
    # brightness 2 first: 0.4 and 1.0 (clamped), then contrast 0: the mean 0.7 everywhere
    first = color_jitter(x, ColorJitterDraw((BRIGHTNESS, CONTRAST, SATURATION, HUE), 2.0, 0.0,
                                            None, None))
    np.testing.assert_allclose(_rgb(first), [[0.7] * 3] * 2)
    # contrast 0 first: 0.4 everywhere, then brightness 2: 0.8
    second = color_jitter(x, ColorJitterDraw((CONTRAST, HUE, SATURATION, BRIGHTNESS), 2.0, 0.0,
                                             None, None))
    np.testing.assert_allclose(_rgb(second), [[0.8] * 3] * 2)


def test_same_as_torchvision_functional_in_the_same_order() -> None:
    tf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    draw = ColorJitterDraw((HUE, CONTRAST, BRIGHTNESS, SATURATION), 1.3, 0.7, 1.4, -0.15)
    expected = x.clone()
    for k in draw.order:
        expected = {BRIGHTNESS: lambda t: tf.adjust_brightness(t, draw.brightness),
                    CONTRAST: lambda t: tf.adjust_contrast(t, draw.contrast),
                    SATURATION: lambda t: tf.adjust_saturation(t, draw.saturation),
                    HUE: lambda t: tf.adjust_hue(t, draw.hue)}[k](expected)
    # torchvision's grey is 0.2989 R + 0.587 G + 0.114 B (ours 0.299): within 1e-3
    assert (color_jitter(x, draw) - expected).abs().max() < 1e-3


def test_draws_follow_torchvisions_ranges() -> None:
    rng = np.random.default_rng(0)
    draws = [draw_color_jitter(rng, (0.5, 0.5, 1.5, 0.2)) for _ in range(400)]
    for d in draws:
        assert sorted(d.order) == [0, 1, 2, 3]
        assert 0.5 <= d.brightness <= 1.5 and 0.5 <= d.contrast <= 1.5
        assert 0.0 <= d.saturation <= 2.5  # [max(0, 1 - 1.5), 1 + 1.5]
        assert -0.2 <= d.hue <= 0.2
    assert len({d.order for d in draws}) == 24  # every order occurs
    assert min(d.brightness for d in draws) < 0.55 and max(d.brightness for d in draws) > 1.45
    assert min(d.hue for d in draws) < -0.18 and max(d.hue for d in draws) > 0.18
    none = draw_color_jitter(rng, (0.0, 0.5, 0.0, 0.0))  # strength 0: that operation is skipped
    assert none.brightness is None and none.saturation is None and none.hue is None
    assert none.contrast is not None


def test_jitter_crop_leaves_the_padding_and_rounds_to_uint8() -> None:
    crop = np.zeros((6, 8, 3), dtype=np.uint8)
    crop[:4, :5] = 100
    out = jitter_crop(crop, (4, 5), _only(BRIGHTNESS, 1.255))
    assert (out[:4, :5] == 126).all()  # 125.5 rounds to 126 (half to even: 126)
    assert (out[4:] == 0).all() and (out[:, 5:] == 0).all()


def test_jitter_of_a_normalised_batch_is_the_crops_jitter_normalised() -> None:
    rng = np.random.default_rng(1)
    crop = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    crop[7:] = 0  # 7 valid rows
    draw = draw_color_jitter(rng, (0.5, 0.5, 0.5, 0.2))
    meta = {"crop_box": (0, 0, 7, 12)}
    expected = normalise(torch.from_numpy(jitter_crop(crop, (7, 12), draw)).permute(2, 0, 1)[None],
                         MEAN, STD)
    expected[:, :, 7:] = 0
    batch = normalise(torch.from_numpy(crop).permute(2, 0, 1)[None], MEAN, STD)
    batch[:, :, 7:] = 0
    out = jitter_normalised(batch, [meta], [draw], MEAN, STD)
    # float rounding can move a value at .5 one grey level
    assert (out - expected).abs().max() <= 1.01 / min(STD)
    assert (out[:, :, 7:] == 0).all()
    assert torch.equal(jitter_normalised(batch, [meta], [None], MEAN, STD), batch)


def test_planner_jitter_leaves_the_other_draws_unchanged() -> None:
    plain = SamplePlanner(20, seed=5, stream=0, ratio_range=(0.5, 2.0))
    jittered = SamplePlanner(20, seed=5, stream=0, ratio_range=(0.5, 2.0),
                             color_jitter=(0.5, 0.5, 0.5, 0.2))
    for position in range(30):
        a, b = plain.plan(position), jittered.plan(position)
        assert (a.index, a.attempts) == (b.index, b.attempts)
        assert a.jitter is None and b.jitter == jittered.jitter_draw(position)
    assert jittered.plan(3).jitter != jittered.plan(4).jitter


def test_source_stream_batches_are_the_jittered_crops(synthetic_root: Path) -> None:
    def stream(jitter: list[float]) -> dict:
        cfg = DataConfig(source=DatasetConfig(name="synthetic_source", root=str(synthetic_root),
                                              color_jitter=jitter),
                         target=DatasetConfig(name="synthetic_target", root=str(synthetic_root)),
                         crop_size=[64, 96], batch_size=2, num_workers=0, loader="torch",
                         rcs=False)
        it = build_train_iterator(cfg, cfg.source, stream=0, seed=7)
        batch = next(it)
        it.close()
        return batch

    plain, jittered = stream([]), stream([0.5, 0.5, 0.5, 0.2])
    assert torch.equal(plain["label"], jittered["label"])
    assert not torch.equal(plain["image"], jittered["image"])
    planner = SamplePlanner(1, seed=7, stream=0, color_jitter=(0.5, 0.5, 0.5, 0.2))
    # un-normalised, the plain crop jittered by hand with the position's draw
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for b, meta in enumerate(plain["meta"]):
        _, _, vh, vw = meta["crop_box"]
        crop = (plain["image"][b] * s + m).round().clamp(0, 255).to(torch.uint8)
        crop = crop.permute(1, 2, 0).numpy()
        hand = jitter_crop(crop, (vh, vw), planner.jitter_draw(meta["position"]))
        want = normalise(torch.from_numpy(hand).permute(2, 0, 1)[None], MEAN, STD)[0]
        got = jittered["image"][b]
        assert (got[:, :vh, :vw] - want[:, :vh, :vw]).abs().max() < 1e-4
