"""Checkpoints are atomic, load with weights_only=True, and restore every RNG exactly."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from fastuda.engine.checkpoint import (
    find_latest,
    load_checkpoint,
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
