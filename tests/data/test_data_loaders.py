"""Training streams (format, exact resume across epochs, workers, ranks) and the val loader."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import make_cityscapes, make_gta
from PIL import Image

from fastuda.config import DataConfig, DatasetConfig
from fastuda.data import DataError, build_train_iterators, build_val_loader, resolve_loader
from fastuda.data.loaders import build_train_iterator, dali_available


def _cfg(root: Path, **kw: object) -> DataConfig:
    base = dict(source=DatasetConfig(name="synthetic_source", root=str(root)),
                target=DatasetConfig(name="synthetic_target", root=str(root)),
                val=DatasetConfig(name="synthetic_target", root=str(root), split="val",
                                  resize=[128, 64]),
                crop_size=[64, 96], batch_size=4, num_workers=0, loader="torch")
    base.update(kw)
    return DataConfig(**base)  # type: ignore[arg-type]


def _same(a: dict, b: dict) -> bool:
    return (torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
            and [m["path"] for m in a["meta"]] == [m["path"] for m in b["meta"]])


def test_target_crop_never_reads_the_target_labels(tmp_path: Path) -> None:
    """Two Cityscapes trees with the same images, one with varied labels, one with a single
    class everywhere (no crop passes cat_max_ratio 0.75: a label-driven choice would take the
    last of the 10 draws): the target stream crops both alike, at the first draw. The source
    stream still applies cat_max_ratio to its labels."""
    varied, flat = tmp_path / "varied", tmp_path / "flat"
    make_cityscapes(varied, {"train": 4})
    make_cityscapes(flat, {"train": 4})
    for path in (flat / "gtFine").rglob("*_labelIds.png"):
        Image.fromarray(np.full((24, 48), 7, dtype=np.uint8), mode="L").save(path)  # 7 = road

    def boxes(root: Path, stream: int) -> list[tuple]:
        cfg = _cfg(root, crop_size=[8, 8], batch_size=2, ratio_range=[1.0, 1.0],
                   target=DatasetConfig(name="cityscapes", root=str(root)),
                   source=DatasetConfig(name="cityscapes", root=str(root)))
        it = build_train_iterator(cfg, cfg.target, stream=stream, seed=3)
        out = [(Path(m["path"]).name, m["crop_box"]) for _ in range(4) for m in next(it)["meta"]]
        it.close()
        return out

    from fastuda.data.loaders import SOURCE_STREAM, TARGET_STREAM

    assert boxes(varied, TARGET_STREAM) == boxes(flat, TARGET_STREAM)
    # the source stream is labelled data: its crops do follow cat_max_ratio
    assert boxes(varied, SOURCE_STREAM) != boxes(flat, SOURCE_STREAM)


def test_batch_format(synthetic_root: Path) -> None:
    source, target = build_train_iterators(_cfg(synthetic_root), seed=0)
    for it in (source, target):
        batch = next(it)
        assert batch["image"].shape == (4, 3, 64, 96) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (4, 64, 96) and batch["label"].dtype == torch.long
        labels = set(batch["label"].unique().tolist())
        assert labels <= {0, 1, 2, 5, 7, 8, 9, 10, 11, 13, 255}
        assert len(batch["meta"]) == 4 and all(Path(m["path"]).is_file() for m in batch["meta"])
    assert "rcs_class" in next(source)["meta"][0] and "rcs_class" not in next(target)["meta"][0]
    # normalised with the ImageNet statistics: a 0..255 image lands in about [-2.2, 2.7]
    assert -2.2 < batch["image"].min() and batch["image"].max() < 2.7


@pytest.mark.parametrize("rcs", [False, True])
def test_resume_gives_the_same_batches_across_epochs(synthetic_root: Path, rcs: bool) -> None:
    cfg = _cfg(synthetic_root, rcs=rcs)
    it = build_train_iterator(cfg, cfg.source, stream=0, seed=5, rcs=rcs)
    # 24 images, batch 4: an epoch is 6 batches; run 4, checkpoint, then 5 more (into epoch 2)
    for _ in range(4):
        next(it)
    buffer = io.BytesIO()
    torch.save(it.state_dict(), buffer)
    expected = [next(it) for _ in range(5)]
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = build_train_iterator(cfg, cfg.source, stream=0, seed=5, rcs=rcs)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(5)]
    assert all(_same(a, b) for a, b in zip(expected, got, strict=True))
    if not rcs:  # one full epoch holds every image once
        fresh = build_train_iterator(cfg, cfg.source, stream=0, seed=5)
        paths = [m["path"] for _ in range(6) for m in next(fresh)["meta"]]
        assert len(set(paths)) == 24


def test_workers_do_not_change_the_stream(synthetic_root: Path) -> None:
    serial = build_train_iterator(_cfg(synthetic_root), _cfg(synthetic_root).target, stream=1,
                                  seed=2)
    cfg = _cfg(synthetic_root, num_workers=2)
    parallel = build_train_iterator(cfg, cfg.target, stream=1, seed=2)
    assert all(_same(next(serial), next(parallel)) for _ in range(3))
    with pytest.raises(ValueError, match="seed"):
        other = build_train_iterator(cfg, cfg.target, stream=1, seed=3)
        other.load_state_dict(parallel.state_dict())


def test_ranks_get_distinct_samples(synthetic_root: Path) -> None:
    cfg = _cfg(synthetic_root, rcs=False)
    paths = []
    for rank in range(2):
        _, target = build_train_iterators(cfg, seed=0, rank=rank, world_size=2)
        paths.append({m["path"] for _ in range(3) for m in next(target)["meta"]})
    assert len(paths[0]) == 12 and not paths[0] & paths[1]


def test_val_loader_order_shards_and_resize(synthetic_root: Path) -> None:
    cfg = _cfg(synthetic_root)
    full = list(build_val_loader(cfg))
    assert len(full) == 6
    assert [b["meta"][0]["path"] for b in full] == sorted(b["meta"][0]["path"] for b in full)
    for b in full:
        assert b["image"].shape == (1, 3, 64, 128) and b["label"].shape == (1, 64, 128)
        raw = np.asarray(Image.open(b["meta"][0]["label_path"]))
        np.testing.assert_array_equal(b["label"][0].numpy(), raw[1::2, 1::2])
    shards = [[b["meta"][0]["path"] for b in build_val_loader(cfg, rank=r, world_size=2)]
              for r in range(2)]
    assert shards[0] == [b["meta"][0]["path"] for b in full][0::2]
    assert shards[1] == [b["meta"][0]["path"] for b in full][1::2]


def test_stream_with_bad_file_raises_or_counts_skips(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "gta"
    make_gta(root, n=4, h=40, w=60)
    bad = root / "images" / "00002.png"
    bad.write_bytes(bad.read_bytes()[:100])
    base = dict(source=DatasetConfig(name="gta", root=str(root)), crop_size=[32, 32],
                batch_size=4, num_workers=0, rcs=False, loader="torch")
    it = build_train_iterator(DataConfig(**base), DatasetConfig(name="gta", root=str(root)),
                              stream=0, seed=0)
    with pytest.raises(DataError, match=str(bad)):
        next(it)
    cfg = DataConfig(**base, on_error="skip")  # type: ignore[arg-type]
    it = build_train_iterator(cfg, cfg.source, stream=0, seed=0)
    batch = next(it)
    assert it.skipped == {str(bad): pytest.approx(it.skipped[str(bad)])}
    assert "truncated" in it.skipped[str(bad)] and str(bad) in caplog.text
    assert str(bad) not in [m["path"] for m in batch["meta"]]


def test_val_loader_skips_without_replacing(tmp_path: Path, synthetic_root: Path) -> None:
    root = tmp_path / "syn"
    shutil.copytree(synthetic_root, root)
    victim = sorted((root / "target" / "gtFine" / "val").rglob("*.png"))[2]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(victim)
    cfg = _cfg(root, on_error="skip")
    loader = build_val_loader(cfg)
    assert len(list(loader)) == 5 and list(loader.skipped) == [str(victim)]
    with pytest.raises(DataError, match="label size 5x5 differs"):
        list(build_val_loader(_cfg(root)))


def test_auto_loader_choice() -> None:
    assert resolve_loader("auto") == ("dali" if dali_available() else "torch")
    assert resolve_loader("torch") == "torch"
    with pytest.raises(DataError, match="unknown loader"):
        resolve_loader("fast")


def test_scale_choices_and_small_crop_resize_in_the_stream(tmp_path: Path) -> None:
    """24 x 48 images, a 32 x 32 crop: padded by default; with small_crop = "resize" every crop
    is whole (the image enlarged to 32 x 64 at scale 1, 32 x 64 at 0.5 too); the rescaled sizes
    come from scale_choices only."""
    make_cityscapes(tmp_path, {"train": 4})
    ds = DatasetConfig(name="cityscapes", root=str(tmp_path))

    def metas(**kw: object) -> list[dict]:
        cfg = _cfg(tmp_path, crop_size=[32, 32], batch_size=2, source=ds, target=ds, rcs=False,
                   **kw)
        it = build_train_iterator(cfg, cfg.source, stream=0, seed=1)
        out = [m for _ in range(6) for m in next(it)["meta"]]
        it.close()
        return out

    padded = metas(ratio_range=[1.0, 1.0])
    assert {m["crop_box"][2:] for m in padded} == {(24, 32)}
    resized = metas(ratio_range=[1.0, 1.0], scale_choices=[0.5, 1.0, 1.5], small_crop="resize")
    assert {m["crop_box"][2:] for m in resized} == {(32, 32)}
    # 0.5 and 1.0 are enlarged to fit the crop: 32 x 64; 1.5: 36 x 72
    assert {m["scaled_size"] for m in resized} == {(32, 64), (36, 72)}
