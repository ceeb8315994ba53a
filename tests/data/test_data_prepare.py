"""`python -m fastuda.prepare`: conversion to train ids, class counts, idempotence, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (
    SPEC_CITYSCAPES,
    SPEC_SYNTHIA,
    make_cityscapes,
    make_gta,
    make_synthia,
    spec_map,
)
from PIL import Image

from fastuda.config import DatasetConfig
from fastuda.data import build_dataset
from fastuda.prepare import main


def _expected_counts(label: np.ndarray) -> list[int]:
    return [int((label == c).sum()) for c in range(19)]


@pytest.mark.parametrize("dataset", ["gta", "synthia", "cityscapes"])
def test_prepare_converts_counts_and_is_idempotent(tmp_path: Path, dataset: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / dataset
    if dataset == "gta":
        raws, table, split = make_gta(root), SPEC_CITYSCAPES, "train"
    elif dataset == "synthia":
        raws, table, split = make_synthia(root), SPEC_SYNTHIA, "train"
    else:
        raws, table, split = make_cityscapes(root)["train"], SPEC_CITYSCAPES, "train"
    assert main([dataset, str(root), "--workers", "2", "--split", split]) == 0
    out = capsys.readouterr().out
    assert f"{len(raws)} images" in out and f"labels converted now: {len(raws)}" in out
    assert "road" in out and "pixels %" in out

    ds = build_dataset(DatasetConfig(name=dataset, root=str(root), split=split))
    assert all(f.label_is_train_ids and f.label.endswith("_labelTrainIds.png") for f in ds.files)
    stats = json.loads((root / f"class_stats_{split}.json").read_text())["images"]
    for i, raw in enumerate(raws):
        expected = spec_map(raw, table)
        np.testing.assert_array_equal(np.asarray(Image.open(ds.files[i].label)), expected)
        np.testing.assert_array_equal(ds[i][1], expected)
        assert stats[ds.relpath(i)]["counts"] == _expected_counts(expected)
        assert stats[ds.relpath(i)]["size"] == list(expected.shape)

    mtimes = {f.label: Path(f.label).stat().st_mtime_ns for f in ds.files}
    stats_mtime = (root / f"class_stats_{split}.json").stat().st_mtime_ns
    assert main([dataset, str(root), "--workers", "2", "--split", split]) == 0
    out = capsys.readouterr().out
    assert f"labels converted now: 0, already prepared: {len(raws)}" in out
    assert mtimes == {f: Path(f).stat().st_mtime_ns for f in mtimes}
    assert (root / f"class_stats_{split}.json").stat().st_mtime_ns == stats_mtime


def test_prepare_reports_bad_files_and_layout(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "gta"
    make_gta(root, n=3)
    Image.fromarray(np.full((24, 40), 99, np.uint8), mode="L").save(root / "labels" / "00002.png")
    assert main(["gta", str(root), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "bad files: 1" in out and "00002.png" in out and "outside the encoding" in out
    stats = json.loads((root / "class_stats_train.json").read_text())["images"]
    assert sorted(stats) == ["images/00001.png", "images/00003.png"]

    assert main(["cityscapes", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "expected layout" in err and "leftImg8bit" in err


def test_prepare_synthetic_existing_tree(synthetic_root: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    assert main(["synthetic", str(synthetic_root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "synthetic_source [train]" in out and "synthetic_target [val]" in out
    assert "already prepared: 24" in out


def test_prepare_refuses_lossy_labels_and_truncated_images(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """Issue 18 point 7: a JPEG saved as .png was accepted as a label (lossy values, invented
    classes), and prepare read only image headers, so a truncated image counted as prepared."""
    root = tmp_path / "gta"
    raws = make_gta(root, n=3)
    Image.fromarray(raws[0], mode="L").save(root / "labels" / "00001.png", format="JPEG")
    image = root / "images" / "00003.png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # the header is intact, the pixels are not
    assert main(["gta", str(root), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "bad files: 2" in out
    assert "00001.png: label is a JPEG file, not a PNG (labels must be lossless PNGs)" in out
    assert "00003.png: unreadable or truncated image" in out
    stats = json.loads((root / "class_stats_train.json").read_text())["images"]
    assert sorted(stats) == ["images/00002.png"]

    # and in training: the dataset refuses the JPEG label the same way
    from fastuda.data.io import DataError
    ds = build_dataset(DatasetConfig(name="gta", root=str(root)))
    with pytest.raises(DataError, match="not a PNG"):
        ds.load(0)
