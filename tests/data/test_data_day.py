"""Dark Zurich day/night pairing (SePiCo's Cityscapes->Dark Zurich variant): the correspondence
lists, the day image of each night image in the target batches, and the errors before training.

The fake layout follows Dark Zurich's (BIT-DA/SePiCo experiments.py#L486 reads
``data/dark_zurich/corresp/train/night/``; mmseg/models/uda/sepico_dark.py#L213-L221 turns a listed
``train/day/<seq>/<name>`` into ``rgb_anon/train/day/<seq>/<name>_rgb_anon.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastuda.config import DataConfig, DatasetConfig
from fastuda.data import DataError, build_dataset
from fastuda.data.loaders import TARGET_STREAM, build_train_iterator, dali_available

H, W = 24, 40
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_pairs(root: Path, n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """n night frames of sequence GOPR0356, night frame i paired with day frame 10 + 2i of
    GOPR0351; every day image is 255 minus its night image (so a pairing can be checked pixel
    by pixel). Returns night path -> expected day image."""
    rng = np.random.default_rng(seed)
    lines, expected = [], {}
    for i in range(n):
        night = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        day = 255 - night
        night_name = f"GOPR0356/GOPR0356_frame_{i:06d}"
        day_name = f"GOPR0351/GOPR0351_frame_{10 + 2 * i:06d}"
        night_path = root / "rgb_anon" / "train" / "night" / f"{night_name}_rgb_anon.png"
        _save(night_path, night)
        _save(root / "rgb_anon" / "train" / "day" / f"{day_name}_rgb_anon.png", day)
        lines.append(f"train/night/{night_name},train/day/{day_name}\n")
        expected[str(night_path)] = day
    csv = root / "corresp" / "train" / "night" / "GOPR0356.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("".join(reversed(lines)))  # the order of the list does not matter
    return expected


def _cfg(root: Path, **kw: object) -> DataConfig:
    base = dict(source=DatasetConfig(name="dark_zurich", root=str(root)),
                target=DatasetConfig(name="dark_zurich", root=str(root)),
                val=DatasetConfig(name="dark_zurich", root=str(root)),
                crop_size=[16, 24], batch_size=3, num_workers=0, loader="torch",
                ratio_range=[1.0, 1.0], flip_prob=0.5)
    base.update(kw)
    return DataConfig(**base)  # type: ignore[arg-type]


def test_dataset_pairs_each_night_image_with_its_listed_day_image(tmp_path: Path) -> None:
    make_pairs(tmp_path)
    ds = build_dataset(DatasetConfig(name="dark_zurich", root=str(tmp_path)), day=True)
    for i in range(len(ds)):
        _, _, meta = ds[i]
        frame = int(Path(meta["path"]).name.split("_")[2])
        assert meta["day_path"] == str(tmp_path / "rgb_anon" / "train" / "day" / "GOPR0351" /
                                       f"GOPR0351_frame_{10 + 2 * frame:06d}_rgb_anon.png")
    plain = build_dataset(DatasetConfig(name="dark_zurich", root=str(tmp_path)))
    assert "day_path" not in plain[0][2]


@pytest.mark.parametrize("loader, workers", [("torch", 0), ("torch", 1), ("dali", 1)])
def test_target_batches_carry_the_day_crop_of_each_night_crop(tmp_path: Path, loader: str,
                                                              workers: int) -> None:
    """No resize, 16x24 crops of 24x40 images, random flips: the day crop is the day image's
    window at the night crop's box, flipped alike, normalised like the image: night + day = 255
    pixel for pixel, so (x_night * std + mean) + (x_day * std + mean) = 255."""
    if loader == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    expected = make_pairs(tmp_path)
    it = build_train_iterator(_cfg(tmp_path, num_workers=workers, loader=loader),
                              _cfg(tmp_path).target,
                              stream=TARGET_STREAM, seed=3, day=True)
    flips = set()
    for _ in range(4):
        batch = next(it)
        assert batch["day"].shape == batch["image"].shape
        m = torch.tensor(MEAN).view(1, 3, 1, 1)
        s = torch.tensor(STD).view(1, 3, 1, 1)
        total = (batch["image"] * s + m) + (batch["day"] * s + m)
        torch.testing.assert_close(total, torch.full_like(total, 255.0), atol=1e-3, rtol=0)
        for b, meta in enumerate(batch["meta"]):
            top, left, h, w = meta["crop_box"]
            window = expected[meta["path"]][top:top + h, left:left + w]
            if meta["flip"]:
                window = window[:, ::-1]
            flips.add(bool(meta["flip"]))
            day_u8 = (batch["day"][b] * s[0] + m[0]).round().permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(day_u8[:h, :w], window)
    assert flips == {True, False}


def test_missing_correspondence_folder_is_one_error_naming_it(tmp_path: Path) -> None:
    make_pairs(tmp_path)
    folder = tmp_path / "corresp" / "train" / "night"
    (folder / "GOPR0356.csv").unlink()
    folder.rmdir()
    with pytest.raises(DataError) as err:
        build_dataset(DatasetConfig(name="dark_zurich", root=str(tmp_path)), day=True)
    assert err.value.path == str(folder) and "\n" not in str(err.value)


def test_missing_day_image_is_an_error_naming_the_file(tmp_path: Path) -> None:
    make_pairs(tmp_path)
    gone = (tmp_path / "rgb_anon" / "train" / "day" / "GOPR0351" /
            "GOPR0351_frame_000012_rgb_anon.png")
    gone.unlink()
    with pytest.raises(DataError) as err:
        build_dataset(DatasetConfig(name="dark_zurich", root=str(tmp_path)), day=True)
    assert err.value.path == str(gone)


def test_unlisted_night_image_is_an_error_naming_it(tmp_path: Path) -> None:
    make_pairs(tmp_path)
    extra = (tmp_path / "rgb_anon" / "train" / "night" / "GOPR0356" /
             "GOPR0356_frame_000099_rgb_anon.png")
    _save(extra, np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError) as err:
        build_dataset(DatasetConfig(name="dark_zurich", root=str(tmp_path)), day=True)
    assert err.value.path == str(extra)


def test_conflicting_pairs_and_other_datasets_are_errors(tmp_path: Path) -> None:
    make_pairs(tmp_path)
    csv = tmp_path / "corresp" / "train" / "night" / "other.csv"
    csv.write_text("train/night/GOPR0356/GOPR0356_frame_000000,train/day/GOPR0351/X\n")
    with pytest.raises(DataError, match="paired with"):
        build_dataset(DatasetConfig(name="dark_zurich", root=str(tmp_path)), day=True)
    with pytest.raises(DataError, match="only for 'dark_zurich'"):
        build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path)), day=True)


def test_training_a_day_night_preset_without_the_lists_stops_with_one_error_line(
        tmp_path: Path, synthetic_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The released variant's preset on a Dark Zurich tree without corresp/: exit status 1 and
    one ``error:`` line naming the missing folder, before any training step."""
    from fastuda.train import main

    make_pairs(tmp_path / "dz")
    folder = tmp_path / "dz" / "corresp" / "train" / "night"
    (folder / "GOPR0356.csv").unlink()
    preset = Path(__file__).resolve().parents[2] / "configs" / "sepico" / \
        "deeplabv2_dist_cs2darkzurich.toml"
    sets = ["model.backbone='resnet18'", "model.embed_dim=16", "train.device='cpu'",
            "data.num_workers=0", "data.rcs_min_pixels=10", "data.crop_size=[16, 16]",
            "data.source.name='synthetic_source'", f"data.source.root='{synthetic_root}'",
            "data.source.resize=[]", f"data.target.root='{tmp_path / 'dz'}'",
            "data.target.resize=[40, 24]", f"data.val.root='{tmp_path / 'dz'}'",
            "data.val.split='train'", "data.val.resize=[]"]
    rc = main([str(preset), "--work-dir", str(tmp_path / "run"),
               *[x for s in sets for x in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "no correspondence list" in errors[0]
    assert str(folder) in errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or \
        '"type": "train"' not in (tmp_path / "run" / "metrics.jsonl").read_text()
