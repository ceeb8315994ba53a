"""Rare class sampling (published formula) and the epoch / rank plan of the training streams."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fastuda.config import DataConfig, DatasetConfig
from fastuda.data.loaders import build_train_iterator
from fastuda.data.sampling import RareClassSampler, SamplePlanner


def _softmax_probs(counts: np.ndarray, temperature: float) -> dict[int, float]:
    """DAFormer: f_c = n_c / sum n; P(c) = exp((1 - f_c) / T) / sum_k exp((1 - f_k) / T)."""
    totals = counts.sum(0)
    freq = {c: totals[c] / totals.sum() for c in range(len(totals)) if totals[c] > 0}
    z = sum(math.exp((1 - f) / temperature) for f in freq.values())
    return {c: math.exp((1 - f) / temperature) / z for c, f in freq.items()}


def test_class_probabilities_follow_the_formula() -> None:
    counts = np.array([[900, 50, 0, 10], [800, 0, 0, 30], [950, 20, 0, 0]])
    rcs = RareClassSampler(counts, temperature=0.01, min_pixels=1)
    expected = _softmax_probs(counts, 0.01)
    assert set(rcs.classes.tolist()) == {0, 1, 3}  # class 2 never occurs
    for c, p in zip(rcs.classes.tolist(), rcs.probs.tolist(), strict=True):
        assert p == pytest.approx(expected[c], rel=1e-9)
    assert rcs.images_with_class[1].tolist() == [0, 2]


def test_sampled_frequencies_match_probabilities() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4000, (40, 6)) * (rng.random((40, 6)) < 0.5)
    counts[:, 0] += 60000  # a dominant class, like road
    rcs = RareClassSampler(counts, temperature=0.1, min_pixels=500)
    n = 20000
    draws = [rcs.draw(rng) for _ in range(n)]
    classes = np.array([c for c, _ in draws])
    for c, p in zip(rcs.classes.tolist(), rcs.probs.tolist(), strict=True):
        observed = (classes == c).mean()
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (c, observed, p)
    for c, i in draws[:500]:
        assert counts[i, c] >= 500  # the image holds >= min_pixels of the drawn class


def test_classes_without_eligible_image_are_renormalised_away() -> None:
    counts = np.array([[5000, 100], [6000, 200]])
    rcs = RareClassSampler(counts, temperature=0.01, min_pixels=3000)
    assert rcs.classes.tolist() == [0] and rcs.probs.tolist() == [1.0]


def test_min_pixels_scale_with_image_area() -> None:
    counts = np.full((3, 2), 5000, dtype=np.int64)
    assert RareClassSampler(counts, 0.01, 3000, areas=np.full(3, 2048 * 1024)).min_pixels == 3000
    small = RareClassSampler(counts, 0.01, 3000, areas=np.full(3, 256 * 128))
    assert small.min_pixels == round(3000 * 256 * 128 / (1024 * 512))
    assert small.min_crop_pixels == int(0.5 * small.min_pixels)


def test_epochs_are_permutations_and_ranks_disjoint() -> None:
    n = 11
    single = SamplePlanner(n, seed=3, stream=1)
    for epoch in range(3):
        assert sorted(single.plan(epoch * n + j).index for j in range(n)) == list(range(n))
    ranks = [SamplePlanner(n, seed=3, stream=1, rank=r, world_size=2) for r in range(2)]
    first = [{p.plan(j).index for j in range(ranks[0].epoch_length)} for p in ranks]
    assert ranks[0].epoch_length == 5 and not first[0] & first[1]
    # per-rank random draws differ even where the index coincides in a later epoch
    assert ranks[0].plan(0).attempts != ranks[1].plan(0).attempts
    again = SamplePlanner(n, seed=3, stream=1)
    assert [again.plan(p) for p in range(30)] == [single.plan(p) for p in range(30)]
    other = SamplePlanner(n, seed=4, stream=1)
    assert [other.plan(p).index for p in range(n)] != [single.plan(p).index for p in range(n)]


def test_rcs_stream_crops_contain_their_class(synthetic_root: Path) -> None:
    cfg = DataConfig(source=DatasetConfig(name="synthetic_source", root=str(synthetic_root)),
                     crop_size=[96, 96], num_workers=0, batch_size=4, loader="torch")
    it = build_train_iterator(cfg, cfg.source, stream=0, seed=0, rcs=True)
    rcs = it.planner.rcs
    assert rcs is not None and rcs.min_pixels == round(3000 * 256 * 128 / (1024 * 512))
    seen = set()
    for _ in range(15):
        batch = next(it)
        for b, meta in enumerate(batch["meta"]):
            c = meta["rcs_class"]
            seen.add(c)
            assert (batch["label"][b] == c).sum() >= 1, meta
    assert {5, 7, 11}.issubset(seen)  # pole, sign and person get drawn
