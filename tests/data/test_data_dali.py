"""The DALI backend against the PyTorch backend on the synthetic pair (skipped without DALI).

Geometry is decided by the same code in both (label-driven: cat_max_ratio, rare class sampling), so
crop windows, flips and labels must be identical. Image pixels come from two resamplers (DALI's
linear ROI resize vs Pillow's bilinear box resize, both antialiased, uint8 output), so images are
compared statistically: mean absolute difference below 0.5 grey levels and no pixel further than
8 grey levels (measured: about 0.02 mean and 4 max).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import make_gta

from fastuda.config import DataConfig, DatasetConfig
from fastuda.data import DataError
from fastuda.data.loaders import build_train_iterator

pytest.importorskip("nvidia.dali")

STD_MIN = 57.12  # the smallest normalisation std: one grey level in normalised units >= 1/57.12


def _cfg(root: Path, **kw: object) -> DataConfig:
    base = dict(source=DatasetConfig(name="synthetic_source", root=str(root)),
                target=DatasetConfig(name="synthetic_target", root=str(root)),
                crop_size=[96, 112], batch_size=4, num_workers=1)
    base.update(kw)
    return DataConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "rcs"), [("source", True), ("target", False)])
def test_dali_matches_torch(synthetic_root: Path, name: str, rcs: bool) -> None:
    cfg = _cfg(synthetic_root)
    ds_cfg = cfg.source if name == "source" else cfg.target
    streams = {kind: build_train_iterator(cfg, ds_cfg, stream=0, seed=7, rcs=rcs, loader=kind)
               for kind in ("torch", "dali")}
    assert streams["dali"].kind == "dali"
    diffs = []
    for _ in range(4):
        t, d = next(streams["torch"]), next(streams["dali"])
        assert d["image"].shape == t["image"].shape and d["image"].dtype == torch.float32
        assert torch.equal(t["label"], d["label"])
        for b, (mt, md) in enumerate(zip(t["meta"], d["meta"], strict=True)):
            for key in ("path", "crop_box", "scaled_size", "flip", "position", "index"):
                assert mt[key] == md[key], key
            assert mt.get("rcs_class") == md.get("rcs_class")
            _, _, h, w = mt["crop_box"]
            assert (d["image"][b, :, h:] == 0).all() and (d["image"][b, :, :, w:] == 0).all()
        diffs.append((t["image"] - d["image"]).abs() * STD_MIN)
    diff = torch.cat([x.flatten() for x in diffs])
    assert diff.mean() < 0.5 and diff.max() < 8


def test_dali_matches_torch_with_scale_choices_small_crop_and_jitter(synthetic_root: Path
                                                                     ) -> None:
    """DASS's geometry (a scale from three values, images below the crop enlarged to fit) and
    SPCL's source ColorJitter: the same crops and labels in both backends, the images as close
    as without the jitter (DALI's jitter runs on its normalised output)."""
    cfg = _cfg(synthetic_root, crop_size=[160, 160], ratio_range=[1.0, 1.0],
               scale_choices=[0.8, 1.0, 1.2], small_crop="resize",
               source=DatasetConfig(name="synthetic_source", root=str(synthetic_root),
                                    color_jitter=[0.5, 0.5, 0.5, 0.2]))
    streams = {kind: build_train_iterator(cfg, cfg.source, stream=0, seed=3, rcs=False,
                                          loader=kind) for kind in ("torch", "dali")}
    diffs = []
    for _ in range(3):
        t, d = next(streams["torch"]), next(streams["dali"])
        assert torch.equal(t["label"], d["label"])
        for mt, md in zip(t["meta"], d["meta"], strict=True):
            assert (mt["crop_box"], mt["scaled_size"]) == (md["crop_box"], md["scaled_size"])
            assert mt["crop_box"][2:] == (160, 160)  # never padded
        diffs.append((t["image"] - d["image"]).abs() * STD_MIN)
    for it in streams.values():
        it.close()
    diff = torch.cat([x.flatten() for x in diffs])
    assert diff.mean() < 0.5 and diff.max() < 8


def test_dali_resume(synthetic_root: Path) -> None:
    cfg = _cfg(synthetic_root, loader="dali")
    it = build_train_iterator(cfg, cfg.target, stream=1, seed=1)
    next(it)
    state = it.state_dict()
    expected = [next(it) for _ in range(2)]
    it.close()
    resumed = build_train_iterator(cfg, cfg.target, stream=1, seed=1)
    resumed.load_state_dict(state)
    for e in expected:
        g = next(resumed)
        assert torch.equal(e["image"], g["image"]) and torch.equal(e["label"], g["label"])


def test_dali_bad_image(tmp_path: Path) -> None:
    root = tmp_path / "gta"
    make_gta(root, n=4, h=40, w=60)
    bad = root / "images" / "00003.png"
    bad.write_bytes(bad.read_bytes()[:-30])  # cut inside the last chunks
    base = dict(source=DatasetConfig(name="gta", root=str(root)), crop_size=[32, 32],
                batch_size=4, num_workers=1, rcs=False, loader="dali")
    cfg = DataConfig(**base)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=str(bad)):
        next(build_train_iterator(cfg, cfg.source, stream=0, seed=0))
    cfg = DataConfig(**base, on_error="skip")  # type: ignore[arg-type]
    it = build_train_iterator(cfg, cfg.source, stream=0, seed=0)
    batch = next(it)
    assert list(it.skipped) == [str(bad)] and "truncated" in it.skipped[str(bad)]
    assert str(bad) not in [m["path"] for m in batch["meta"]]
    assert np.isfinite(batch["image"].numpy()).all()


def test_data_error_type_is_kept(tmp_path: Path) -> None:
    """An error raised in a DALI worker reaches the caller as the same DataError."""
    root = tmp_path / "gta"
    make_gta(root, n=2, h=40, w=60)
    (root / "labels" / "00001.png").write_bytes(b"broken")
    cfg = DataConfig(source=DatasetConfig(name="gta", root=str(root)),  # type: ignore[arg-type]
                     crop_size=[32, 32], batch_size=2, num_workers=1, rcs=False, loader="dali")
    with pytest.raises(DataError, match="00001.png: not a readable image"):
        next(build_train_iterator(cfg, cfg.source, stream=0, seed=0))
