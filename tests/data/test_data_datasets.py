"""The four real layouts, the folder dataset and bad data, on small trees in the real formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (
    SPEC_CITYSCAPES,
    SPEC_SYNTHIA,
    make_cityscapes,
    make_dark_zurich,
    make_gta,
    make_synthia,
    spec_map,
    write_png16,
)
from PIL import Image

from fastuda.config import DatasetConfig
from fastuda.data import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAIN,
    SYNTHIA13,
    SYNTHIA16,
    DataError,
    LayoutError,
    build_dataset,
)
from fastuda.data.io import read_label, synthia_encoding


def test_cityscapes_map_matches_cityscapesscripts() -> None:
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    official = {lab.id: lab.trainId for lab in labels.labels
                if 0 <= lab.id and lab.trainId not in (255, -1)}
    assert official == CITYSCAPES_ID_TO_TRAIN
    assert [lab.name for lab in sorted(labels.labels, key=lambda x: x.trainId)
            if 0 <= lab.trainId < 19] == list(CITYSCAPES_CLASSES)


def test_synthia_subsets() -> None:
    assert len(SYNTHIA16) == 16 and len(SYNTHIA13) == 13
    assert set(SYNTHIA16) - set(SYNTHIA13) == {3, 4, 5}  # wall, fence, pole
    assert not {9, 14, 16} & set(SYNTHIA16)  # terrain, truck, train are absent


def test_gta(tmp_path: Path) -> None:
    raws = make_gta(tmp_path / "gta")
    ds = build_dataset(DatasetConfig(name="gta", root=str(tmp_path / "gta")))
    assert len(ds) == 3 and ds.class_names == CITYSCAPES_CLASSES
    assert [Path(f.image).name for f in ds.files] == ["00001.png", "00002.png", "00003.png"]
    for i, raw in enumerate(raws):
        image, label, meta = ds[i]
        assert image.shape == (24, 40, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(label, spec_map(raw, SPEC_CITYSCAPES))
        assert meta["path"] == ds.files[i].image


def test_cityscapes_splits(tmp_path: Path) -> None:
    raws = make_cityscapes(tmp_path / "cs")
    for split, n in (("train", 3), ("val", 2)):
        ds = build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path / "cs"),
                                         split=split))
        assert len(ds) == n
        assert [f.image for f in ds.files] == sorted(f.image for f in ds.files)
        for i in range(n):
            np.testing.assert_array_equal(ds[i][1], spec_map(raws[split][i], SPEC_CITYSCAPES))


def test_cityscapes_prefers_train_id_labels(tmp_path: Path) -> None:
    make_cityscapes(tmp_path / "cs", {"val": 1})
    raw_path = next((tmp_path / "cs" / "gtFine" / "val").rglob("*_labelIds.png"))
    train_ids = np.full((24, 48), 7, dtype=np.uint8)
    Image.fromarray(train_ids).save(str(raw_path).replace("_labelIds", "_labelTrainIds"))
    ds = build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path / "cs"), split="val"))
    np.testing.assert_array_equal(ds[0][1], train_ids)


def test_synthia_16bit_red_channel(tmp_path: Path) -> None:
    raws = make_synthia(tmp_path / "synthia")
    ds = build_dataset(DatasetConfig(name="synthia", root=str(tmp_path / "synthia")))
    assert len(ds) == 3
    for i, raw in enumerate(raws):
        np.testing.assert_array_equal(ds[i][1], spec_map(raw, SPEC_SYNTHIA))


def test_synthia_rgba_and_high_byte(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cls = rng.integers(0, 23, (7, 11)).astype(np.uint16)
    rgba = np.stack([cls, cls * 7, cls, np.full_like(cls, 65535)], axis=-1)
    write_png16(tmp_path / "a.png", rgba)
    np.testing.assert_array_equal(read_label(tmp_path / "a.png", synthia_encoding()),
                                  spec_map(cls.astype(np.uint8), SPEC_SYNTHIA))
    rgba[2, 3, 0] = 256 + 3  # a class id that needs the high byte
    write_png16(tmp_path / "b.png", rgba)
    with pytest.raises(DataError, match=r"b\.png.*outside the encoding"):
        read_label(tmp_path / "b.png", synthia_encoding())


def test_dark_zurich(tmp_path: Path) -> None:
    labels = make_dark_zurich(tmp_path / "dz")
    train = build_dataset(DatasetConfig(name="dark_zurich", root=str(tmp_path / "dz")))
    assert len(train) == 2 and not train.has_labels
    image, label, meta = train[0]
    assert (label == 255).all() and label.shape == image.shape[:2] and not meta["has_label"]
    val = build_dataset(DatasetConfig(name="dark_zurich", root=str(tmp_path / "dz"), split="val"))
    assert val.has_labels
    for i, lab in enumerate(labels):
        np.testing.assert_array_equal(val[i][1], lab)


def test_folder_dataset_with_label_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("b", "a"):
        (tmp_path / "imgs" / "train" / "x").mkdir(parents=True, exist_ok=True)
        (tmp_path / "anns" / "train" / "x").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / "train" / "x" / f"{name}_img.jpg")
        Image.fromarray(np.array([[1, 2, 3] * 4] * 8, dtype=np.uint8)).save(
            tmp_path / "anns" / "train" / "x" / f"{name}_lab.png")
    cfg = DatasetConfig(name="folder", root=str(tmp_path), image_dir="imgs", label_dir="anns",
                        image_suffix="_img.jpg", label_suffix="_lab.png",
                        label_map={"1": 0, "2": 13})
    ds = build_dataset(cfg)
    assert [Path(f.image).name for f in ds.files] == ["a_img.jpg", "b_img.jpg"]
    np.testing.assert_array_equal(ds[0][1][0, :3], [0, 13, 255])


def test_missing_root_and_split_print_layout(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match=r"(?s)not found.*expected layout.*images/00001\.png"):
        build_dataset(DatasetConfig(name="gta", root=str(tmp_path / "nowhere")))
    make_cityscapes(tmp_path / "cs", {"train": 1})
    with pytest.raises(LayoutError, match=r"(?s)leftImg8bit/val.*expected layout.*gtFine/val"):
        build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path / "cs"), split="val"))
    (tmp_path / "gta2" / "images").mkdir(parents=True)
    with pytest.raises(LayoutError, match="labels"):
        build_dataset(DatasetConfig(name="gta", root=str(tmp_path / "gta2")))


def _bad_tree(root: Path) -> dict[str, Path]:
    """A GTA tree whose images 2..5 are each broken in one way."""
    make_gta(root, n=6)
    files = {k: root / "images" / f"0000{i}.png"
             for i, k in ((2, "truncated"), (3, "garbage"), (4, "size"), (5, "values"))}
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["garbage"].write_bytes(b"this is not an image" * 10)
    files["size"] = root / "labels" / "00004.png"
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(files["size"])
    files["values"] = root / "labels" / "00005.png"
    Image.fromarray(np.full((24, 40), 200, np.uint8), mode="L").save(files["values"])
    return files


@pytest.mark.parametrize(("case", "index", "message"), [
    ("truncated", 1, "truncated"), ("garbage", 2, "not a readable image"),
    ("size", 3, "label size 10x10 differs from the image size 40x24"),
    ("values", 4, "label values outside the encoding.*200")])
def test_bad_data_raises_naming_the_file(tmp_path: Path, case: str, index: int,
                                         message: str) -> None:
    files = _bad_tree(tmp_path / "gta")
    ds = build_dataset(DatasetConfig(name="gta", root=str(tmp_path / "gta")))
    with pytest.raises(DataError, match=message) as err:
        ds[index]
    assert str(files[case]) in str(err.value)


def test_bad_data_skip_is_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = _bad_tree(tmp_path / "gta")
    ds = build_dataset(DatasetConfig(name="gta", root=str(tmp_path / "gta")), on_error="skip")
    _, _, meta = ds[1]  # images 2..5 are bad: the next good one is index 5
    assert meta["index"] == 5
    assert [p for p, _ in meta["skipped"]] == [str(files[k]) for k in
                                               ("truncated", "garbage", "size", "values")]
    assert len(ds.skipped) == 4
    assert "skipping bad sample" in caplog.text


def test_unlabelled_image_among_labelled_is_an_error(tmp_path: Path) -> None:
    make_cityscapes(tmp_path / "cs", {"train": 3})
    victim = sorted((tmp_path / "cs" / "gtFine").rglob("*_labelIds.png"))[1]
    victim.unlink()
    with pytest.raises(LayoutError, match="no label file for this image"):
        build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path / "cs")))
    ds = build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path / "cs")),
                       on_error="skip")
    assert len(ds) == 2


def test_synthetic_datasets(synthetic_root: Path) -> None:
    for name, split, n in (("synthetic_source", "train", 24), ("synthetic_target", "val", 6),
                           ("synthetic_night", "train", 4)):
        ds = build_dataset(DatasetConfig(name=name, root=str(synthetic_root), split=split))
        assert len(ds) == n and ds.has_labels
        image, label, meta = ds[0]
        assert image.shape == (128, 256, 3) and label.shape == (128, 256)
        assert Path(meta["depth_path"]).is_file()
