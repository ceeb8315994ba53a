"""The synthetic domain pair: determinism, label space, depth format, ensure_synthetic, shift."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastuda.data import ensure_synthetic
from fastuda.data.synthetic import generate_sample, generate_synthetic, synthetic_complete

TINY = {"source": {"train": 3}, "target": {"train": 2, "val": 2}, "night": {"val": 2}}
SUBSET = {0, 1, 2, 5, 7, 8, 9, 10, 11, 13}  # road sidewalk building pole sign veg terrain sky ...


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", counts=TINY, workers=1)
    generate_synthetic(tmp_path / "b", counts=TINY, workers=2)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and len([k for k in a if k.endswith("_leftImg8bit.png")]) == 9
    generate_synthetic(tmp_path / "c", counts=TINY, workers=1, seed=1)
    assert _digest(tmp_path / "c") != a


def test_label_space_and_classes(synthetic_root: Path) -> None:
    seen: set[int] = set()
    for p in (synthetic_root / "source" / "gtFine").rglob("*.png"):
        lab = np.asarray(Image.open(p))
        assert lab.shape == (128, 256) and lab.dtype == np.uint8
        seen |= set(np.unique(lab).tolist())
    assert seen == SUBSET


def test_inverse_depth_png(synthetic_root: Path) -> None:
    image_path = next((synthetic_root / "target" / "leftImg8bit" / "val").rglob("*.png"))
    stem = image_path.name.replace("_leftImg8bit.png", "")
    depth_path = (synthetic_root / "target" / "depth" / "val" / image_path.parent.name
                  / f"{stem}_depth.png")
    label_path = (synthetic_root / "target" / "gtFine" / "val" / image_path.parent.name
                  / f"{stem}_gtFine_labelTrainIds.png")
    depth_png = Image.open(depth_path)
    assert depth_png.mode.startswith("I;16") or depth_png.mode == "I"
    inv = np.asarray(depth_png).astype(np.float64) / 65535  # 1 / metres
    label = np.asarray(Image.open(label_path))
    assert (inv[label == 10] == 0).all()  # sky: infinitely far
    assert (inv[label != 10] > 0).all() and inv.max() <= 1.0
    # flat road seen from 1.5 m: inverse depth grows linearly with the row below the horizon
    rows = [r for r in range(128) if (label[r] == 0).sum() > 0]
    road_inv = [inv[r][label[r] == 0].mean() for r in rows]
    assert all(b > a for a, b in zip(road_inv, road_inv[1:], strict=False))
    slope = np.polyfit(rows, road_inv, 1)
    residual = np.asarray(road_inv) - np.polyval(slope, rows)
    assert np.abs(residual).max() < 0.02 * max(road_inv)


def test_ensure_synthetic_is_a_cheap_no_op_and_repairs(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    generate_synthetic(root, counts=TINY, workers=1)
    before = _digest(root)
    marker_mtime = os.stat(root / "synthetic.json").st_mtime_ns
    ensure_synthetic(str(root))
    assert os.stat(root / "synthetic.json").st_mtime_ns == marker_mtime
    victim = next((root / "target" / "leftImg8bit").rglob("*.png"))
    victim.unlink()
    assert not synthetic_complete(root)
    ensure_synthetic(str(root))  # rebuilt with the settings in its marker
    assert _digest(root) == before


def test_foreign_folder_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a fastuda synthetic tree"):
        generate_synthetic(tmp_path / "mine", counts=TINY, workers=1)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def _pixels(domain: str, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i in range(n):
        image, label, _ = generate_sample(domain, split, i)
        xs.append(image.reshape(-1, 3).astype(np.float64))
        ys.append(label.reshape(-1))
    return np.concatenate(xs), np.concatenate(ys)


def test_the_domain_shift_is_strong() -> None:
    """A per-pixel colour classifier (nearest class mean) fit on the source works on the source
    and fails on the target: colour is not what transfers between the two domains."""
    x_src, y_src = _pixels("source", "train", 12)
    classes = sorted(SUBSET)
    means = np.stack([x_src[y_src == c].mean(0) for c in classes])

    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        pred = np.asarray(classes)[np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), 1)]
        return float((pred == y).mean())

    x_tgt, y_tgt = _pixels("target", "val", 12)
    x_night, y_night = _pixels("night", "val", 6)
    source_acc, target_acc = accuracy(x_src, y_src), accuracy(x_tgt, y_tgt)
    assert source_acc > 0.7  # buildings, cars and clothes come in several colours
    assert target_acc < source_acc - 0.3
    assert accuracy(x_night, y_night) < target_acc
    # shifted class frequencies: more car, less person in the target
    share = {d: np.bincount(y, minlength=19) / y.size
             for d, y in (("source", y_src), ("target", y_tgt))}
    assert share["target"][13] > 1.5 * share["source"][13]
    assert share["target"][11] < 0.7 * share["source"][11]
