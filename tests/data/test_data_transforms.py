"""Crop geometry: nearest/bilinear resampling of the crop window, cat_max_ratio, flip, pad."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastuda.data.loaders import finish_batch
from fastuda.data.transforms import (
    CropParams,
    Geometry,
    choose_crop,
    crop_image,
    nearest_indices,
    resize_pair,
    scaled_size,
)


@pytest.mark.parametrize(("src", "dst"), [((37, 53), (18, 29)), ((20, 30), (50, 71)),
                                          ((64, 128), (45, 90))])
def test_nearest_matches_pillow(src: tuple[int, int], dst: tuple[int, int]) -> None:
    # an image whose pixel values are their column / row index shows which source pixel was taken
    for axis in (0, 1):
        index = np.indices(src)[axis].astype(np.uint8)
        ours = index[np.ix_(nearest_indices(0, dst[0], dst[0], src[0]),
                            nearest_indices(0, dst[1], dst[1], src[1]))]
        pil = np.asarray(Image.fromarray(index).resize((dst[1], dst[0]),
                                                       Image.Resampling.NEAREST))
        # Pillow computes (i + 0.5) * in / out in floating point; where that is an exact integer
        # k (pixel centre on a pixel edge) it may land on k - 1. Ours is exact there.
        i = np.indices(dst)[axis]
        tie = ((2 * i + 1) * src[axis]) % (2 * dst[axis]) == 0
        np.testing.assert_array_equal(ours[~tie], pil[~tie])
        np.testing.assert_array_equal(ours[tie], ((2 * i + 1) * src[axis] // (2 * dst[axis]))[tie])
        assert (np.abs(ours[tie].astype(int) - pil[tie]) <= 1).all()


@pytest.mark.parametrize("ratio", [0.55, 1.0, 1.7])
def test_crop_window_equals_resize_then_crop(ratio: float) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    sh, sw = scaled_size((60, 90), None, ratio)
    g = Geometry(60, 90, sh, sw, top=min(7, sh - 20), left=min(11, sw - 30), crop_h=20,
                 crop_w=30, flip=False)
    whole = np.asarray(Image.fromarray(image).resize((sw, sh), Image.Resampling.BILINEAR))
    expected = whole[g.top:g.top + 20, g.left:g.left + 30].astype(int)
    assert np.abs(crop_image(image, g).astype(int) - expected).max() <= 1


def test_cat_max_ratio_picks_first_passing_draw() -> None:
    label = np.zeros((10, 40), dtype=np.uint8)
    label[:, 30:] = 1
    anchors = ((0.0, 0.0), (0.0, 0.5), (0.0, 0.8), (0.0, 0.99))
    params = CropParams(1.0, anchors, flip=False)
    # left = int(v * 31): 0 and 15 hold only class 0; 24 holds 6 columns of 0 and 4 of 1 (60%)
    g, crop = choose_crop(label, params, (10, 10), None, 0.75)
    assert (g.top, g.left) == (0, 24)
    np.testing.assert_array_equal(crop, label[:, 24:34])
    g, _ = choose_crop(label, params, (10, 10), None, 1.0)  # disabled: the first draw
    assert g.left == 0
    fail = CropParams(1.0, ((0.0, 0.0), (0.0, 0.3)), flip=False)
    g, _ = choose_crop(label, fail, (10, 10), None, 0.75)  # none passes: the last draw
    assert g.left == 9


def test_ignore_pixels_do_not_count_for_cat_max_ratio() -> None:
    label = np.full((10, 10), 255, dtype=np.uint8)
    label[:, :2] = 3
    label[:, 2:3] = 4  # valid: 20 of class 3, 10 of class 4 -> 67% < 75%
    g, _ = choose_crop(label, CropParams(1.0, ((0.0, 0.0),), False), (10, 10), None, 0.75)
    assert g.left == 0


def test_small_image_is_padded_after_flip() -> None:
    label = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6)
    image = np.stack([label * 10] * 3, axis=-1).astype(np.uint8)
    params = CropParams(1.0, ((0.5, 0.5),), flip=True)
    g, crop = choose_crop(label, params, (8, 8), (6, 4), 1.0)  # resize to 6x4 = no-op
    assert (g.top, g.left, g.valid_h, g.valid_w) == (0, 0, 4, 6)
    expected = np.full((8, 8), 255, dtype=np.uint8)
    expected[:4, :6] = label[:, ::-1]
    np.testing.assert_array_equal(crop, expected)
    img = crop_image(image, g)
    np.testing.assert_array_equal(img[:4, :6, 0], image[:, ::-1, 0])
    assert (img[4:] == 0).all() and (img[:, 6:] == 0).all()
    batch = finish_batch({"image": torch.from_numpy(img).permute(2, 0, 1)[None],
                          "label": torch.from_numpy(crop)[None], "meta": [g.as_meta()]},
                         [1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    assert (batch["image"][0, :, 4:] == 0).all() and (batch["image"][0, :, :, 6:] == 0).all()
    np.testing.assert_allclose(batch["image"][0, 0, 0, 0].item(), (img[0, 0, 0] - 1.0) / 2.0)


def test_fixed_resize_then_ratio() -> None:
    assert scaled_size((1052, 1914), (1280, 720), 1.0) == (720, 1280)
    assert scaled_size((1052, 1914), (1280, 720), 0.5) == (360, 640)
    assert scaled_size((128, 256), None, 1.5) == (192, 384)


def test_keep_ratio_resize_as_mmcv() -> None:
    """mmcv Resize(img_scale, keep_ratio=True): f = min(max(scale) / long side, min(scale) /
    short side) (SePiCo mmseg/datasets/pipelines/transforms.py#L50, the releases' default)."""
    # GTA 1914x1052 at (1280, 720): f = min(1280/1914, 720/1052) = 1280/1914; 1052 f = 703.5
    assert scaled_size((1052, 1914), (1280, 720), 1.0, keep_ratio=True) == (704, 1280)
    # HRDA's gtaHR (2560, 1440): 1052 * 2560/1914 = 1407.06
    assert scaled_size((1052, 1914), (2560, 1440), 1.0, keep_ratio=True) == (1407, 2560)
    # Cityscapes 2048x1024 at (1024, 512): both sides fit, 2:1 kept exactly
    assert scaled_size((1024, 2048), (1024, 512), 1.0, keep_ratio=True) == (512, 1024)
    # the short side binds: 1000x1000 at (1280, 720) -> 720x720
    assert scaled_size((1000, 1000), (1280, 720), 1.0, keep_ratio=True) == (720, 720)
    image = np.zeros((1052, 1914, 3), dtype=np.uint8)
    img2, lab2 = resize_pair(image, image[..., 0], (1280, 720), keep_ratio=True)
    assert img2.shape == (704, 1280, 3) and lab2.shape == (704, 1280)


def test_val_resize_pair() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (30, 40), dtype=np.uint8)
    img2, lab2 = resize_pair(image, label, (20, 15))
    assert img2.shape == (15, 20, 3) and lab2.shape == (15, 20)
    np.testing.assert_array_equal(
        lab2, np.asarray(Image.fromarray(label).resize((20, 15), Image.Resampling.NEAREST)))


def test_geometry_from_meta_is_the_recorded_geometry() -> None:
    # a crop reaching past the rescaled image (valid 5 x 7 of 8 x 9), flipped
    g = Geometry(40, 60, 13, 20, top=8, left=13, crop_h=8, crop_w=9, flip=True)
    meta = {"orig_size": (40, 60), **g.as_meta()}
    assert meta["crop_box"] == (8, 13, 5, 7)
    assert Geometry.from_meta(meta, (8, 9)) == g


def test_scale_choices_draw_only_those_scales_equally_often() -> None:
    from fastuda.data.transforms import draw_crop_params

    rng = np.random.default_rng(0)
    ratios = [draw_crop_params(rng, (1.0, 1.0), 0.5, (0.8, 1.0, 1.2)).ratio for _ in range(900)]
    values, counts = np.unique(ratios, return_counts=True)
    assert values.tolist() == [0.8, 1.0, 1.2]
    assert (np.abs(counts - 300) < 60).all()  # 1/3 each (binomial sd ~14)
    uniform = [draw_crop_params(rng, (0.8, 1.2), 0.5).ratio for _ in range(50)]
    assert len(set(uniform)) == 50 and 0.8 <= min(uniform) and max(uniform) <= 1.2


def test_fit_crop_enlarges_the_binding_side_to_the_crop() -> None:
    from fastuda.data.transforms import fit_crop

    # DASS at scale 0.8: GTA 1914x1052 with shorter edge 850 -> 680 x 1237 (int truncation,
    # joint_transforms.py#L424-L434), smaller than the 730 crop: x 730/680 -> 730 x 1328
    assert fit_crop((680, 1237), (730, 730)) == (730, round(1237 * 730 / 680))
    assert fit_crop((850, 1546), (730, 730)) == (850, 1546)  # the crop fits: unchanged
    assert fit_crop((100, 60), (50, 80)) == (round(100 * 80 / 60), 80)  # the width binds
    assert fit_crop((40, 40), (40, 40)) == (40, 40)


def test_small_crop_resize_is_the_release_square_crop_resized() -> None:
    """DASS (nopad): an image smaller than the crop gives a square crop of its shorter side at
    a random offset, resized (nearest for the label) to the crop size. Ours enlarges the image
    by crop / shorter side and crops there: the same label up to the rounding of one nearest
    resize against two."""
    label = (np.arange(70)[None, :] // 7 % 19).repeat(40, axis=0).astype(np.uint8)  # 10 stripes
    x1 = 16  # the release's crop offset in the 40 x 70 image
    pil = Image.fromarray(label).crop((x1, 0, x1 + 40, 40))
    released = np.asarray(pil.resize((50, 50), Image.Resampling.NEAREST))
    # the same offset in the enlarged image: x1 * 50 / 40 = 20 of a margin of 88 - 50 = 38
    params = CropParams(1.0, ((0.0, 20 / 39),), flip=False)
    g, crop = choose_crop(label, params, (50, 50), None, 1.0, small_crop="resize")
    assert (g.scaled_h, g.scaled_w, g.top, g.left) == (50, 88, 0, 20)
    assert (g.valid_h, g.valid_w) == (50, 50)  # no padding
    assert (crop != 255).all()
    # the columns that differ are one pixel from a stripe edge of the released crop
    edges = np.flatnonzero(np.diff(released[0].astype(int)) != 0) + 1
    differ = np.flatnonzero((crop != released).any(axis=0))
    assert len(differ) <= len(edges)
    assert all(np.abs(edges - c).min() <= 1 for c in differ)
    # the padded default: the 40 x 70 image, 10 rows of 255 below it
    g, crop = choose_crop(label, params, (50, 50), None, 1.0)
    assert (g.valid_h, g.scaled_h) == (40, 40) and (crop[40:] == 255).all()


def test_small_crop_resize_image_is_the_enlarged_image_cropped() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)
    label = np.zeros((30, 45), dtype=np.uint8)
    g, _ = choose_crop(label, CropParams(0.8, ((0.0, 0.5),), False), (32, 32), None, 1.0,
                       small_crop="resize")
    assert (g.scaled_h, g.scaled_w) == (32, 48)  # 0.8 x (30, 45) = (24, 36), then x 32 / 24
    whole = np.asarray(Image.fromarray(image).resize((48, 32), Image.Resampling.BILINEAR))
    expected = whole[:, g.left:g.left + 32].astype(int)
    assert np.abs(crop_image(image, g).astype(int) - expected).max() <= 1
    with pytest.raises(ValueError, match="small_crop"):
        choose_crop(label, CropParams(1.0, ((0.0, 0.0),), False), (8, 8), None, 1.0,
                    small_crop="stretch")
