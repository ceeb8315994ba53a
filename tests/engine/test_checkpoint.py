"""Checkpoints are atomic, load with weights_only=True, and restore every RNG exactly."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import fastuda.engine.checkpoint as checkpoint
from fastuda.engine.checkpoint import (
    CheckpointWriteError,
    find_latest,
    link_checkpoint,
    load_checkpoint,
    prune_snapshots,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_round_trip_weights_only(tmp_path) -> None:
    state = {"w": torch.randn(3, 4), "iteration": 7, "nested": {"list": [1, 2.5, "x"]}}
    path = tmp_path / "checkpoints" / "latest.pt"
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["iteration"] == 7
    assert loaded["nested"] == state["nested"]
    assert find_latest(tmp_path) == path
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"v": Unpicklable()}, path)
    assert load_checkpoint(path)["v"] == 1
    assert os.listdir(tmp_path) == ["latest.pt"]


def test_full_disk_names_the_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch) -> None:
    import errno

    path = tmp_path / "latest.pt"
    save_checkpoint({"v": 1}, path)

    def full_disk(obj, fh) -> None:
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match="cannot write checkpoint .*latest.pt: No space left") as err:
        save_checkpoint({"v": 2}, path)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(path)["v"] == 1
    assert os.listdir(tmp_path) == ["latest.pt"]


def test_latest_is_a_link_to_the_snapshot_not_a_second_copy(tmp_path) -> None:
    snapshot, latest = tmp_path / "iter_4.pt", tmp_path / "latest.pt"
    save_checkpoint({"v": 0}, latest)  # an older latest.pt is replaced, not written into
    old_inode = latest.stat().st_ino
    save_checkpoint({"v": 4}, snapshot)
    link_checkpoint(snapshot, latest)
    assert latest.stat().st_ino == snapshot.stat().st_ino != old_inode
    assert snapshot.stat().st_nlink == 2 and load_checkpoint(latest)["v"] == 4
    # a later save of latest.pt alone must leave the snapshot as it was
    save_checkpoint({"v": 5}, latest)
    assert load_checkpoint(snapshot)["v"] == 4 and load_checkpoint(latest)["v"] == 5
    assert sorted(os.listdir(tmp_path)) == ["iter_4.pt", "latest.pt"]


def test_link_falls_back_to_a_copy(tmp_path, monkeypatch) -> None:
    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    snapshot, latest = tmp_path / "iter_1.pt", tmp_path / "latest.pt"
    save_checkpoint({"v": 1}, snapshot)
    link_checkpoint(snapshot, latest)
    assert latest.stat().st_ino != snapshot.stat().st_ino
    assert load_checkpoint(latest)["v"] == 1
    assert sorted(os.listdir(tmp_path)) == ["iter_1.pt", "latest.pt"]

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.shutil, "copyfile", full_disk)
    with pytest.raises(CheckpointWriteError, match="cannot write checkpoint .*latest.pt"):
        link_checkpoint(snapshot, latest)
    assert load_checkpoint(latest)["v"] == 1
    assert sorted(os.listdir(tmp_path)) == ["iter_1.pt", "latest.pt"]


def test_prune_keeps_the_newest_snapshots_by_iteration(tmp_path) -> None:
    for it in (2, 10, 4, 8):  # iter_10 sorts before iter_2 as a string
        save_checkpoint({"v": it}, tmp_path / f"iter_{it}.pt")
    link_checkpoint(tmp_path / "iter_10.pt", tmp_path / "latest.pt")
    (tmp_path / "iter_best.pt").write_bytes(b"not a snapshot of ours")
    assert prune_snapshots(tmp_path, 0) == []
    deleted = prune_snapshots(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["iter_2.pt", "iter_4.pt"]
    assert sorted(os.listdir(tmp_path)) == ["iter_10.pt", "iter_8.pt", "iter_best.pt", "latest.pt"]
    prune_snapshots(tmp_path, 1)
    assert load_checkpoint(tmp_path / "latest.pt")["v"] == 10
    assert sorted(os.listdir(tmp_path)) == ["iter_10.pt", "iter_best.pt", "latest.pt"]


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path) -> None:
    save_checkpoint({"v": 1}, tmp_path / "latest.pt")
    (tmp_path / ".iter_2.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".iter_2.pt.abc123.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["latest.pt", "notes.tmp"]
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_truncated_checkpoint_gives_a_clear_error(tmp_path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(RuntimeError, match="cannot load checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_restores_every_generator(tmp_path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    save_checkpoint({"rng": state}, tmp_path / "r.pt")
    first = (random.random(), float(np.random.standard_normal()), float(torch.rand(())))
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    again = (random.random(), float(np.random.standard_normal()), float(torch.rand(())))
    assert first == again
